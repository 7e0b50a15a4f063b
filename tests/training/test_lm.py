"""lm_loss and sequence_logprobs (the fused LM head + loss: ops.linear_cross_entropy) against the
unfused reference: the model's full logits through F.cross_entropy, outputs and every parameter's
gradient, for a decoder, an encoder-decoder with a tied rescaled head (T5) and one with a logits
bias (BART), an MLM encoder, PEFT-wrapped models and bf16 autocast."""
import pytest
import torch
import torch.nn.functional as F
from tiny_models import fused

from fusedlm import peft
from fusedlm.models.logprobs import IGNORE_INDEX, token_logprobs
from fusedlm.training.lm import lm_loss, sequence_logprobs

PRESETS = ["llama-tiny", "gpt2-tiny", "t5-tiny", "bart-tiny", "bert-tiny"]


def _batch(model, seed=0, b=3, n=10):
    g = torch.Generator().manual_seed(seed)
    v = model.config.vocab_size
    ids = torch.randint(3, v, (b, n), generator=g)
    labels = ids.clone()
    labels[:, :3] = IGNORE_INDEX  # a prompt
    labels[1, -2:] = IGNORE_INDEX
    mask = torch.ones_like(ids)
    if model.config.arch == "encoder-decoder":
        return {"input_ids": ids, "attention_mask": mask, "labels": torch.randint(3, v, (b, 7), generator=g)}
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _unfused(model, batch):
    """The reference: the model's logits of every position, then F.cross_entropy and the argmax."""
    arch = model.config.arch
    labels = batch["labels"]
    logits = model(**batch).logits  # (B, N, V); a seq2seq gets its decoder inputs from the labels
    if arch == "decoder":
        logits, labels = logits[:, :-1], labels[:, 1:]
    keep = labels != IGNORE_INDEX
    loss = F.cross_entropy(logits[keep].float(), labels[keep])
    return loss, (logits[keep].argmax(-1) == labels[keep]).float().mean().item()


def _grads(model, loss):
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.autograd.grad(loss, params, allow_unused=True), params


@pytest.mark.parametrize("preset", PRESETS)
def test_lm_loss_matches_full_logits_cross_entropy(preset):
    model = fused(preset, perturb=("norm", "bias")).train()
    batch = _batch(model)
    loss, metrics = lm_loss(model, batch)
    expected, accuracy = _unfused(model, batch)
    torch.testing.assert_close(loss, expected, atol=1e-5, rtol=1e-5)
    assert metrics["accuracy"] == pytest.approx(accuracy)
    got, params = _grads(model, loss)
    want, _ = _grads(model, expected)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    for name, x, y in zip(names, got, want):
        if y is None:
            assert x is None or x.abs().max() == 0, name
            continue
        torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-4, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("preset", ["llama-tiny", "t5-tiny"])
def test_sequence_logprobs_match_token_logprobs(preset):
    model = fused(preset).train()
    batch = _batch(model, seed=1)
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    seq, counts = sequence_logprobs(model, ids, mask, labels)
    logits = model(**batch).logits
    if model.config.arch == "decoder":
        logits, labels = logits[:, :-1], labels[:, 1:]
    expected = token_logprobs(logits, labels).sum(1)
    torch.testing.assert_close(seq, expected, atol=1e-5, rtol=1e-5)
    assert torch.equal(counts, (labels != IGNORE_INDEX).sum(1))
    w = torch.tensor([0.3, -1.0, 2.0])  # per-sequence weights, as DPO's gradient gives them
    got, params = _grads(model, (seq * w).sum())
    want, _ = _grads(model, (expected * w).sum())
    for x, y in zip(got, want):
        torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-4)


def test_lora_and_prompt_tuning_models_use_the_fused_loss():
    for apply in (lambda m: peft.apply_lora(m, r=4, targets="all"), lambda m: peft.apply_prompt_tuning(m, n_virtual_tokens=3)):
        model = apply(fused("llama-tiny")).train()
        batch = _batch(model, seed=2)
        loss, _ = lm_loss(model, batch)
        expected, _ = _unfused(model, batch)
        torch.testing.assert_close(loss, expected, atol=1e-5, rtol=1e-5)
        got, _ = _grads(model, loss)
        want, _ = _grads(model, expected)
        for x, y in zip(got, want):
            torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-4)


def test_bf16_autocast_matches_unfused_autocast():
    model = fused("llama-tiny").train()
    batch = _batch(model, seed=3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _ = lm_loss(model, batch)
        expected, _ = _unfused(model, batch)
    torch.testing.assert_close(loss, expected, atol=2e-2, rtol=1e-2)


def test_no_label_keeps_the_graph_and_gives_zero():
    model = fused("llama-tiny").train()
    batch = _batch(model)
    batch["labels"] = torch.full_like(batch["labels"], IGNORE_INDEX)
    loss, metrics = lm_loss(model, batch)
    assert loss.item() == 0.0 and metrics["accuracy"] == 0.0
    loss.backward()
    assert model.lm_head.weight.grad is not None
