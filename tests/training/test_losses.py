"""The losses against trl: DPO and reward by trl 1.16's own loss code (live when trl 1.16 is
installed, else the fixture it wrote), PPO pieces against trl 1.12's definitions (the fixture
written with trl 1.12's masked_whiten and its transcribed PPO steps, see _trl_reference.py).
Plus formulas from the papers on hand-picked numbers and bad input."""
import json
import math

import pytest
import torch

import _trl_reference as ref
from fusedlm.training import losses
from fusedlm.training.ppo import rollout_advantages

FIX = json.loads(ref.FIXTURE.read_text())
T = torch.tensor


def _has_trl(prefix: str) -> bool:
    return (ref.trl_version() or "").startswith(prefix)


def _dpo_ours(policy, refp, mask, loss_type, beta, label_smoothing):
    b = policy.shape[0] // 2
    seq, ref_seq, n = policy.sum(1), refp.sum(1), mask.sum(1)
    return losses.dpo_loss(seq[:b], seq[b:], ref_seq[:b], ref_seq[b:], beta=beta, loss_type=loss_type,
                           chosen_len=n[:b], rejected_len=n[b:], label_smoothing=label_smoothing)


@pytest.mark.parametrize("case", FIX["dpo"]["cases"], ids=lambda c: f"{c['loss_type']}-beta{c['beta']}-eps{c['label_smoothing']}")
def test_dpo_loss_equals_trl_fixture(case):
    policy, refp, mask = (T(FIX["dpo"][k]) for k in ("policy", "ref", "mask"))
    ours = _dpo_ours(policy, refp, mask, case["loss_type"], case["beta"], case["label_smoothing"])
    assert ours.item() == pytest.approx(case["loss"], rel=1e-6)
    b = policy.shape[0] // 2
    seq, ref_seq = policy.sum(1), refp.sum(1)
    metrics = losses.dpo_metrics(seq[:b], seq[b:], ref_seq[:b], ref_seq[b:], beta=case["beta"])
    for key, value in case["metrics"].items():
        assert metrics[key] == pytest.approx(value, rel=1e-5, abs=1e-7)


@pytest.mark.skipif(not _has_trl("1.16"), reason="live comparison needs trl 1.16 (the fixture test covers it)")
@pytest.mark.parametrize("seed", [1, 2])
@pytest.mark.parametrize("loss_type, beta, eps", ref.DPO_CASES)
def test_dpo_loss_equals_trl_live(seed, loss_type, beta, eps):
    policy, refp, mask = ref.dpo_inputs(seed)
    expected, _ = ref.trl_dpo(policy, refp, mask, loss_type=loss_type, beta=beta, label_smoothing=eps)
    assert _dpo_ours(policy, refp, mask, loss_type, beta, eps).item() == pytest.approx(expected, rel=1e-6)


def test_dpo_formulas_on_hand_numbers():
    pc, pr, rc, rr = T([-1.0]), T([-3.0]), T([-2.0]), T([-2.0])  # delta = 1 - (-1) = 2
    assert losses.dpo_loss(pc, pr, rc, rr, beta=0.5).item() == pytest.approx(math.log1p(math.exp(-1.0)))
    assert losses.dpo_loss(pc, pr, rc, rr, beta=0.25, loss_type="hinge").item() == pytest.approx(0.5)
    ipo = losses.dpo_loss(pc, pr, rc, rr, beta=0.5, loss_type="ipo", chosen_len=T([2.0]), rejected_len=T([4.0]))
    assert ipo.item() == pytest.approx((0.5 + 0.25 - 1.0) ** 2)  # (1/2 - (-1)/4 - 1/(2*0.5))^2
    robust = losses.dpo_loss(pc, pr, rc, rr, beta=0.5, loss_type="robust", label_smoothing=0.1)
    s = lambda x: math.log(1 / (1 + math.exp(-x)))  # noqa: E731
    assert robust.item() == pytest.approx((-(0.9) * s(1.0) + 0.1 * s(-1.0)) / 0.8)


