"""SFT data and training, the reward model, DPO with each reference, and their bad input."""
import pytest
import torch

import _tiny
from fusedlm import peft
from fusedlm.training import Trainer, dpo, lm_loss, pad_collate, reward, sft
from fusedlm.training.preference import preference_example, stack_pairs

EOS = 2


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


# --------------------------------------------------------------------------------------------- SFT
def test_sft_example_labels_the_response_only():
    ex = sft.sft_example([5, 6, 7], [8, 9], eos_token_id=EOS, bos_token_id=1)
    assert ex["input_ids"] == [1, 5, 6, 7, 8, 9, EOS]
    assert ex["labels"] == [-100, -100, -100, -100, 8, 9, EOS]
    assert sft.sft_example([5], [8, 9], loss_on_prompt=True)["labels"] == [5, 8, 9]
    assert sft.sft_example([5, 6], [8, 9, 10], max_len=4)["input_ids"] == [5, 6, 8, 9]


def test_chat_template_learns_the_assistant_turns():
    vocab = {c: i + 3 for i, c in enumerate(sorted(set("<|>\nsystemuserassistantendhiyo! ")))}
    tok = lambda s: [vocab[c] for c in s]  # noqa: E731 - a character tokenizer
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo!"},
                {"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    ex = sft.chat_example(messages, tok, eos_token_id=EOS)
    text = "".join(f"<|{m['role']}|>\n{m['content']}<|end|>\n" for m in messages)
    assert ex["input_ids"] == tok(text) + [EOS]
    learned = [t for t, lab in zip(ex["input_ids"], ex["labels"]) if lab != -100]
    assert learned == tok("yo!<|end|>\n") + tok("yo<|end|>\n") + [EOS]
    with pytest.raises(ValueError, match="no assistant turn"):
        sft.chat_example(messages[:1], tok)
    with pytest.raises(ValueError, match=r"messages\[0\]"):
        sft.chat_example([{"role": "bot", "content": "x"}], tok)


def test_packing_restarts_positions_and_never_predicts_across_examples():
    examples = [sft.sft_example([5, 6], [7, 8]), sft.sft_example([9], [10, 11, 12])]
    rows = sft.pack(examples, seq_len=5, pad_token_id=0)
    assert [r["input_ids"] for r in rows] == [[5, 6, 7, 8, 9], [10, 11, 12, 0, 0]]
    assert [r["position_ids"] for r in rows] == [[0, 1, 2, 3, 0], [1, 2, 3, 0, 0]]
    assert [r["labels"] for r in rows] == [[-100, -100, 7, 8, -100], [10, 11, 12, -100, -100]]
    assert rows[1]["attention_mask"] == [1, 1, 1, 0, 0]


def _copy_examples(n, seed=0, prompt_len=6):
    """SFT task: the response repeats the prompt."""
    g = _gen(seed)
    prompts = torch.randint(4, _tiny.V, (n, prompt_len), generator=g).tolist()
    return [sft.sft_example(p, p, eos_token_id=EOS) for p in prompts]


@pytest.mark.parametrize("packed", [False, True])
def test_sft_learns_the_response(packed):
    data = _copy_examples(1024)
    if packed:
        data = sft.pack(data, seq_len=26)
    held_out = _copy_examples(32, seed=1)
    trainer = Trainer(_tiny.model(), lm_loss, data, eval_data=held_out, max_steps=120, batch_size=16, lr=6e-3,
                      warmup_steps=5, progress=False)
    before = trainer.evaluate()
    trainer.fit()
    after = trainer.evaluate()
    # the response's first token cannot be known (accuracy <= 6/7): the rest is a copy
    assert after["eval/loss"] < 0.5 * before["eval/loss"] and after["eval/accuracy"] > 0.6


def test_lm_loss_ignores_the_prompt():
    model = _tiny.model()
    ex = sft.sft_example([5, 6, 7], [8, 9])
    batch = pad_collate([ex])
    loss, _ = lm_loss(model, batch)
    logits = model(batch["input_ids"]).logits[0]
    expected = torch.nn.functional.cross_entropy(logits[2:4], torch.tensor([8, 9]))
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------------------------- reward model
def _separable_pairs(n, seed=0):
    """The chosen response holds token 10 somewhere, the rejected one token 11 (otherwise random)."""
    g = _gen(seed)
    out = []
    for _ in range(n):
        prompt = torch.randint(12, _tiny.V, (4,), generator=g).tolist()
        body = torch.randint(12, _tiny.V, (5,), generator=g).tolist()
        at = int(torch.randint(0, 5, (1,), generator=g))
        chosen, rejected = body.copy(), body.copy()
        chosen[at], rejected[at] = 10, 11
        out.append(preference_example(prompt, chosen, rejected[: 3 + at % 3] if at > 2 else rejected, eos_token_id=EOS))
    return out


def test_reward_model_separates_the_pairs():
    rm = reward.RewardModel(_tiny.model())
    trainer = Trainer(rm, reward.reward_step, _separable_pairs(256), eval_data=_separable_pairs(64, seed=1), max_steps=60,
                      batch_size=16, lr=3e-3, warmup_steps=5, progress=False)
    before = trainer.evaluate()["eval/accuracy"]
    trainer.fit()
    after = trainer.evaluate()["eval/accuracy"]
    assert before < 0.8 and after > 0.9


def test_reward_is_read_at_the_last_real_token():
    rm = reward.RewardModel(_tiny.model()).eval()
    ids = torch.tensor([[5, 6, 7, 0, 0], [5, 6, 7, 8, 9]])
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    r = rm(ids, attention_mask=mask)
    assert r.shape == (2,)
    torch.testing.assert_close(r[0], rm(ids[:1, :3])[0])
    torch.testing.assert_close(r[1], rm.values(ids[1:])[0, -1])
    left = torch.tensor([[0, 0, 5, 6, 7]])
    torch.testing.assert_close(rm(left, attention_mask=torch.tensor([[0, 0, 1, 1, 1]]))[0], r[0], rtol=1e-5, atol=1e-5)


def test_reward_margin_and_centering_enter_the_loss():
    rm = reward.RewardModel(_tiny.model())
    batch = pad_collate([preference_example([5], [6], [7], margin=1.0), preference_example([5], [8], [9], margin=0.5)])
    loss, _ = reward.reward_step(rm, batch, center_rewards_coefficient=0.01)
    ids, mask, _ = stack_pairs(batch)
    r = rm(ids, attention_mask=mask)
    expected = -torch.nn.functional.logsigmoid(r[:2] - r[2:] - torch.tensor([1.0, 0.5])).mean() + 0.01 * ((r[:2] + r[2:]) ** 2).mean()
    torch.testing.assert_close(loss, expected)


# --------------------------------------------------------------------------------------------- DPO
def _dpo_pairs(n, seed=0):
    """chosen: the prompt repeated; rejected: random tokens."""
    g = _gen(seed)
    out = []
    for _ in range(n):
        prompt = torch.randint(4, _tiny.V, (5,), generator=g).tolist()
        out.append(preference_example(prompt, prompt, torch.randint(4, _tiny.V, (5,), generator=g).tolist(), eos_token_id=EOS))
    return out


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo"])
def test_dpo_raises_the_margin_with_a_frozen_copy(loss_type):
    model = _tiny.model()
    stage = dpo.DPO(dpo.frozen_copy(model), beta=0.1, loss_type=loss_type)
    trainer = Trainer(model, stage, _dpo_pairs(256), eval_data=_dpo_pairs(64, seed=1), max_steps=40, batch_size=16,
                      lr=3e-3, warmup_steps=3, progress=False)
    before = trainer.evaluate()
    trainer.fit()
    after = trainer.evaluate()
    assert before["eval/rewards/margins"] == pytest.approx(0.0, abs=1e-6)  # policy == reference at the start
    assert after["eval/rewards/margins"] > 0.15 and after["eval/rewards/accuracies"] > 0.9  # beta * log-ratio margin
    for p, q in zip(stage.reference.model.parameters(), _tiny.model().parameters()):
        assert torch.equal(p, q)  # the reference did not move


def test_precomputed_reference_equals_the_frozen_copy():
    model = _tiny.model()
    data = _dpo_pairs(24)
    with_ref = dpo.precompute_reference(model, data, batch_size=5)
    assert set(with_ref[0]) == set(data[0]) | {"ref_chosen_logps", "ref_rejected_logps"}
    frozen, pre = dpo.DPO(dpo.frozen_copy(model)), dpo.DPO(dpo.precomputed())
    batch = pad_collate(with_ref[:8])
    (a, _), (b, _) = frozen(model, batch), pre(model, batch)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    hist = Trainer(model, pre, with_ref, max_steps=20, batch_size=8, lr=3e-3, progress=False).fit()
    assert hist[-1]["rewards/margins"] > hist[0]["rewards/margins"]


def test_adapters_disabled_reference_is_the_base_model():
    model = _tiny.model()
    base = dpo.frozen_copy(model)
    peft.apply_lora(model, r=4, alpha=8, targets="all")
    stage = dpo.DPO(dpo.adapters_disabled(), beta=0.1)
    data = _dpo_pairs(128)
    hist = Trainer(model, stage, data, max_steps=30, batch_size=16, lr=1e-2, progress=False).fit()
    assert hist[0]["rewards/margins"] == pytest.approx(0.0, abs=1e-6) and hist[-1]["rewards/margins"] > 0.1
    batch = pad_collate(data[:4])
    ids, mask, labels = stack_pairs(batch)
    for got, want in zip(stage.reference(model, ids, mask, labels, batch), base(model, ids, mask, labels, batch)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)  # LoRA trained, the reference is still the base


def test_sequence_logprobs_sum_the_completion_tokens():
    model = _tiny.model().eval()
    ids = torch.tensor([[5, 6, 7, 8, 0]])
    labels = torch.tensor([[-100, -100, 7, 8, -100]])
    seq, n = dpo.sequence_logprobs(model, ids, torch.tensor([[1, 1, 1, 1, 0]]), labels)
    logp = model(ids).logits[0].log_softmax(-1)
    torch.testing.assert_close(seq[0], logp[1, 7] + logp[2, 8])
    assert n.tolist() == [2]


# --------------------------------------------------------------------------------------------- bad input
def test_unequal_preference_batches_and_bad_beta_are_refused():
    model = _tiny.model()
    batch = pad_collate(_dpo_pairs(3))
    batch["rejected_input_ids"] = batch["rejected_input_ids"][:2]
    with pytest.raises(ValueError, match="as many chosen as rejected"):
        dpo.DPO(dpo.frozen_copy(model))(model, batch)
    with pytest.raises(ValueError, match="as many chosen as rejected"):
        reward.reward_step(reward.RewardModel(model), batch)
    for beta in (0, -0.1):
        with pytest.raises(ValueError, match="beta must be"):
            dpo.DPO(dpo.precomputed(), beta=beta)
    with pytest.raises(ValueError, match="precompute_reference"):
        dpo.DPO(dpo.precomputed())(model, pad_collate(_dpo_pairs(2)))
    with pytest.raises(ValueError, match="needs 'chosen_input_ids'"):
        reward.reward_step(reward.RewardModel(model), {"input_ids": torch.ones(2, 3, dtype=torch.long)})
    with pytest.raises(ValueError, match="DecoderLM backbone"):
        reward.RewardModel(_tiny.model("bert-tiny"))
    with pytest.raises(ValueError, match="empty"):
        sft.sft_example([1, 2], [])
