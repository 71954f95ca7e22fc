"""The model/guide pair against the training data, checked once before the loop.

The loop turns Pyro's argument checks off after its first step (each costs a host sync), so
whatever they would catch is caught here instead: the pair's contract on a first and on a short
last batch, a data plate whose stated size is not the data's, and rows outside the supports of
the sites that observe them.
"""

from __future__ import annotations

__all__ = ["check_rows", "training_contract"]

import math
from typing import Any

import torch
from torch import Tensor

from elbolab.contract import Contract, check_observed_rows, check_pair, pair_contract
from elbolab.data.checks import check_rows_in_support
from elbolab.errors import InputError
from elbolab.inference.evaluate import CHUNK_ELEMENTS
from elbolab.inference.staging import StagedData


def training_contract(model: Any, guide: Any, data: StagedData, batch_size: int, first: tuple[Tensor, ...]) -> Contract:
    """The pair's contract, checked on the ``first`` batch and on a short last one; a subsampling plate must state N."""
    num_points = data.num_points
    contract = pair_contract(model, guide, first)
    if contract.subsamples_input:
        raise InputError(
            f"the model subsamples the data it is given (its plate {contract.data_plate!r} over the {first[0].shape[0]} "
            "points of a batch draws a subsample of them); fit passes minibatches itself: declare the plate on the "
            f"batch, pyro.plate({contract.data_plate!r}, len(x)), or with the full size, "
            f"pyro.plate({contract.data_plate!r}, N, subsample_size=len(x))"
        )
    if contract.full_size is not None and contract.full_size != num_points:
        raise InputError(
            f"the model's data plate {contract.data_plate!r} states {contract.full_size} data points "
            f"(pyro.plate({contract.data_plate!r}, {contract.full_size}, subsample_size=...)), but the training "
            f"data have {num_points}: its scale full_size / batch would make every loss wrong"
        )
    last = num_points % batch_size
    if last and num_points > batch_size:
        # A trial batch: it must not move the generators the training draws from.
        with torch.random.fork_rng(devices=[data.device] if data.device.type == "cuda" else []):
            last_batch = data.rows(slice(num_points - last, num_points))
        check_pair(model, guide, last_batch)  # not cached: a new size
    return contract


def check_rows(model: Any, guide: Any, x: Tensor, args: tuple[Tensor, ...], contract: Contract) -> None:
    """Every row of the data inside its observed sites' supports, before training.

    Where the model observes ``x`` itself, one elementwise check of ``x`` against the site's
    support; otherwise one pass of the model without gradients.
    """
    if contract.input_support is not None:
        name, support = contract.input_support
        try:
            check_rows_in_support(x, support, "the data", name)
        except (RuntimeError, NotImplementedError):
            pass  # a support that cannot check a value (a dependent one): left to the density
        return
    chunk = max(1, CHUNK_ELEMENTS // max(1, math.prod(x.shape[1:])) // 4)
    for start in range(0, x.shape[0], chunk):
        rows = slice(start, start + chunk)
        check_observed_rows(model, guide, (x[rows], *(a[rows] for a in args)), contract, offset=start)
