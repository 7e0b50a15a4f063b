"""fusedlm._validate: the scalar checks every layer shares name the argument, the expectation and the value."""
import numpy as np
import pytest
import torch

from fusedlm import _validate as check


def test_integer():
    assert check.integer("n", 3, low=1) == 3 and check.integer("n", np.int64(2), low=0, high=2) == 2
    with pytest.raises(TypeError, match="n must be an int, got float"):
        check.integer("n", 2.0)
    with pytest.raises(TypeError, match="n must be an int, got bool"):
        check.integer("n", True)
    with pytest.raises(ValueError, match=r"n must be >= 1, got 0"):
        check.integer("n", 0, low=1)
    with pytest.raises(ValueError, match=r"n must be in \[0, 4\], got 5"):
        check.integer("n", 5, low=0, high=4)
    with pytest.raises(ValueError, match="r must be > 0, got -2"):
        check.positive_int("r", -2)


def test_number_and_probability():
    assert check.number("lr", 3, low=0, low_open=True) == 3.0
    with pytest.raises(ValueError, match="lr must be > 0, got 0"):
        check.number("lr", 0, low=0, low_open=True)
    with pytest.raises(ValueError, match="finite"):
        check.number("lr", float("nan"))
    with pytest.raises(TypeError, match="lr must be a number, got str"):
        check.number("lr", "1e-3")
    with pytest.raises(ValueError, match=r"p must be in \[0, 1\), got 1.0"):
        check.probability("p", 1.0, high_open=True)
    with pytest.raises(ValueError, match=r"p must be in \(0, 1\), got 0"):
        check.probability("p", 0, low_open=True, high_open=True)


def test_choice_and_token_ids():
    assert check.choice("mode", "a", ("a", "b")) == "a"
    with pytest.raises(ValueError, match=r"mode must be one of \('a', 'b'\), got 'c'"):
        check.choice("mode", "c", ("a", "b"))
    assert check.token_ids("eos", 3, single=True) == [3]
    assert check.token_ids("eos", torch.tensor([[1, 2]])) == [1, 2] and check.token_ids("eos", (4,)) == [4]
    for bad in (-1, [1, -2], [1.0], "ab", 2.5):
        with pytest.raises(ValueError, match="eos must be"):
            check.token_ids("eos", bad, single=True)
    with pytest.raises(ValueError, match="pad must be a token id"):
        check.token_id("pad", 1.5)


def test_per_row():
    ok = lambda t: t >= 0  # noqa: E731
    assert check.per_row("k", 2, 3, ok, ">= 0", integral=True) == 2
    check.per_row("k", torch.tensor([0, 1, 2]), 3, ok, ">= 0", integral=True)
    with pytest.raises(ValueError, match=r"k must be a scalar or a tensor of shape \[3\]"):
        check.per_row("k", torch.tensor([0, 1]), 3, ok, ">= 0")
    with pytest.raises(ValueError, match="k must be >= 0, got -1"):
        check.per_row("k", torch.tensor([0, -1, 2]), 3, ok, ">= 0")
    with pytest.raises(TypeError, match="k must be an int or an integer tensor"):
        check.per_row("k", 2.5, 3, ok, ">= 0", integral=True)
