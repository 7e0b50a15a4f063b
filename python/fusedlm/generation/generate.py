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
import inspect
import warnings

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


# transformers' generate arguments fusedlm does not implement: refused by name rather than passed
# on to the model as unexpected keywords
UNSUPPORTED = frozenset((
    "min_length", "max_time", "stop_strings", "typical_p", "epsilon_cutoff", "eta_cutoff", "min_p", "top_h",
    "diversity_penalty", "num_beam_groups", "encoder_repetition_penalty", "encoder_no_repeat_ngram_size",
    "bad_words_ids", "force_words_ids", "constraints", "renormalize_logits", "forced_bos_token_id", "forced_eos_token_id",
    "remove_invalid_values", "exponential_decay_length_penalty", "suppress_tokens", "begin_suppress_tokens",
    "sequence_bias", "token_healing", "guidance_scale", "low_memory", "watermarking_config", "dola_layers",
    "output_attentions", "output_hidden_states", "output_logits", "logits_processor", "stopping_criteria",
    "prefix_allowed_tokens_fn", "synced_gpus", "assistant_model", "streamer", "negative_prompt_ids",
    "negative_prompt_attention_mask", "generation_config", "cache_implementation", "cache_config",
    "prompt_lookup_num_tokens", "max_matching_ngram_size", "num_assistant_tokens", "assistant_confidence_threshold",
    "past_key_values", "decoder_start_token_id", "bos_token_id", "use_model_defaults", "custom_generate", "tokenizer",
))
# what generate gives the model on every call: not the caller's to set
_PER_STEP = frozenset(("input_ids", "inputs_embeds", "attention_mask", "position_ids", "labels", "cache", "last_logits_only",
                       "return_logits", "output_hidden_states", "decoder_input_ids", "decoder_inputs_embeds",
                       "decoder_attention_mask", "encoder_out"))
_ROUTING = ("adapter_ids", "task_ids")  # taken by the forward pre-hook PEFT methods install (peft.routing)


def _check_model_kwargs(model, model_kwargs: dict) -> None:
    """TypeError naming each keyword that neither generate nor the model takes."""
    unsupported = sorted(k for k in model_kwargs if k in UNSUPPORTED)
    if unsupported:
        raise TypeError(f"generate() does not support transformers' argument(s) {unsupported} (fusedlm implements: "
                        "max_new_tokens / max_length, min_new_tokens, do_sample, temperature, top_k, top_p, num_beams, "
                        "length_penalty, early_stopping, num_return_sequences, penalty_alpha, repetition_penalty, "
                        "no_repeat_ngram_size, eos_token_id, pad_token_id, use_cache, output_scores, return_dict_in_generate)")
    reserved = sorted(k for k in model_kwargs if k in _PER_STEP)
    if reserved:
        raise TypeError(f"generate() sets {reserved} on every model call itself (pass the prompt's attention_mask as "
                        "generate's own argument)")
    inner = model
    while isinstance(getattr(inner, "model", None), torch.nn.Module) and any(
            p.kind == p.VAR_KEYWORD for p in inspect.signature(type(inner).forward).parameters.values()):
        inner = inner.model  # a wrapper (PromptModel) passes keywords on to the model it wraps
    params = inspect.signature(type(inner).forward).parameters
    if any(p.kind == p.VAR_KEYWORD for p in params.values()):
        return
    unknown = sorted(k for k in model_kwargs if k not in params and k not in _ROUTING)
    if unknown:
        raise TypeError(f"generate() got unexpected keyword argument(s) {unknown}: neither generate's nor "
                        f"{type(inner).__name__}.forward's")


def _check_lengths(model, cfg, seq2seq: bool, input_ids: torch.Tensor, max_new_tokens: int) -> None:
    """The generated sequence must fit the model's max_seq_len positions (its KV cache is allocated
    for the whole length up front), checked before any work."""
    n = input_ids.shape[1]
    virtual = getattr(model, "n_virtual_tokens", 0) if not seq2seq and not getattr(model, "peft_disabled", False) else 0
    if seq2seq:
        if cfg.positions in ("learned", "sinusoidal") and n > cfg.max_seq_len:
            raise ValueError(f"input_ids has {n} source tokens, more than the model's max_seq_len={cfg.max_seq_len}")
        total, what = 1 + max_new_tokens, "the decoder start token"
    else:
        total, what = n + virtual + max_new_tokens, f"the prompt's {n} tokens" + (f" and {virtual} virtual tokens" if virtual else "")
    if total > cfg.max_seq_len:
        raise ValueError(f"max_new_tokens={max_new_tokens} after {what} makes {total} positions, more than the model's "
                         f"max_seq_len={cfg.max_seq_len}: lower max_new_tokens (or max_length) to at most "
                         f"{max_new_tokens - (total - cfg.max_seq_len)}")


