"""Model layer on the CPU: a small LLaMA-shaped model (8 layers, d=512, 8 heads, d_ff=1408,
vocab 32000, fp32) in fusedlm (DecoderLM on fusedlm.ops.attention) vs the same weights in
transformers' LlamaForCausalLM with attn_implementation="sdpa", batch 1.

Cases: prefill of a 512-token prompt (filling a KV cache; logits of the last position only, as
generation needs: fusedlm's last_logits_only, transformers' logits_to_keep=1), and greedy decoding
of new tokens after that prompt (one token per step, argmax, the cache reset to the prompt between repeats;
extra: tokens/s). Implementations are timed in alternating rounds (see _interleaved). ``--full`` adds 1024/2048-token prompts and 128 decode steps.
"""
from __future__ import annotations

import statistics
import tempfile

import torch

from ._harness import Row, timeit

SUITE = "models"
SHAPE = dict(d_model=512, n_layers=8, n_heads=8, n_kv_heads=8, d_ff=1408, vocab_size=32000, max_seq_len=4096)


def _models():
    """fusedlm's DecoderLM and, if transformers is installed, its LlamaForCausalLM on the same weights."""
    from fusedlm.interop import hf
    from fusedlm.models import DecoderLM, get_config

    torch.manual_seed(0)
    ours = DecoderLM(get_config("llama-7b", **SHAPE)).eval()
    try:
        import transformers
    except ImportError:
        return ours, None
    transformers.utils.logging.disable_progress_bar()  # `fusedlm bench` prints only its tables
    with tempfile.TemporaryDirectory() as path:
        hf.save_pretrained(ours, path)
        peer = transformers.LlamaForCausalLM.from_pretrained(path, attn_implementation="sdpa", dtype=torch.float32).eval()
    return ours, peer


def _fusedlm_fns(model, prompt, n_new):
    n = prompt.shape[1]
    cache = model.new_cache(1, n + n_new)

    def prefill():
        cache.truncate(0)
        return model(prompt, cache=cache, last_logits_only=True).logits

    last = prefill()[:, -1:].argmax(-1)

    def decode():
        cache.truncate(n)
        tokens = [last]
        for _ in range(n_new):
            tokens.append(model(tokens[-1], cache=cache).logits[:, -1:].argmax(-1))  # (1, 1)
        return torch.cat(tokens, dim=1)

    return prefill, decode


def _hf_fns(model, prompt, n_new):
    import inspect

    from transformers import DynamicCache

    n = prompt.shape[1]
    state = {}
    # transformers 5 renamed past_key_values to cache
    kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"

    def prefill():
        state["cache"] = DynamicCache(config=model.config)
        return model(prompt, use_cache=True, logits_to_keep=1, **{kw: state["cache"]}).logits

    last = prefill()[:, -1:].argmax(-1)

    def decode():
        cache = state["cache"]
        extra = cache.get_seq_length() - n
        if extra:
            cache.crop(-extra)  # back to the prompt
        tokens = [last]
        for i in range(n_new):
            pos = torch.tensor([[n + i]])
            tokens.append(model(tokens[-1], use_cache=True, position_ids=pos, **{kw: cache}).logits[:, -1:].argmax(-1))
        return torch.cat(tokens, dim=1)

    return prefill, decode


def _interleaved(fns: dict, rounds: int) -> dict:
    """Median ms of each fn, timed in alternating rounds (A, B, A, B, ...) so that a change in
    the machine's load during the run hits every implementation alike; per fn, the median of its
    per-round medians."""
    times = {name: [] for name in fns}
    for r in range(rounds):
        for name, fn in fns.items():
            times[name].append(timeit(fn, warmup=1 if r == 0 else 0, min_repeat=3, min_seconds=0.0))
    return {name: statistics.median(t) for name, t in times.items()}


@torch.inference_mode()
def run(full: bool = False) -> list[Row]:
    ours, peer = _models()
    if peer is None:
        print("transformers not installed: peer skipped")
    rows = []
    prompts, n_new = ((512, 1024, 2048), 128) if full else ((512,), 32)
    for n in prompts:
        prompt = torch.randint(0, SHAPE["vocab_size"], (1, n), generator=torch.Generator().manual_seed(n))
        impls = {"fusedlm[cpu]": _fusedlm_fns(ours, prompt, n_new)}
        if peer is not None:
            impls["transformers sdpa"] = _hf_fns(peer, prompt, n_new)
        prefill = _interleaved({name: fns[0] for name, fns in impls.items()}, rounds=3)
        for name, ms in prefill.items():
            rows.append(Row(SUITE, f"prefill {n} tok, llama 8L d512 fp32", name, ms, {"tok_per_s": n / ms * 1e3}))
        for fns in impls.values():
            fns[0]()  # fill the cache with the prompt
        decode = _interleaved({name: fns[1] for name, fns in impls.items()}, rounds=2)
        for name, ms in decode.items():
            rows.append(Row(SUITE, f"greedy decode {n_new} tok after {n}, llama 8L d512 fp32", name, ms, {"tok_per_s": n_new / ms * 1e3}))
    return rows
