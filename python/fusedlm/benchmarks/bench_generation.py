"""Decoding strategies on the CPU: fusedlm.generation.generate vs transformers' generate, same weights.

The LLaMA-shaped model of bench_models (8 layers, d=512, 8 heads, d_ff=1408, vocab 32000, fp32;
transformers' LlamaForCausalLM with attn_implementation="sdpa"), a 32-token prompt, no eos (every
call makes exactly the new tokens). Cases: greedy batch 1 and 8, sampling (T 0.7, top-k 50,
top-p 0.9) batch 8, beam search 4 beams batch 1; contrastive search (alpha 0.6, k 4) fusedlm only
(transformers 5 has it no more in its core). Time per generate call, including the prompt; extra:
new tokens/s over the batch. Implementations are timed in alternating rounds.
Quick set: 32 new tokens; ``--full``: 128. Issue #12's target: >= 1.5x transformers for greedy,
sampling and beam search.
"""
from __future__ import annotations

import torch

from ._harness import Row
from .bench_models import SHAPE, _interleaved, _models

SUITE = "generation"
PROMPT = 32
CASES = {  # name: (batch, generate kwargs)
    "greedy b1": (1, dict()),
    "greedy b8": (8, dict()),
    "sample T.7 k50 p.9 b8": (8, dict(do_sample=True, temperature=0.7, top_k=50, top_p=0.9)),
    "beam 4 b1": (1, dict(num_beams=4)),
    "contrastive a.6 k4 b1": (1, dict(penalty_alpha=0.6, top_k=4)),
}


@torch.inference_mode()
def run(full: bool = False) -> list[Row]:
    from fusedlm.generation import generate

    ours, peer = _models()
    if peer is None:
        print("transformers not installed: peer skipped")
    else:
        peer.generation_config.eos_token_id = None  # no early stop on either side
    n_new = 128 if full else 32
    rows = []
    for case, (b, kw) in CASES.items():
        ids = torch.randint(3, SHAPE["vocab_size"], (b, PROMPT), generator=torch.Generator().manual_seed(b))
        impls = {"fusedlm": lambda: generate(ours, ids, max_new_tokens=n_new, eos_token_id=[], pad_token_id=0, **kw)}
        if peer is not None and "penalty_alpha" not in kw:
            impls["transformers generate"] = lambda: peer.generate(ids, max_new_tokens=n_new, pad_token_id=0,
                                                                   **{"do_sample": False, **kw})
        if "do_sample" not in kw and len(impls) == 2:  # same tokens, or the comparison is void
            got, want = impls["fusedlm"](), impls["transformers generate"]()
            if got.tolist() != want.tolist():
                print(f"  warning: {case}: fusedlm and transformers generated different tokens")
        for name, ms in _interleaved(impls, rounds=3).items():
            rows.append(Row(SUITE, f"{case}, {PROMPT}+{n_new} tok, llama 8L d512 fp32", name, ms,
                            {"new_tok_per_s": b * n_new / ms * 1e3}))
    return rows
