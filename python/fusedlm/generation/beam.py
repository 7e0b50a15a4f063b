"""Beam search, batched, with transformers' scoring and stopping rules (5.x, vectorised form).

Per batch item, `num_beams` running hypotheses and `num_beams` finished ones. Each step:

1. log-softmax (float32) of every running beam's next-token logits, processed, plus the beam's
   running sum: (B, num_beams * V) candidates; the top K = max(2, 1 + n_eos) * num_beams of them.
2. Candidates that end in an eos id (or reach max_length) are finished: only those among the top
   num_beams may enter the finished set, scored ``sum_logprobs / generated_len ** length_penalty``
   (generated_len counts the new token, not the prompt); the set keeps its best num_beams.
3. The best num_beams unfinished candidates run on; the KV cache is reordered to their beams.
4. Stop when no running beam can beat the worst finished one (early_stopping=False: estimated at
   the current length; "never": at max_length when length_penalty > 0), when every batch item
   has num_beams finished hypotheses (early_stopping=True), or at max_length.

-1e9 marks the impossible, as in transformers, so the arithmetic (and its ties) is the same.
"""
from __future__ import annotations

import torch

from .sequences import expand
from .processors import Processors
from .step import ModelStep

NEG = -1.0e9


def _gather(t: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """t (B, K, ...) -> (B, K', ...): the rows index (B, K') of each batch item."""
    while index.dim() < t.dim():
        index = index.unsqueeze(-1)
    return torch.take_along_dim(t, index, dim=1)


def beam_search(step: ModelStep, prompt: torch.Tensor, *, max_new_tokens: int, processors: Processors,
                eos: torch.Tensor | None, pad: int | None, num_beams: int, length_penalty: float,
                early_stopping, num_return_sequences: int, output_scores: bool):
    """prompt (B, N). Returns (ids (B * num_return_sequences, N + generated), per-step scores
    (log-probs after the processors, (B * num_beams, V) each) or None, sequence scores (B * nrs,))."""
    b, n = prompt.shape
    dev = prompt.device
    max_length = n + max_new_tokens
    n_eos = 0 if eos is None else eos.numel()
    keep = max(2, 1 + n_eos) * num_beams
    top_beams = torch.arange(keep, device=dev) < num_beams  # the first num_beams of the K candidates
    # transformers' fill for the unused tail: pad (unless it is 0 or None), else eos[0]; -1 without eos
    fill = -1 if eos is None else (pad if pad else int(eos[0]))

    running = torch.full((b, num_beams, max_length), fill, dtype=torch.long, device=dev)
    running[:, :, :n] = prompt[:, None]
    finished = running.clone()
    running_scores = torch.zeros(b, num_beams, device=dev)
    running_scores[:, 1:] = NEG  # only beam 0 is live at first: no duplicate candidates
    finished_scores = torch.full((b, num_beams), NEG, device=dev)
    is_finished = torch.zeros(b, num_beams, dtype=torch.bool, device=dev)
    can_improve = torch.ones(b, 1, dtype=torch.bool, device=dev)
    running_src = torch.full((b, num_beams, max_new_tokens), -1, dtype=torch.long, device=dev)  # flat beam of each token
    finished_src = running_src.clone()
    scores_out = [] if output_scores else None

    logits, _ = step.prefill()  # (B, V)
    index = expand(b, num_beams, dev)
    step.reorder(index)
    logits = logits.index_select(0, index)  # (B * nb, V)
    processors.repeat(num_beams)
    offsets = torch.arange(b, device=dev)[:, None] * num_beams  # flat row of each item's beam 0

    for cur in range(n, max_length):
        t = cur - n
        flat = running[:, :, :cur].reshape(b * num_beams, cur)
        log_probs = processors(torch.log_softmax(logits, dim=-1), flat)  # (B * nb, V)
        if output_scores:
            scores_out.append(log_probs)
        vocab = log_probs.shape[-1]
        total = (log_probs.view(b, num_beams, vocab) + running_scores[:, :, None]).view(b, num_beams * vocab)

        # 1. the top K continuations over all beams of an item
        cand_scores, cand = torch.topk(total, k=keep)  # (B, K)
        cand_beam, cand_token = cand // vocab, cand % vocab
        cand_seqs = _gather(running, cand_beam)  # (B, K, max_length)
        cand_seqs[:, :, cur] = cand_token
        cand_src = _gather(running_src, cand_beam)
        cand_src[:, :, t] = cand_beam + offsets
        hits = cur + 1 >= max_length  # max_length reached: every candidate stops
        ends = torch.isin(cand_token, eos) if eos is not None else torch.zeros_like(cand_token, dtype=torch.bool)
        ends = ends | hits  # (B, K)

        # 3. the best num_beams unfinished candidates run on
        live_scores = cand_scores + ends.float() * NEG
        best = torch.topk(live_scores, k=num_beams)[1]
        running, running_scores, running_src = _gather(cand_seqs, best), _gather(live_scores, best), _gather(cand_src, best)

        # 2. finished candidates among the top num_beams enter the finished set
        just_finished = ends & top_beams[None, :]
        fin_scores = cand_scores / ((cur + 1 - n) ** length_penalty)
        full = is_finished.all(-1, keepdim=True) & (early_stopping is True)
        fin_scores = fin_scores + full.float() * NEG
        fin_scores = fin_scores + (~can_improve).float() * NEG
        fin_scores = fin_scores + (~just_finished) * NEG
        merged = torch.topk(torch.cat([finished_scores, fin_scores], 1), k=num_beams)[1]
        finished = _gather(torch.cat([finished, cand_seqs], 1), merged)
        finished_scores = _gather(torch.cat([finished_scores, fin_scores], 1), merged)
        finished_src = _gather(torch.cat([finished_src, cand_src], 1), merged)
        is_finished = _gather(torch.cat([is_finished, just_finished], 1), merged)

        # 4. can a running beam still beat the worst finished hypothesis?
        length = (max_length if early_stopping == "never" and length_penalty > 0.0 else cur + 1) - n
        best_possible = running_scores[:, :1] / (length**length_penalty)
        worst = torch.where(is_finished, finished_scores.min(1, keepdim=True)[0], NEG)
        can_improve = can_improve & (best_possible > worst).any(-1, keepdim=True)
        if cur + 1 >= max_length:
            break
        go_on = can_improve.any() & ~ends.all()
        if early_stopping is True:
            go_on &= ~is_finished.all()
        if not bool(go_on):  # the one host sync of a step
            break
        step.reorder(running_src[:, :, t].reshape(-1))
        logits, _ = step(running[:, :, cur].reshape(-1, 1))

    ids = finished[:, :num_return_sequences].reshape(b * num_return_sequences, max_length)
    seq_scores = finished_scores[:, :num_return_sequences].reshape(-1)
    src = finished_src[:, :num_return_sequences].reshape(b * num_return_sequences, max_new_tokens)
    generated = int((src >= 0).sum(1).max())
    scores = None if scores_out is None else tuple(scores_out)
    return ids[:, : n + generated], scores, seq_scores
