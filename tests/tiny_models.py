"""The tests' one factory of tiny models: fusedlm's (from its presets) and transformers' (from the
configs below), and the batches they run on.

    fused("llama-tiny")                         # eval mode, norms perturbed (non-trivial)
    fused("llama-tiny", perturb=("norm", "bias"))
    fused("llama-tiny", init="normal", vocab_size=64)   # transformers' initialisation, train mode
    hf("llama")                                 # torch.manual_seed(seed), norms / biases perturbed
    hf("llama", weights="crc32")                # weights that do not depend on the transformers version
    ids, mask = batch(b=3, n=9)                 # left padding in rows 1 and 2

Imports only torch and transformers at the top: tests/generation/make_contrastive_fixture.py runs
it in an environment with transformers 4.55.4 and no fusedlm.
"""
import zlib

import torch

V = 97  # the vocabulary of the transformers models
_DEC = dict(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=64, bos_token_id=1, eos_token_id=2, pad_token_id=0)
_ENC = dict(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=42, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
_GPT2 = dict(vocab_size=V, n_embd=32, n_layer=2, n_head=4, n_positions=64)

# name -> (transformers model class, config class, config fields)
HF = {
    "llama": ("LlamaForCausalLM", "LlamaConfig", dict(_DEC, num_key_value_heads=2)),  # GQA 4 -> 2
    # bitsandbytes' CPU 4-bit kernel needs in_features >= its blocksize (64)
    "llama-64": ("LlamaForCausalLM", "LlamaConfig", dict(_DEC, hidden_size=64, intermediate_size=128, num_key_value_heads=2)),
    "qwen2": ("Qwen2ForCausalLM", "Qwen2Config", dict(_DEC, num_key_value_heads=1, tie_word_embeddings=True)),  # MQA, q/k/v biases
    "qwen2-untied": ("Qwen2ForCausalLM", "Qwen2Config", dict(_DEC, num_key_value_heads=1)),
    # layer 0 full attention, layer 1 a sliding window of 4 (prompts are longer)
    "qwen2-sliding": ("Qwen2ForCausalLM", "Qwen2Config", dict(_DEC, num_key_value_heads=2, use_sliding_window=True,
                                                              sliding_window=4, max_window_layers=1)),
    "mistral": ("MistralForCausalLM", "MistralConfig", dict(_DEC, num_key_value_heads=2, sliding_window=64)),  # hides nothing
    "mistral-sliding": ("MistralForCausalLM", "MistralConfig", dict(_DEC, num_key_value_heads=2, sliding_window=4)),
    "gpt2": ("GPT2LMHeadModel", "GPT2Config", dict(_GPT2, bos_token_id=96, eos_token_id=96)),
    "gpt2-padded": ("GPT2LMHeadModel", "GPT2Config", dict(_GPT2, attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0,
                                                          bos_token_id=1, eos_token_id=2, pad_token_id=0)),
    "bert": ("BertForMaskedLM", "BertConfig", _ENC),
    "roberta": ("RobertaForMaskedLM", "RobertaConfig", dict(_ENC, pad_token_id=1)),
    "bert-cls": ("BertForSequenceClassification", "BertConfig", dict(_ENC, num_labels=3)),
    "roberta-cls": ("RobertaForSequenceClassification", "RobertaConfig", dict(_ENC, pad_token_id=1, num_labels=3)),
    "t5": ("T5ForConditionalGeneration", "T5Config", dict(
        vocab_size=V, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_decoder_layers=2, num_heads=4,
        relative_attention_num_buckets=8, relative_attention_max_distance=20, decoder_start_token_id=0)),
    "bart": ("BartForConditionalGeneration", "BartConfig", dict(
        vocab_size=V, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4,
        encoder_ffn_dim=48, decoder_ffn_dim=48, max_position_embeddings=64, forced_eos_token_id=None)),
}
SEQ2SEQ = ("t5", "bart")
GENERATION = ("llama", "gpt2", "t5", "bart")  # the generation tests' models (and the contrastive fixture's)


def _crc32_std(name: str) -> tuple[float, float]:
    """(mean, std) of the crc32 weights of tensor `name`: larger than transformers' default init, so
    the next-token distributions are peaked (beam and contrastive search rarely meet near-ties)."""
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


def hf(name: str, *, seed: int = 0, weights: str = "perturbed", attn_implementation: str = "sdpa") -> torch.nn.Module:
    """The tiny transformers model `name` (a key of HF), in eval mode. weights "perturbed": built
    under torch.manual_seed(seed), then norms, biases and T5's relative bias moved by 0.1 N(0, 1);
    "crc32": every tensor drawn from its own generator seeded by the CRC32 of its name, so
    transformers 4.55.4 and 5.x build bit-identical models."""
    import transformers as tf

    cls, cfg_cls, fields = HF[name]
    if weights == "perturbed":
        torch.manual_seed(seed)
    config = getattr(tf, cfg_cls)(**fields)
    config._attn_implementation = attn_implementation
    model = getattr(tf, cls)(config).eval()
    with torch.no_grad():
        if weights == "crc32":
            tensors = dict(model.named_parameters())
            tensors.update((n, b) for n, b in model.named_buffers() if n.endswith("final_logits_bias"))
            for n in sorted(tensors):
                g = torch.Generator().manual_seed(zlib.crc32(n.encode()))
                mean, std = _crc32_std(n)
                tensors[n].copy_(mean + std * torch.randn(tensors[n].shape, generator=g))
        else:
            for n, p in model.named_parameters():
                if "norm" in n.lower() or n.endswith("bias") or "relative_attention_bias" in n:
                    p.add_(0.1 * torch.randn_like(p))
    return model


def saved(name: str, path, *, seed: int = 0) -> torch.nn.Module:
    """hf(name, seed=seed), written to `path` as a checkpoint directory (transformers' save_pretrained)."""
    model = hf(name, seed=seed)
    model.save_pretrained(path)
    return model


def checksum(model: torch.nn.Module) -> float:
    """A fingerprint of the weights (the contrastive fixture records it; its tests check their models match)."""
    with torch.no_grad():
        return float(sum((i + 1) * p.double().sum() for i, (_, p) in enumerate(sorted(model.state_dict().items()))))


def fused(preset: str, *, seed: int = 0, perturb=("norm",), init: str | None = None, **overrides) -> torch.nn.Module:
    """A tiny fusedlm model of `preset` (with config `overrides`), built under torch.manual_seed(seed).
    In eval mode with the parameters named in `perturb` ("norm": every norm, "bias": every bias)
    moved by 0.1 N(0, 1); or, init="normal", with transformers' initialisation (every linear and
    embedding N(0, 0.02), biases 0: a tied head then starts near uniform) in train mode."""
    from fusedlm.models import build, get_config

    torch.manual_seed(seed)
    model = build(get_config(preset, **overrides))
    if init == "normal":
        for module in model.modules():
            if isinstance(module, (torch.nn.Linear, torch.nn.Embedding)):
                torch.nn.init.normal_(module.weight, std=0.02)
                if getattr(module, "bias", None) is not None:
                    torch.nn.init.zeros_(module.bias)
        return model
    model.eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ("norm" in perturb and "norm" in n) or ("bias" in perturb and n.endswith("bias")):
                p.add_(0.1 * torch.randn_like(p))
    return model


def batch(b: int = 3, n: int = 9, vocab: int = 128, seed: int = 1, *, low: int = 0, left: bool = True, pads=(3, 1)):
    """ids (B, N) in [low, vocab) and a bool mask with padding (left or right) of pads[i] tokens in row i + 1."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(low, vocab, (b, n), generator=g)
    mask = torch.ones(b, n, dtype=torch.bool)
    for row, pad in zip(range(1, b), pads):
        if left:
            mask[row, :pad] = False
        else:
            mask[row, n - pad:] = False
    return ids, mask


def hf_batch(seed: int = 1, b: int = 3, n: int = 9, left: bool = True):
    """input_ids [b, n] in [3, V) and a 0/1 attention mask with b - 1 padded rows (left or right
    padding; padded ids 0), for the transformers models."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, V, (b, n), generator=g)
    mask = torch.ones(b, n, dtype=torch.long)
    for row, pad in zip(range(1, b), (3, 5, 1, 2)):
        if left:
            mask[row, :pad] = 0
        else:
            mask[row, n - pad:] = 0
    return ids.masked_fill(mask == 0, 0), mask


def prompts(name: str, padded: bool, b: int = 3, n: int = 7) -> tuple[torch.Tensor, torch.Tensor]:
    """Random ids (b, n) in [3, 96) and their mask for the generation tests: decoders left-padded,
    seq2seq sources right-padded."""
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


def run(model, ids: torch.Tensor, mask: torch.Tensor, **kw) -> torch.Tensor:
    """Logits of a decoder / encoder (ids, mask) or of a seq2seq (source ids, mask; fixed decoder ids)."""
    if model.config.arch == "encoder-decoder":
        dec = torch.arange(5).remainder(model.config.vocab_size).expand(ids.shape[0], 5)
        return model(ids, attention_mask=mask, decoder_input_ids=dec, **kw).logits
    return model(ids, attention_mask=mask, **kw).logits


def randomize(model, pattern: str = "lora_", std: float = 0.1, seed: int = 5) -> None:
    """Fills the parameters whose name contains `pattern` with N(0, std) (an adapter that does something)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if pattern in n:
                p.copy_(torch.randn(p.shape, generator=g) * std)


def assert_close(a: torch.Tensor, b: torch.Tensor, rel: float = 1e-5) -> None:
    """max |a - b| <= rel · max(1, max |b|): float32 rounding, measured against the tensor's scale."""
    a, b = a.detach(), b.detach()
    err, scale = float((a - b).abs().max()), max(1.0, float(b.abs().max()))
    assert err <= rel * scale, f"max abs difference {err:.3g} > {rel:g} x scale {scale:.3g}"