def test_dpo_loss_gradient_pushes_chosen_up_and_rejected_down():
    pc, pr = T([-2.0], requires_grad=True), T([-2.0], requires_grad=True)
    losses.dpo_loss(pc, pr, T([-2.0]), T([-2.0])).backward()
    assert pc.grad.item() < 0 < pr.grad.item()


@pytest.mark.parametrize("case", FIX["reward"]["cases"], ids=lambda c: f"margin{c['margin']}-center{c['center']}")
def test_reward_loss_equals_trl_fixture(case):
    rc, rr, margin = (T(FIX["reward"][k]) for k in ("r_chosen", "r_rejected", "margin"))
    ours = losses.reward_loss(rc, rr, margin=margin if case["margin"] else None, center_rewards_coefficient=case["center"])
    assert ours.item() == pytest.approx(case["loss"], rel=1e-6)


@pytest.mark.skipif(not _has_trl("1.16"), reason="live comparison needs trl 1.16 (the fixture test covers it)")
@pytest.mark.parametrize("center", [None, 0.05])
def test_reward_loss_equals_trl_live(center):
    rc, rr, margin = ref.reward_inputs(seed=3)
    for m in (None, margin):
        expected, _ = ref.trl_reward(rc, rr, margin=m, center=center)
        assert losses.reward_loss(rc, rr, margin=m, center_rewards_coefficient=center).item() == pytest.approx(expected, rel=1e-6)


# --------------------------------------------------------------------------------------------- PPO (trl 1.12)
@pytest.mark.parametrize("estimator", ["k1", "k3"])
def test_rollout_advantages_and_ppo_losses_equal_trl_1_12(estimator):
    inp = {k: T(v) for k, v in FIX["ppo"]["inputs"].items()}
    expected = {k: T(v) for k, v in FIX["ppo"][estimator].items()}
    steps = inp["logprobs"].shape[1]
    response_mask = torch.arange(steps)[None] <= inp["sequence_lengths"][:, None]
    out = rollout_advantages(inp["logprobs"], inp["ref_logprobs"], inp["values"], inp["scores"], response_mask,
                             kl_estimator=estimator)
    torch.testing.assert_close(out["kl"], expected["kl"] * response_mask)
    torch.testing.assert_close(out["rewards"], expected["rewards"])
    torch.testing.assert_close(out["returns"], expected["returns"])
    torch.testing.assert_close(out["advantages"], expected["advantages"])
    value_mask = out["value_mask"]
    old_values = inp["values"].masked_fill(~value_mask, 0)
    pg, _ = losses.ppo_policy_loss(inp["new_logprobs"], inp["logprobs"], out["advantages"], response_mask)
    vf, _ = losses.ppo_value_loss(inp["vpred"].masked_fill(~value_mask, 0), old_values, out["returns"], value_mask)
    assert pg.item() == pytest.approx(expected["pg_loss"].item(), rel=1e-5)
    assert vf.item() == pytest.approx(expected["vf_loss"].item(), rel=1e-5)
    whitened = losses.masked_whiten(out["rewards"], value_mask, shift_mean=False)
    torch.testing.assert_close(whitened[value_mask], expected["whiten_rewards"][value_mask])


def test_gae_on_hand_numbers():
    # gamma 0.5, lam 1: A_t = sum_k gamma^k delta_{t+k}; with zero values that is the discounted reward-to-go
    rewards, values = T([[1.0, 2.0, 4.0]]), torch.zeros(1, 3)
    adv, ret = losses.gae(rewards, values, torch.ones(1, 3, dtype=torch.bool), gamma=0.5, lam=1.0)
    torch.testing.assert_close(adv, T([[1 + 1 + 1.0, 2 + 2.0, 4.0]]))
    torch.testing.assert_close(ret, adv)
    # lam 0: one-step TD errors; masked steps are 0 and do not leak into the last real step
    rewards, values = T([[1.0, 1.0, 9.0]]), T([[0.5, 0.25, 7.0]])
    adv, ret = losses.gae(rewards, values, T([[True, True, False]]), gamma=1.0, lam=0.0)
    torch.testing.assert_close(adv, T([[1 + 0.25 - 0.5, 1 - 0.25, 0.0]]))
    torch.testing.assert_close(ret, T([[0.75 + 0.5, 0.75 + 0.25, 0.0]]))


