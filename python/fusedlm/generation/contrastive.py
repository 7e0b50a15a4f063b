"""Contrastive search (Su et al. 2022), as transformers 4.55.4 ran it in its core.

Each step takes the top-k tokens v of the processed next-token distribution p and runs all B*k of
them as one batched step on the cache (expanded to k rows per sequence), then keeps per sequence

    argmax_v  (1 - alpha) * p(v) - alpha * max_j cos(h_v, h_j)

where h_v is the candidate's last hidden state and h_j those of the context (prompt + generated,
padding excluded). The chosen candidate's cache rows and logits are the next step's.
"""
from __future__ import annotations

import torch

from .sequences import Sequences, expand
from .processors import Processors
from .step import ModelStep


def degeneration_penalty(context: torch.Tensor, candidates: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """max_j cos(candidates[r], context[r, j]) over the real positions j (mask (R, S) True):
    context (R, S, d), candidates (R, d) -> (R,)."""
    ctx = context / context.norm(dim=-1, keepdim=True)
    cand = candidates / candidates.norm(dim=-1, keepdim=True)
    cos = torch.matmul(ctx, cand[:, :, None]).squeeze(-1)  # (R, S)
    return cos.masked_fill(~mask, torch.finfo(cos.dtype).min).max(-1).values


def contrastive_search(step: ModelStep, prompt: torch.Tensor, prompt_mask: torch.Tensor, *, max_new_tokens: int,
                       processors: Processors, eos: torch.Tensor | None, pad: int | None, penalty_alpha: float,
                       top_k: int, output_scores: bool):
    """prompt (B, N) and its mask (the context positions the penalty looks at). Returns (ids
    (B, N + new), per-step processed scores or None)."""
    b = prompt.shape[0]
    dev = prompt.device
    logits, context = step.prefill()  # (B, V), (B, S, d)
    mask = prompt_mask.bool()  # (B, S)
    seqs = Sequences(prompt, max_new_tokens, eos, pad)
    scores_out = [] if output_scores else None
    rows = torch.arange(b, device=dev)
    for t in range(max_new_tokens):
        scores = processors(logits, seqs.so_far())  # (B, V)
        if output_scores:
            scores_out.append(scores)
        probs, cand = torch.topk(scores.softmax(-1), k=top_k)  # (B, k)
        step.reorder(expand(b, top_k, dev))  # every sequence -> k candidate rows
        cand_logits, cand_hidden = step(cand.reshape(-1, 1))  # (B*k, V), (B*k, 1, d)
        penalty = degeneration_penalty(context.repeat_interleave(top_k, 0), cand_hidden[:, -1],
                                       mask.repeat_interleave(top_k, 0)).view(b, top_k)
        chosen = ((1.0 - penalty_alpha) * probs - penalty_alpha * penalty).max(-1).indices  # (B,)
        picked = rows * top_k + chosen
        step.reorder(picked)
        logits = cand_logits.index_select(0, picked)
        context = torch.cat([context, cand_hidden.index_select(0, picked)], dim=1)
        mask = torch.cat([mask, mask.new_ones(b, 1)], dim=1)
        seqs.push(cand[rows, chosen])
        if seqs.all_done():
            break
    ids = seqs.result()
    return ids, None if scores_out is None else tuple(scores_out[: ids.shape[1] - seqs.prompt_len])
