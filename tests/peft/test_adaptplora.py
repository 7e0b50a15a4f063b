"""AdaPtLoRA: per-task soft prompts + shared gated LoRA, one gated kernel call per layer."""

import pytest
import torch

from tiny_models import assert_close, batch, fused, randomize

from fusedlm import ops, peft
from fusedlm.peft import adaptplora

L_P = 4


def _setup(name="llama-tiny", **kw):
    m = fused(name)
    mt = peft.apply_adaptplora(m, n_tasks=3, n_prompt_tokens=L_P, r=4, alpha=8, targets="all", **kw)
    return m, mt


def _base_with_prompts(m, mt, ids, mask, task_ids):
    """The frozen model on [P_t; embed(ids)] with no LoRA at all (every gate 0)."""
    x = torch.cat([mt.prompt_encoder()[task_ids], m.embed(ids)], dim=1)
    full = torch.cat([torch.ones(ids.shape[0], L_P, dtype=torch.bool), mask], dim=1)
    gated = adaptplora.gated_layers(m)
    saved = [layer.gate_mask.clone() for _, layer in gated]
    for _, layer in gated:
        layer.gate_mask.zero_()
    out = m(inputs_embeds=x, attention_mask=full, task_ids=task_ids).logits[:, L_P:]
    for (_, layer), s in zip(gated, saved):
        layer.gate_mask.copy_(s)
    return out


@torch.no_grad()
def test_identity_at_init_and_gate_zero_is_the_base_model():
    m, mt = _setup()
    ids, mask = batch()
    task_ids = torch.tensor([0, 2, 1])
    ref = _base_with_prompts(m, mt, ids, mask, task_ids)
    assert_close(mt(ids, attention_mask=mask, task_ids=task_ids).logits, ref)  # B = 0: LoRA adds nothing
    randomize(mt)
    assert not torch.allclose(mt(ids, attention_mask=mask, task_ids=task_ids).logits, ref, atol=1e-3)
    peft.freeze_gate(mt, task=2)  # task 2 drops LoRA everywhere: row 1 is the base model again
    out = mt(ids, attention_mask=mask, task_ids=task_ids).logits
    assert_close(out[1:2], ref[1:2])


@torch.no_grad()
def test_gated_update_and_mixed_tasks_equal_each_row_alone():
    m, mt = _setup()
    randomize(mt)
    randomize(mt, "gate_logits", std=1.0)
    ids, mask = batch(b=4)
    task_ids = torch.tensor([1, 0, 2, 1])
    out = mt(ids, attention_mask=mask, task_ids=task_ids).logits
    for row in range(4):
        alone = mt(ids[row:row + 1], attention_mask=mask[row:row + 1], task_ids=task_ids[row:row + 1]).logits
        assert_close(out[row:row + 1], alone)
    layer = m.decoder.blocks[0].attn.q_proj  # ΔW_t = s_t · (α / r) · B A on one layer
    x = torch.randn(2, 5, 64)
    with adaptplora.routing(2, task_ids=torch.tensor([2, 0])):
        y = layer(x)
    s = torch.sigmoid(layer.gate_logits)
    delta = 2.0 * layer.lora_B.weight @ layer.lora_A.weight
    for row, t in enumerate([2, 0]):
        ref = x[row] @ (layer.base_layer.weight + s[t] * delta).T
        assert_close(y[row], ref)


def test_one_gated_kernel_call_per_layer(monkeypatch):
    m, mt = _setup()
    calls = []
    real = ops.lora_linear

    def counting(*args, **kw):
        calls.append(kw["gates"])
        return real(*args, **kw)

    monkeypatch.setattr(adaptplora.ops, "lora_linear", counting)
    ids, mask = batch()
    with torch.no_grad():
        mt(ids, attention_mask=mask, task_ids=torch.tensor([0, 1, 2]))
    assert len(calls) == len(adaptplora.gated_layers(m)) and all(g.shape == (3,) for g in calls)


def test_gradients_reach_prompts_gates_and_lora_only():
    m, mt = _setup()
    randomize(mt, "lora_B")
    peft.freeze_gate(mt, task=1, layers=["model.decoder.blocks.0.attn.q_proj"])
    mt.train()
    ids, mask = batch()
    mt(ids, attention_mask=mask, task_ids=torch.tensor([0, 1, 1])).logits.pow(2).mean().backward()
    with_grad = {n for n, p in mt.named_parameters() if p.grad is not None}
    assert with_grad == {n for n, p in mt.named_parameters() if p.requires_grad}
    assert all(n.startswith("prompt_encoder") or n.endswith(("gate_logits", "lora_A.weight", "lora_B.weight")) for n in with_grad)
    prompts = mt.prompt_encoder.embedding.grad
    assert prompts[0].abs().sum() > 0 and prompts[1].abs().sum() > 0 and prompts[2].abs().sum() == 0  # task 2 not in the batch
    gate = m.decoder.blocks[0].attn.q_proj.gate_logits.grad
    assert gate[0] != 0 and gate[1] == 0 and gate[2] == 0  # frozen at 0 for task 1; task 2 absent
    assert m.decoder.blocks[1].attn.q_proj.gate_logits.grad[1] != 0


@torch.no_grad()
def test_seq2seq_and_cached_decoding():
    m, mt = _setup("t5-tiny")
    randomize(mt)
    ids, mask = batch(n=6)
    task_ids = torch.tensor([2, 0, 1])
    dec = torch.zeros(3, 4, dtype=torch.long)
    full = mt(ids, attention_mask=mask, decoder_input_ids=dec, task_ids=task_ids).logits
    memory = mt.encode(ids, mask, task_ids=task_ids)
    cache = mt.new_cache(3, 4)
    steps = [mt(decoder_input_ids=dec[:, i:i + 1], encoder_out=memory, attention_mask=mask, cache=cache, task_ids=task_ids).logits
             for i in range(4)]
    assert_close(torch.cat(steps, dim=1), full)


def test_bad_task_ids():
    _, mt = _setup()
    ids, _ = batch()
    with pytest.raises(ValueError, match=r"task_ids must lie in \[0, 3\)"):
        mt(ids, task_ids=torch.tensor([0, 3, 1]))
    with pytest.raises(ValueError, match=r"task_ids must lie in \[0, 3\)"):
        mt(ids, task_ids=torch.tensor([0, -1, 1]))
    with pytest.raises(ValueError, match="task_ids must be an integer tensor"):
        mt(ids, task_ids=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="needs task_ids"):
        mt.model(ids)
    with pytest.raises(ValueError, match="task must be"):
        peft.freeze_gate(mt, task=3)
    with pytest.raises(ValueError, match="not AdaPtLoRA layers"):
        peft.freeze_gate(mt, task=0, layers=["decoder.blocks.0.attn.q_proj"])
