"""elbolab's modules in Pyro's param store, whenever Pyro collects parameters through it.

Pyro's ``SVI`` (and its jit-compiled ELBOs, and ``RenyiELBO``'s gradient) find what to train by
recording the ``pyro.param`` sites a program runs, inside ``poutine.trace(param_only=True)``. A
plain ``nn.Module`` runs none, so ``SVI(model, guide, pyro.optim.Adam(...), Trace_ELBO())``
would train nothing. Every built-in model and guide therefore calls :func:`register` first in its
``forward``: while such a parameter-collecting trace is on Pyro's stack, it registers the module
with ``pyro.module`` under a name of its own. elbolab's ``fit`` collects parameters from the
modules and needs no param sites, so its steps pay nothing for this: the check is one scan of
Pyro's handler stack.

Each instance gets a unique name (``"VAE_3"``): two instances of one class must not share param
store entries, or the second would be trained through the first's tensors. A store entry that no
longer holds the module's own tensor (after ``load_state_dict(assign=True)``, say) is replaced by
it, so that what Pyro's optimizer steps is what the module computes with.
"""

from __future__ import annotations

__all__ = ["collecting_params", "register"]

import itertools
import weakref

import pyro
from pyro.poutine.runtime import _PYRO_STACK
from pyro.poutine.trace_messenger import TraceMessenger
from torch import nn

_NAMES: weakref.WeakKeyDictionary[nn.Module, str] = weakref.WeakKeyDictionary()
_COUNTER = itertools.count()


def collecting_params() -> bool:
    """Whether a ``poutine.trace(param_only=True)`` is on Pyro's stack: someone gathers parameters from param sites."""
    return any(isinstance(handler, TraceMessenger) and handler.param_only for handler in _PYRO_STACK)


def register(module: nn.Module) -> None:
    """``pyro.module`` under the module's own unique name, when Pyro collects parameters (see the module docstring)."""
    if not collecting_params():
        return
    name = _NAMES.get(module)
    if name is None:
        name = _NAMES[module] = f"{type(module).__name__}_{next(_COUNTER)}"
    store = pyro.get_param_store()
    for param_name, param in module.named_parameters():
        full_name = f"{name}$$${param_name}"
        if param.requires_grad and full_name in store and store.get_param(full_name) is not param:
            store[full_name] = param
    pyro.module(name, module)
