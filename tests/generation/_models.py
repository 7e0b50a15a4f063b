"""Tiny transformers models with weights that do not depend on the transformers version.

Every tensor is drawn from its own generator, seeded by the CRC32 of its name, so
transformers 4.55.4 (the contrastive-search fixture, make_contrastive_fixture.py) and
transformers 5.24 (the tests) build bit-identical models from these configs. Weights are larger
than transformers' default init so the next-token distributions are peaked: beam search and
contrastive search then rarely meet near-ties that float rounding could flip.
Imports only torch and transformers (it runs in the throwaway 4.55.4 environment too).
"""
import zlib

import torch
import transformers as tf

CONFIGS = {
    "llama": ("LlamaForCausalLM", "LlamaConfig", dict(
        vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=48, max_position_embeddings=64, bos_token_id=1, eos_token_id=2, pad_token_id=0)),
    "gpt2": ("GPT2LMHeadModel", "GPT2Config", dict(
        vocab_size=97, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=96, eos_token_id=96)),
    "t5": ("T5ForConditionalGeneration", "T5Config", dict(
        vocab_size=97, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_decoder_layers=2, num_heads=4,
        relative_attention_num_buckets=8, relative_attention_max_distance=20, decoder_start_token_id=0)),
    "bart": ("BartForConditionalGeneration", "BartConfig", dict(
        vocab_size=97, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=48, decoder_ffn_dim=48, max_position_embeddings=64,
        forced_eos_token_id=None)),
}
DECODERS, SEQ2SEQ = ("llama", "gpt2"), ("t5", "bart")


def _std(name: str, t: torch.Tensor) -> tuple[float, float]:
    """(mean, std) of the weights of tensor `name`."""
    lname = name.lower()
    if "norm" in lname or ".ln_" in lname:
        return (1.0, 0.1) if name.endswith("weight") else (0.0, 0.1)
    if name.endswith("bias"):  # linear biases, BART's final_logits_bias
        return 0.0, 0.1
    if "relative_attention_bias" in name:
        return 0.0, 0.5
    if "pos" in lname:  # learned position tables
        return 0.0, 0.3
    if "embed" in lname or "wte" in lname or "shared" in lname or "lm_head" in lname:
        return 0.0, 1.0
    return 0.0, 0.18  # projections: about 1/sqrt(d_model)


def make(name: str) -> torch.nn.Module:
    """The tiny transformers model `name` (a key of CONFIGS), in eval mode, with version-independent weights."""
    cls, cfg_cls, kw = CONFIGS[name]
    model = getattr(tf, cls)(getattr(tf, cfg_cls)(**kw)).eval()
    tensors = dict(model.named_parameters())
    tensors.update((n, b) for n, b in model.named_buffers() if n.endswith("final_logits_bias"))
    with torch.no_grad():
        for n in sorted(tensors):
            g = torch.Generator().manual_seed(zlib.crc32(n.encode()))
            mean, std = _std(n, tensors[n])
            tensors[n].copy_(mean + std * torch.randn(tensors[n].shape, generator=g))
    return model


def checksum(model: torch.nn.Module) -> float:
    """A fingerprint of the weights: the fixture records it, the tests check their models match it."""
    with torch.no_grad():
        return float(sum((i + 1) * p.double().sum() for i, (_, p) in enumerate(sorted(model.state_dict().items()))))


def prompts(name: str, padded: bool, b: int = 3, n: int = 7) -> tuple[torch.Tensor, torch.Tensor]:
    """Random ids (b, n) in [3, 96) and their mask: decoders left-padded, seq2seq sources right-padded."""
    g = torch.Generator().manual_seed(len(name) + 10 * b + padded)
    ids = torch.randint(3, 96, (b, n), generator=g)
    mask = torch.ones(b, n, dtype=torch.long)
    if padded and b > 1:
        if name in SEQ2SEQ:  # the encoder's padding, on the right
            mask[1, n - 3:] = 0
            mask[2, n - 1:] = 0
        else:  # left padding, as decoders generate
            mask[1, :3] = 0
            mask[2, :1] = 0
        ids = ids.masked_fill(mask == 0, 0)
    return ids, mask