@torch.no_grad()
def generate(model, input_ids: torch.Tensor, *, attention_mask: torch.Tensor | None = None, max_new_tokens: int | None = None,
             min_new_tokens: int = 0, do_sample: bool = False, temperature=1.0, top_k=0, top_p=1.0, num_beams: int = 1,
             length_penalty: float = 1.0, early_stopping: bool | str = False, num_return_sequences: int = 1,
             penalty_alpha: float = 0.0, repetition_penalty: float = 1.0, no_repeat_ngram_size: int = 0,
             eos_token_id: int | list[int] | None = None, pad_token_id: int | None = None,
             generator: torch.Generator | None = None, output_scores: bool = False, max_length: int | None = None,
             use_cache: bool = True, return_dict_in_generate: bool = False, **model_kwargs):
    """Generates from a DecoderLM (returns prompt + continuation, (B * num_return_sequences, N + T))
    or a Seq2SeqLM (returns the decoder ids, decoder_start_token_id first, (B * nrs, 1 + T));
    T <= max_new_tokens (shorter when every sequence has hit an eos id). Rows finished early are
    filled with pad_token_id (beam search: as transformers, pad unless it is 0, else eos[0]).

    Args:
        input_ids: LongTensor (B, N), a decoder's prompt (left-padded) or a seq2seq's source.
        attention_mask: (B, N) 1/True = real token. None: every token is real, except (decoders,
            as transformers infers it) the pad_token_id ones when pad_token_id is in input_ids and
            is not an eos id.
        max_new_tokens (>= 1; default 20): the prompt plus them must fit config.max_seq_len (checked
            before any work). max_length: transformers' total length instead (a decoder's prompt
            plus new tokens; a seq2seq's decoder ids, start token included); max_new_tokens wins
            when both are given, as in transformers. min_new_tokens (>= 0: eos ids banned before
            that many new tokens).
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
            scores in beam search) instead of the ids. return_dict_in_generate: return a
            :class:`GenerateOutput` (scores only with output_scores). use_cache: accepted for
            transformers' callers; fusedlm always decodes with its KV cache (False gives the same
            tokens in transformers, so the result is the same).
        **model_kwargs: passed to every model call (``adapter_ids`` / ``task_ids`` of a mixed PEFT
            batch, ``prefix_len``, ...); tensors with a leading batch dimension B follow the rows
            (repeated for beams / return sequences / candidates). The KV cache is the model's
            ``new_cache``: a prefix-tuned model's holds its prefix keys/values.

    Raises ValueError (naming the argument) before any work for out-of-range values (eos / pad ids
    and a contrastive top_k must lie in the vocabulary, a NaN / inf length penalty, a length past
    max_seq_len), a mask of the wrong shape, num_return_sequences > num_beams, beam sampling
    (do_sample with num_beams > 1: not supported); TypeError for a keyword that neither generate
    nor the model takes (transformers' arguments fusedlm does not implement are named).
    """
    seq2seq = is_seq2seq(model)
    cfg = model.config
    if not isinstance(input_ids, torch.Tensor) or input_ids.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"input_ids must be an int64 tensor, got {getattr(input_ids, 'dtype', type(input_ids).__name__)}")
    if input_ids.dim() != 2 or input_ids.shape[1] == 0 or input_ids.shape[0] == 0:
        raise ValueError(f"input_ids must have shape [B, N] with B, N >= 1, got {list(input_ids.shape)}")
    input_ids = input_ids.long()
    b, vocab = input_ids.shape[0], cfg.vocab_size
    if int(input_ids.min()) < 0 or int(input_ids.max()) >= vocab:
        raise ValueError(f"input_ids must be ids of the vocabulary, in [0, {vocab}), got values in "
                         f"[{int(input_ids.min())}, {int(input_ids.max())}]")
    _check_model_kwargs(model, model_kwargs)
    for name, flag in (("do_sample", do_sample), ("output_scores", output_scores), ("use_cache", use_cache),
                       ("return_dict_in_generate", return_dict_in_generate)):
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be a bool, got {flag!r}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    if max_new_tokens is None:
        if max_length is None:
            max_new_tokens = 20
        else:
            check.integer("max_length", max_length, low=1)
            used = 1 if seq2seq else input_ids.shape[1]
            if max_length <= used:
                raise ValueError(f"max_length={max_length} leaves no room for a new token after "
                                 + ("the decoder start token" if seq2seq else f"the prompt's {used} tokens")
                                 + " (max_length counts them; or pass max_new_tokens)")
            max_new_tokens = max_length - used
    elif max_length is not None:
        check.integer("max_length", max_length, low=1)
        warnings.warn(f"both max_new_tokens ({max_new_tokens}) and max_length ({max_length}) are set: max_new_tokens "
                      "takes precedence, as in transformers", stacklevel=2)
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
    if contrastive and (isinstance(top_k, torch.Tensor) or not 2 <= top_k <= vocab):
        raise ValueError(f"contrastive search (penalty_alpha > 0) needs an int top_k of candidates in [2, {vocab}] "
                         f"(the vocabulary), got {top_k!r}")
    _check_lengths(model, cfg, seq2seq, input_ids, max_new_tokens)

    if eos_token_id is None:  # the config's: ids outside the vocabulary can never be generated, so they stop nothing
        eos_list = None if cfg.eos_token_id is None else [
            i for i in check.token_ids("model.config.eos_token_id", cfg.eos_token_id, single=True) if i < vocab]
    else:
        eos_list = check.token_ids("eos_token_id", eos_token_id, single=True)
        if eos_list and max(eos_list) >= vocab:
            raise ValueError(f"eos_token_id must be ids of the vocabulary, in [0, {vocab}), got {max(eos_list)}")
    eos = torch.tensor(eos_list, dtype=torch.long, device=input_ids.device) if eos_list else None
    if pad_token_id is not None:
        check.token_id("pad_token_id", pad_token_id)
        if pad_token_id >= vocab:
            raise ValueError(f"pad_token_id must be an id of the vocabulary, in [0, {vocab}), got {pad_token_id}")
    pad = cfg.pad_token_id if pad_token_id is None else pad_token_id
    if pad is None and eos_list:
        pad = eos_list[0]
    if pad is not None and pad >= vocab and eos_list:  # finished rows are fed pad: it must be a token of the model
        raise ValueError(f"model.config.pad_token_id={pad} is outside the vocabulary [0, {vocab}): pass pad_token_id=")

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
    if output_scores or return_dict_in_generate:
        return GenerateOutput(sequences=ids, scores=scores if output_scores else None, sequence_scores=seq_scores)
    return ids
