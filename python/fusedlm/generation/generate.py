"""generate(): transformers' generate for fusedlm's DecoderLM and Seq2SeqLM.

    from fusedlm import generation
    ids = generation.generate(model, ids, attention_mask=mask, max_new_tokens=20)              # greedy
    ids = generation.generate(model, ids, do_sample=True, temperature=0.7, top_k=50, top_p=0.9)
    ids = generation.generate(model, ids, num_beams=4, length_penalty=0.6, early_stopping=True)
    ids = generation.generate(model, ids, penalty_alpha=0.6, top_k=4)                          # contrastive
    out = generation.generate(model, ids, num_beams=4, output_scores=True)  # .sequences .scores .sequence_scores

The strategy follows transformers' rule: num_beams > 1 -> beam search; else do_sample -> sampling;
else penalty_alpha > 0 -> contrastive search; else greedy. Argument names and meanings are
transformers' (see :func:`generate`), with two differences of defaults: top_k=0 (off; transformers
samples with top_k=50 unless told otherwise) and temperature=0 allowed (that row greedy).
"""
from __future__ import annotations

import dataclasses

import torch

from .. import _validate as check
from .beam import beam_search
from .contrastive import contrastive_search
from .sampling import greedy_or_sample
from .processors import Processors
from .step import ModelStep, is_seq2seq


@dataclasses.dataclass
class GenerateOutput:
    """sequences: the ids generate returns; scores: per generated position, the processed scores
    (R, V) the token was chosen from (sampling: after temperature / top-k / top-p, -inf outside;
    beam search: log-probabilities of every beam, B * num_beams rows); sequence_scores (beam
    search): each returned hypothesis' length-penalised sum of log-probabilities."""

    sequences: torch.Tensor
    scores: tuple[torch.Tensor, ...] | None = None
    sequence_scores: torch.Tensor | None = None