def test_kl_estimators_and_whitening():
    lp, rlp = T([[-1.0, -2.0]]), T([[-1.5, -1.0]])
    torch.testing.assert_close(losses.kl_penalty(lp, rlp, "k1"), T([[0.5, -1.0]]))
    r = torch.exp(rlp - lp)
    torch.testing.assert_close(losses.kl_penalty(lp, rlp, "k3"), r - 1 - torch.log(r))
    x, mask = T([[1.0, 2.0, 3.0, 100.0]]), T([[True, True, True, False]])
    w = losses.masked_whiten(x, mask)
    torch.testing.assert_close(w[mask], T([-1.0, 0.0, 1.0]), atol=1e-6, rtol=0)  # unbiased var of 1,2,3 is 1


def test_ppo_clipping():
    # advantage > 0: the ratio is clipped above at 1.2, advantage < 0: below at 0.8
    old, adv, mask = torch.zeros(1, 2), T([[1.0, -1.0]]), torch.ones(1, 2, dtype=torch.bool)
    new = torch.log(T([[1.5, 0.5]])).requires_grad_()
    loss, clipfrac = losses.ppo_policy_loss(new, old, adv, mask)
    assert loss.item() == pytest.approx((-1.2 + 0.8) / 2)
    assert clipfrac.item() == 1.0
    loss.backward()
    assert torch.equal(new.grad, torch.zeros(1, 2))  # clipped: no gradient
    vf, vclip = losses.ppo_value_loss(T([[1.0]]), T([[0.0]]), T([[2.0]]), T([[True]]))
    assert vf.item() == pytest.approx(0.5 * max((1 - 2) ** 2, (0.2 - 2) ** 2)) and vclip.item() == 1.0


# --------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("call, match", [
    (lambda: losses.dpo_loss(T([1.0]), T([1.0, 2.0]), T([1.0]), T([1.0])), "policy_rejected must have the shape"),
    (lambda: losses.dpo_loss(T([1.0]), T([1.0]), T([1.0]), T([1.0]), beta=0.0), "beta must be"),
    (lambda: losses.dpo_loss(T([1.0]), T([1.0]), T([1.0]), T([1.0]), beta=-1), "beta must be"),
    (lambda: losses.dpo_loss(T([1.0]), T([1.0]), T([1.0]), T([1.0]), loss_type="kto"), "loss_type"),
    (lambda: losses.dpo_loss(T([1.0]), T([1.0]), T([1.0]), T([1.0]), loss_type="ipo"), "chosen_len"),
    (lambda: losses.dpo_loss(T([]), T([]), T([]), T([])), "empty"),
    (lambda: losses.dpo_loss(T([[1.0]]), T([[1.0]]), T([[1.0]]), T([[1.0]])), "1 dimension"),
    (lambda: losses.dpo_loss(T([1.0]), T([1.0]), T([1.0]), T([1.0]), loss_type="robust", label_smoothing=0.5), "label_smoothing"),
    (lambda: losses.dpo_loss([1.0], T([1.0]), T([1.0]), T([1.0])), "must be a torch.Tensor"),
    (lambda: losses.reward_loss(T([1.0, 2.0]), T([1.0])), "r_rejected must have the shape"),
    (lambda: losses.reward_loss(T([1.0]), T([1.0]), margin=T([1.0, 2.0])), "margin"),
    (lambda: losses.gae(torch.zeros(2, 3), torch.zeros(2, 3), torch.ones(2, 4)), "mask must be"),
    (lambda: losses.gae(torch.zeros(3), torch.zeros(3), torch.ones(3)), r"\[B, T\]"),
    (lambda: losses.kl_penalty(torch.zeros(1, 2), torch.zeros(1, 2), "k2"), "estimator"),
    (lambda: losses.masked_var(torch.zeros(1, 2), T([[True, False]])), "at least 2"),
])
def test_bad_input_is_a_clear_error(call, match):
    with pytest.raises((ValueError, TypeError), match=match):
        call()
