"""Reference linear_cross_entropy against torch's F.linear + F.cross_entropy (the definition users know)."""
import pytest
import torch
import torch.nn.functional as F

from fusedlm.reference import linear_cross_entropy as ref


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("bias", [False, True])
def test_matches_torch_cross_entropy(reduction, bias):
    g = torch.Generator().manual_seed(0)
    h, w = torch.randn(23, 16, generator=g, dtype=torch.float64), torch.randn(41, 16, generator=g, dtype=torch.float64)
    b = torch.randn(41, generator=g, dtype=torch.float64) if bias else None
    t = torch.randint(0, 41, (23,), generator=g)
    t[::3] = -100
    got, argmax = ref.linear_cross_entropy(h, w, t, bias=b, reduction=reduction)
    logits = F.linear(h, w, b)
    expected = F.cross_entropy(logits, t, reduction=reduction)
    torch.testing.assert_close(got, expected)
    assert torch.equal(argmax[t != -100], logits.argmax(-1)[t != -100]) and (argmax[t == -100] == -1).all()


def test_no_target_mean_is_zero_not_nan():
    h, w = torch.randn(3, 4), torch.randn(5, 4)
    loss, argmax = ref.linear_cross_entropy(h, w, torch.full((3,), -100))
    assert loss.item() == 0.0 and (argmax == -1).all()