@torch.no_grad()
def generate(model, input_ids: torch.Tensor, *, attention_mask: torch.Tensor | None = None, max_new_tokens: int = 20,
             min_new_tokens: int = 0, do_sample: bool = False, temperature=1.0, top_k=0, top_p=1.0, num_beams: int = 1,
             length_penalty: float = 1.0, early_stopping: bool | str = False, num_return_sequences: int = 1,
             penalty_alpha: float = 0.0, repetition_penalty: float = 1.0, no_repeat_ngram_size: int = 0,
             eos_token_id: int | list[int] | None = None, pad_token_id: int | None = None,
             generator: torch.Generator | None = None, output_scores: bool = False, **model_kwargs):
    """Generates from a DecoderLM (returns prompt + continuation, (B * num_return_sequences, N + T))
    or a Seq2SeqLM (returns the decoder ids, decoder_start_token_id first, (B * nrs, 1 + T));
    T <= max_new_tokens (shorter when every sequence has hit an eos id). Rows finished early are
    filled with pad_token_id (beam search: as transformers, pad unless it is 0, else eos[0]).

    Args:
        input_ids: LongTensor (B, N), a decoder's prompt (left-padded) or a seq2seq's source.
        attention_mask: (B, N) 1/True = real token. None: every token is real, except (decoders,
            as transformers infers it) the pad_token_id ones when pad_token_id is in input_ids and
            is not an eos id.
        max_new_tokens (>= 1), min_new_tokens (>= 0: eos ids banned before that many new tokens).
        do_sample, temperature (>= 0), top_k (>= 0, 0 = off), top_p (in (0, 1]): sampling through
            ``ops.sample``, in that order; each a scalar or a per-prompt tensor [B].
        num_beams, length_penalty, early_stopping (True | False | "never"), num_return_sequences
            (<= num_beams in beam search; > 1 without beams needs do_sample): beam search.
        penalty_alpha (in [0, 1]) with top_k > 1 candidates: contrastive search.
        repetition_penalty (> 0), no_repeat_ngram_size (>= 0): transformers' processors.
        eos_token_id: int or list (None: model.config.eos_token_id; [] = none).
        pad_token_id: None: model.config.pad_token_id, else eos_token_id[0].
        generator: the torch.Generator sampling draws from (one seed per step).
        output_scores: return a :class:`GenerateOutput` with the per-step scores (and sequence
            scores in beam search) instead of the ids.
        **model_kwargs: passed to every model call (``adapter_ids`` / ``task_ids`` of a mixed PEFT
            batch, ``prefix_len``, ...); tensors with a leading batch dimension B follow the rows
            (repeated for beams / return sequences / candidates). The KV cache is the model's
            ``new_cache``: a prefix-tuned model's holds its prefix keys/values.

    Raises ValueError (naming the argument) for out-of-range values, a mask of the wrong shape,
    num_return_sequences > num_beams, beam sampling (do_sample with num_beams > 1: not supported).
    """
    seq2seq = is_seq2seq(model)
    cfg = model.config
    if not isinstance(input_ids, torch.Tensor) or input_ids.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"input_ids must be an int64 tensor, got {getattr(input_ids, 'dtype', type(input_ids).__name__)}")
    if input_ids.dim() != 2 or input_ids.shape[1] == 0 or input_ids.shape[0] == 0:
        raise ValueError(f"input_ids must have shape [B, N] with B, N >= 1, got {list(input_ids.shape)}")
    input_ids = input_ids.long()
    b = input_ids.shape[0]
    if attention_mask is not None and (not isinstance(attention_mask, torch.Tensor) or tuple(attention_mask.shape) != tuple(input_ids.shape)):
        got = list(attention_mask.shape) if isinstance(attention_mask, torch.Tensor) else type(attention_mask).__name__
        raise ValueError(f"attention_mask must have the shape of input_ids {list(input_ids.shape)}, got {got}")
    check.integer("max_new_tokens", max_new_tokens, low=1)
    check.integer("min_new_tokens", min_new_tokens, low=0)
    check.integer("num_beams", num_beams, low=1)
    check.integer("num_return_sequences", num_return_sequences, low=1)
    check.integer("no_repeat_ngram_size", no_repeat_ngram_size, low=0)
    check.choice("early_stopping", early_stopping, (True, False, "never"))
    check.number("length_penalty", length_penalty)
    check.number("repetition_penalty", repetition_penalty, low=0, low_open=True)
    check.probability("penalty_alpha", penalty_alpha)
    check.per_row("temperature", temperature, b, lambda t: torch.isfinite(t) & (t >= 0), "finite and >= 0 (0 = greedy)")
    check.per_row("top_p", top_p, b, lambda t: (t > 0) & (t <= 1), "in (0, 1] (1 = off)")
    check.per_row("top_k", top_k, b, lambda t: t >= 0, "an integer >= 0 (0 = off)", integral=True)
    if num_beams > 1 and do_sample:
        raise ValueError("do_sample=True with num_beams > 1 (beam sampling) is not supported: use one of them")
    if num_beams > 1 and num_return_sequences > num_beams:
        raise ValueError(f"num_return_sequences ({num_return_sequences}) must be <= num_beams ({num_beams})")
    if num_beams == 1 and not do_sample and num_return_sequences > 1:
        raise ValueError(f"num_return_sequences={num_return_sequences} needs do_sample=True or num_beams >= it "
                         "(greedy and contrastive search return one sequence per prompt)")
    contrastive = num_beams == 1 and not do_sample and penalty_alpha > 0
    if contrastive and (isinstance(top_k, torch.Tensor) or top_k < 2):
        raise ValueError(f"contrastive search (penalty_alpha > 0) needs an int top_k >= 2 candidates, got {top_k!r}")

    eos = cfg.eos_token_id if eos_token_id is None else eos_token_id
    eos_list = None if eos is None else check.token_ids("eos_token_id", eos, single=True)
    eos = torch.tensor(eos_list, dtype=torch.long, device=input_ids.device) if eos_list else None
    if pad_token_id is not None:
        check.token_id("pad_token_id", pad_token_id)
    pad = cfg.pad_token_id if pad_token_id is None else pad_token_id
    if pad is None and eos_list:
        pad = eos_list[0]

    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids, dtype=torch.bool)
        if not seq2seq and pad is not None and (eos_list is None or pad not in eos_list) and bool((input_ids == pad).any()):
            attention_mask = input_ids != pad
    attention_mask = attention_mask.bool()

    if seq2seq:
        start = cfg.decoder_start_token_id if cfg.decoder_start_token_id is not None else cfg.bos_token_id
        if start is None:
            raise ValueError("a Seq2SeqLM needs config.decoder_start_token_id (or bos_token_id) to generate")
        prompt = torch.full((b, 1), start, dtype=torch.long, device=input_ids.device)
        skip = None  # transformers skips only the decoder's own padding (a decoder_attention_mask)
    else:
        start, prompt = None, input_ids
        skip = attention_mask.int().argmax(1) if not bool(attention_mask.all()) else None  # leading pads
    processors = Processors(prompt_len=prompt.shape[1], eos=eos, repetition_penalty=float(repetition_penalty),
                            no_repeat_ngram_size=no_repeat_ngram_size, min_new_tokens=min_new_tokens, skip=skip)
    step = ModelStep(model, input_ids, attention_mask, max_new_tokens, model_kwargs, decoder_start_token_id=start)

    common = dict(max_new_tokens=max_new_tokens, processors=processors, eos=eos, pad=pad)
    seq_scores = None
    if num_beams > 1:
        ids, scores, seq_scores = beam_search(step, prompt, num_beams=num_beams, length_penalty=float(length_penalty),
                                              early_stopping=early_stopping, num_return_sequences=num_return_sequences,
                                              output_scores=output_scores, **common)
    elif contrastive:
        context_mask = torch.ones_like(prompt, dtype=torch.bool) if seq2seq else attention_mask
        ids, scores = contrastive_search(step, prompt, context_mask, penalty_alpha=float(penalty_alpha), top_k=top_k,
                                         output_scores=output_scores, **common)
    else:
        per_row = [v.repeat_interleave(num_return_sequences) if isinstance(v, torch.Tensor) else v
                   for v in (temperature, top_k, top_p)]
        ids, scores = greedy_or_sample(step, prompt, do_sample=do_sample, temperature=per_row[0], top_k=per_row[1],
                                       top_p=per_row[2], generator=generator, num_return_sequences=num_return_sequences,
                                       output_scores=output_scores, **common)
    if output_scores:
        return GenerateOutput(sequences=ids, scores=scores, sequence_scores=seq_scores)
    return ids
