"""as_points and check_rows_in_support: what they convert, what they refuse, and what the message names."""

import re

import numpy as np
import pytest
import torch
from torch.distributions import constraints

from elbolab.data import as_points, check_rows_in_support
from elbolab.data.checks import describe_support
from elbolab.errors import InputError


def test_numpy_arrays_and_nested_lists_become_tensors_with_their_values():
    values = np.arange(12, dtype=np.float64).reshape(3, 4) / 7
    points = as_points(values, "x")
    assert isinstance(points, torch.Tensor) and points.dtype == torch.float64
    np.testing.assert_array_equal(points.numpy(), values)
    torch.testing.assert_close(as_points([[1.5, 2.0], [3.0, 4.0]], "x"), torch.tensor([[1.5, 2.0], [3.0, 4.0]], dtype=torch.float64))
    read_only = np.ones((2, 3), dtype=np.float32)
    read_only.flags.writeable = False
    assert as_points(read_only, "x").dtype == torch.float32


def test_integer_and_boolean_data_become_the_float_dtype_a_network_takes():
    counts = np.array([[0, 3], [7, 255]], dtype=np.uint8)
    assert as_points(counts, "x").dtype == torch.get_default_dtype()
    torch.testing.assert_close(as_points(counts, "x"), torch.tensor([[0.0, 3.0], [7.0, 255.0]]))
    assert as_points(np.array([[70000, 1]], dtype=np.uint32), "x").tolist() == [[70000.0, 1.0]]
    assert as_points(torch.tensor([[True, False]]), "x").tolist() == [[1.0, 0.0]]
    assert as_points(torch.ones(2, 3, dtype=torch.int64), "x", dtype=torch.float64).dtype == torch.float64


def test_floating_data_keep_their_dtype_unless_one_is_given():
    x = torch.rand(4, 3, dtype=torch.float64)
    assert as_points(x, "x") is x  # nothing to convert: no copy
    cast = as_points(x, "x", dtype=torch.float32)
    assert cast.dtype == torch.float32
    torch.testing.assert_close(cast, x.float())
    assert as_points(x, "x", device="cpu").device.type == "cpu"
    with pytest.raises(ValueError, match="floating dtype"):
        as_points(x, "x", dtype=torch.int64)


@pytest.mark.parametrize("shape", [(), (5,)])
def test_fewer_than_two_dims_is_refused_with_the_shape_and_the_single_point_hint(shape):
    with pytest.raises(InputError, match=rf"^log_likelihood: x must be a batch .* got shape {re.escape(repr(shape))} .*single point needs shape \[1, D\]"):
        as_points(torch.zeros(shape), "log_likelihood: x")


def test_no_points_and_points_without_values_are_refused():
    with pytest.raises(InputError, match=r"x has shape \(0, 3\): no points"):
        as_points(np.zeros((0, 3)), "x")
    with pytest.raises(InputError, match=r"x has shape \(4, 0\): points with no values"):
        as_points(torch.zeros(4, 0), "x")


@pytest.mark.parametrize(
    ("value", "problem"),
    [(np.array([["a", "b"]]), "dtype <U1 .not numeric"), (np.array([[object()]]), "dtype object"),
     (np.ones((2, 2)) * 1j, "complex"), ([[1.0, 2.0], [3.0]], "could not read the list")],
)
def test_what_is_not_an_array_of_real_numbers_is_refused_by_name(value, problem):
    with pytest.raises(InputError, match=rf"^data x must be an array of numbers.*{problem}"):
        as_points(value, "data x")


def test_a_complex_tensor_is_refused():
    with pytest.raises(InputError, match="x must be real numbers, got a complex tensor"):
        as_points(torch.ones(2, 2, dtype=torch.complex64), "x")


def test_non_finite_rows_are_named_by_index_with_their_count():
    x = torch.randn(100, 3)
    x[4, 0] = float("nan")
    x[17, 2] = float("inf")
    x[90, 1] = -float("inf")
    with pytest.raises(InputError, match=r"^x has NaN or infinite values in 3 rows \(rows 4, 17, 90\)$"):
        as_points(x, "x")
    one = np.zeros((3, 2, 2))
    one[1, 1, 0] = np.nan  # a row is a point, whatever its own shape
    with pytest.raises(InputError, match=r"in 1 row \(row 1\)$"):
        as_points(one, "x")
    many = torch.zeros(50, 2)
    many[::5, 1] = float("nan")
    with pytest.raises(InputError, match=r"in 10 rows \(rows 0, 5, 10, 15, 20, \.\.\.\)$"):
        as_points(many, "x")


def test_large_finite_values_whose_sum_overflows_pass_and_a_cast_to_infinity_is_named():
    big = torch.full((4, 2), 3e38)  # the one-pass sum is inf; the per-row check clears it
    assert as_points(big, "x") is big
    huge = np.array([[1.0, 1e300], [0.0, 0.0]])
    with pytest.raises(InputError, match=r"after conversion to torch.float32\) in 1 row \(row 0\)"):
        as_points(huge, "x", dtype=torch.float32)


def test_binary_data_with_a_half_is_refused_by_row_with_the_site_and_support():
    x = torch.zeros(8, 4)
    x[3, 2] = 0.5
    x[6, 0] = 2.0
    row_support = constraints.independent(constraints.boolean, 1)  # a Bernoulli row's support
    with pytest.raises(InputError, match=r"^x has values outside the support of site 'obs', binary values \{0, 1\}, "
                                         r"in 2 rows \(rows 3, 6\); the first is 0.5$"):
        check_rows_in_support(x, row_support, "x", "obs")
    check_rows_in_support(torch.bernoulli(torch.full((8, 4), 0.5)), row_support, "x", "obs")


def test_a_vector_support_is_checked_per_row_and_named():
    probs = torch.tensor([[0.2, 0.8], [0.5, 0.6], [1.0, 0.0]])
    with pytest.raises(InputError, match=r"the probability simplex .*in 1 row \(row 1\)$"):
        check_rows_in_support(probs, constraints.simplex, "weights", "w")
    with pytest.raises(InputError, match=r"non-negative integers, in 1 row \(row 0\); the first is -1$"):
        check_rows_in_support(torch.tensor([[-1.0, 2.0], [0.0, 3.0]]), constraints.nonnegative_integer, "counts", "x")


def test_supports_in_words():
    assert describe_support(constraints.boolean) == "binary values {0, 1}"
    assert describe_support(constraints.independent(constraints.nonnegative_integer, 1)) == "non-negative integers"
    assert describe_support(constraints.unit_interval).startswith("the unit interval")
    assert describe_support(constraints.interval(-1.0, 2.0)) == str(constraints.interval(-1.0, 2.0))
