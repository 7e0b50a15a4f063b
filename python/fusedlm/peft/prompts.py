"""Prompt tuning, P-tuning and prefix tuning: virtual tokens in front of the real ones, peft's way.

    pm = peft.apply_prompt_tuning(model, n_virtual_tokens=20)                  # or init_token_ids=[...]
    pm = peft.apply_p_tuning(model, n_virtual_tokens=20, encoder="LSTM")
    pm = peft.apply_prefix_tuning(model, n_virtual_tokens=20, projection=True)
    out = pm(ids, attention_mask=mask, labels=labels)      # out.logits (B, N, V): real positions only

Each returns a :class:`PromptModel` wrapping the (frozen) model; the base model files know nothing of
it. Prompt tuning and P-tuning make ``n_virtual_tokens`` embeddings (B, P, d) that enter through
``inputs_embeds`` before the tokens' own embeddings (``model.embed``); the attention mask gets P ones
in front, labels P times -100. Prefix tuning makes per-layer keys/values (B, Hkv, P, D) that enter
through a KV cache holding them (``model.new_cache(..., prefix_kv=...)``): every query sees them,
and they count as P past tokens. In both,
real tokens' positions start at P, as in peft; a pad-aware model (left padding) counts real
tokens only, so a left-padded row equals the row alone. (peft drops ``position_ids`` for prompt
tuning / P-tuning, so its left-padded rows shift by their padding; pass ``position_ids`` here to
reproduce that: they are offset by P.) The returned logits and hidden states cover the real tokens
only (the virtual positions are cut off), so they line up with ``input_ids`` and ``labels``.

Encoder-decoders follow peft's SEQ_2_SEQ_LM: prompt tuning / P-tuning prepend to the encoder input
(the tables hold 2P rows, ``num_transformer_submodules=2``; the first P are used); prefix tuning
feeds decoder self-attention only (peft replaces the cross-attention cache by an empty one), and
decoder layer i reads the prefix slot (2i mod L) of the L = config.n_layers slots: peft duplicates
the 2L key/value tensors and regroups them four at a time. Kept as is for file compatibility.

Generation: the wrapper's :meth:`new_cache` holds the prefix keys/values (prefix tuning) or has
room for the P virtual tokens the first call puts in (prompt tuning, P-tuning); calls on a cache
that holds tokens pass through, so ``fusedlm.generation.generate(pm, ids, ...)`` runs on it unchanged.

Shapes and names mirror peft's modules (their state dicts load one into the other):
``PromptEmbedding.embedding`` (T, d); P-tuning's ``PromptEncoder``: ``embedding`` (T, d) then
``mlp_head`` Linear(d, h)-ReLU-Linear(h, h)-ReLU-Linear(h, d), or ``lstm_head`` (bidirectional,
``num_layers``) then ``mlp_head`` Linear(2h, 2h)-ReLU-Linear(2h, d); ``PrefixEncoder``: ``embedding``
(P, L·2·Hkv·D), or with projection ``embedding`` (P, Hkv·D) then ``transform``
Linear(Hkv·D, h)-Tanh-Linear(h, L·2·Hkv·D). GQA-aware: prefixes have Hkv heads.
"""
from __future__ import annotations

import contextvars
import dataclasses
import math

import torch
from torch import nn

from .. import _validate as check
from ..models import DecoderLM, EncoderLM, Seq2SeqLM
from ..models.inputs import ModelOutput
from ..models.logprobs import IGNORE_INDEX
from .lora import freeze_base
from .routing import routing

METHODS = ("prompt_tuning", "p_tuning", "prefix_tuning")


class PromptEmbedding(nn.Module):
    """Prompt tuning's virtual token table: ``embedding.weight`` (T, d), N(0, 1) or given rows."""

    def __init__(self, n_tokens: int, dim: int, init: torch.Tensor | None = None):
        super().__init__()
        self.embedding = nn.Embedding(n_tokens, dim)
        if init is not None:
            with torch.no_grad():
                self.embedding.weight.copy_(init)

    def forward(self) -> torch.Tensor:
        return self.embedding.weight  # (T, d)


class PromptEncoder(nn.Module):
    """P-tuning's encoder: a table (T, d) re-encoded by an MLP or a bidirectional LSTM + MLP head."""

    def __init__(self, n_tokens: int, dim: int, hidden: int, kind: str = "MLP", num_layers: int = 2, dropout: float = 0.0):
        super().__init__()
        if kind not in ("MLP", "LSTM"):
            raise ValueError(f"encoder must be 'MLP' or 'LSTM', got {kind!r}")
        self.kind = kind
        self.embedding = nn.Embedding(n_tokens, dim)
        if kind == "LSTM":
            self.lstm_head = nn.LSTM(dim, hidden, num_layers=num_layers, dropout=dropout, bidirectional=True, batch_first=True)
            self.mlp_head = nn.Sequential(nn.Linear(2 * hidden, 2 * hidden), nn.ReLU(), nn.Linear(2 * hidden, dim))
        else:
            self.mlp_head = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                                          nn.Linear(hidden, dim))

    def forward(self) -> torch.Tensor:
        e = self.embedding.weight[None]  # (1, T, d)
        if self.kind == "LSTM":
            e = self.lstm_head(e)[0]  # (1, T, 2h)
        return self.mlp_head(e)[0]  # (T, d)


class PrefixEncoder(nn.Module):
    """Prefix tuning's table (P, L·2·Hkv·D), optionally reparametrised Embedding -> Linear -> tanh -> Linear."""

    def __init__(self, n_tokens: int, n_layers: int, token_dim: int, projection: bool = False, hidden: int | None = None):
        super().__init__()
        self.projection = projection
        out = n_layers * 2 * token_dim
        if projection:
            hidden = token_dim if hidden is None else hidden
            self.embedding = nn.Embedding(n_tokens, token_dim)
            self.transform = nn.Sequential(nn.Linear(token_dim, hidden), nn.Tanh(), nn.Linear(hidden, out))
        else:
            self.embedding = nn.Embedding(n_tokens, out)

    def forward(self) -> torch.Tensor:
        e = self.embedding.weight  # (P, token_dim or L·2·token_dim)
        return self.transform(e) if self.projection else e  # (P, L·2·Hkv·D)


def _cat_padding(mask: torch.Tensor | None, b: int, n: int, p: int, device) -> torch.Tensor:
    """(B, P + N) bool: P ones, then the given mask (None: all real)."""
    real = torch.ones(b, n, dtype=torch.bool, device=device) if mask is None else mask.bool()
    return torch.cat([torch.ones(b, p, dtype=torch.bool, device=device), real], dim=1)


def _strip(out: ModelOutput, p: int, last_only: bool) -> ModelOutput:
    """The output without its first p (virtual) positions."""
    cut = lambda t: None if t is None else t[:, p:]  # noqa: E731
    return dataclasses.replace(out, logits=out.logits if last_only else cut(out.logits), last_hidden_state=cut(out.last_hidden_state),
                               hidden_states=None if out.hidden_states is None else [cut(h) for h in out.hidden_states])


class PromptModel(nn.Module):
    """A fusedlm model with virtual tokens (``method`` in METHODS) from ``prompt_encoder``.

    forward / encode / new_cache take the wrapped model's arguments; the virtual tokens go in on the
    first call (no cache, or an empty one). Other attributes (config, embed, head, ...) are the
    wrapped model's.
    """

    def __init__(self, model: nn.Module, prompt_encoder: nn.Module, method: str, n_virtual_tokens: int):
        super().__init__()
        self.model = model
        self.prompt_encoder = prompt_encoder
        self.method = method
        self.n_virtual_tokens = n_virtual_tokens
        self.seq2seq = isinstance(model, Seq2SeqLM)
        self.n_submodules = 2 if self.seq2seq else 1  # peft's num_transformer_submodules
        self.peft_disabled = False  # peft.disable(): the wrapped model alone

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.__dict__["_modules"]["model"], name)

    # ---- the virtual tokens ---------------------------------------------------------------------
    def prompts(self, b: int, dtype: torch.dtype) -> torch.Tensor:
        """(B, P, d) virtual token embeddings (prompt tuning, P-tuning)."""
        p = self.n_virtual_tokens
        v = self.prompt_encoder()[:p].to(dtype)  # (P, d)
        return v[None].expand(b, p, v.shape[-1])

    def prefix_kv(self, b: int, dtype: torch.dtype, decoder: bool = False) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer (k, v), each (B, Hkv, P, D) (prefix tuning). `decoder`: a Seq2SeqLM decoder's layers."""
        cfg, p = self.config, self.n_virtual_tokens
        n_slots = cfg.n_layers
        flat = self.prompt_encoder().to(dtype)  # (P, L·2·Hkv·D)
        kv = flat.view(p, 2 * n_slots, cfg.n_kv_heads, cfg.head_dim).permute(1, 2, 0, 3)  # (2L, Hkv, P, D)
        kv = kv[:, None].expand(2 * n_slots, b, cfg.n_kv_heads, p, cfg.head_dim)  # (2L, B, Hkv, P, D)
        if not decoder:
            return [(kv[2 * i], kv[2 * i + 1]) for i in range(n_slots)]
        return [(kv[(4 * i) % (2 * n_slots)], kv[(4 * i + 1) % (2 * n_slots)]) for i in range(cfg.n_decoder_layers)]

    def new_cache(self, batch: int, max_len: int):
        """The wrapped model's cache for `max_len` tokens: holding the prefix (prefix tuning), or with
        room for the P virtual tokens the first call puts in (a decoder's prompt tuning / P-tuning)."""
        if self.peft_disabled:
            return self.model.new_cache(batch, max_len)
        if self.method == "prefix_tuning":
            return self.model.new_cache(batch, max_len, prefix_kv=self.prefix_kv(batch, self._dtype(), decoder=self.seq2seq))
        return self.model.new_cache(batch, max_len + (0 if self.seq2seq else self.n_virtual_tokens))

    def _with_prefix(self, cache, b: int, n: int):
        """A cache holding the prefix keys/values: `cache` if it does (from :meth:`new_cache`), the
        prefix written into it if it is an empty cache of the wrapped model, else a new one with
        room for n tokens after the prefix."""
        if cache is None:
            return self.model.new_cache(b, n, prefix_kv=self.prefix_kv(b, self._dtype(), decoder=self.seq2seq))
        if not cache.n_prefix:
            cache.add_prefix(self.prefix_kv(b, self._dtype(), decoder=self.seq2seq))
        return cache

    # ---- forward --------------------------------------------------------------------------------
    def _prepend(self, input_ids, inputs_embeds, attention_mask):
        x = self.model.embed(input_ids) if inputs_embeds is None else inputs_embeds  # (B, N, d)
        b, n, _ = x.shape
        x = torch.cat([self.prompts(b, x.dtype), x], dim=1)  # (B, P + N, d)
        return x, _cat_padding(attention_mask, b, n, self.n_virtual_tokens, x.device)

    def forward(self, input_ids: torch.Tensor | None = None, **kwargs) -> ModelOutput:
        token = _INSIDE.set(True)  # the wrapped model may run (see bind)
        try:
            return self._forward(input_ids, **kwargs)
        finally:
            _INSIDE.reset(token)

    def _forward(self, input_ids: torch.Tensor | None = None, **kwargs) -> ModelOutput:
        if self.peft_disabled:
            return self.model(input_ids, **kwargs)
        if self.seq2seq:
            return self._seq2seq(input_ids, **kwargs)
        p = self.n_virtual_tokens
        cache = kwargs.get("cache")
        if cache is not None and cache.length > cache.n_prefix:  # a later decoding step: the cache holds the virtual tokens
            return self.model(input_ids, **kwargs)
        if kwargs.get("position_ids") is not None:
            kwargs["position_ids"] = kwargs["position_ids"] + p
        if self.method == "prefix_tuning":
            tokens = input_ids if input_ids is not None else kwargs["inputs_embeds"]
            kwargs["cache"] = self._with_prefix(cache, tokens.shape[0], tokens.shape[1])
            return self.model(input_ids, **kwargs)
        x, mask = self._prepend(input_ids, kwargs.pop("inputs_embeds", None), kwargs.pop("attention_mask", None))
        b = x.shape[0]
        if kwargs.get("position_ids") is not None:
            head = torch.arange(p, device=x.device).expand(b, p)
            kwargs["position_ids"] = torch.cat([head, kwargs["position_ids"]], dim=1)
        if kwargs.get("labels") is not None:
            labels = kwargs["labels"]
            kwargs["labels"] = torch.cat([labels.new_full((b, p), IGNORE_INDEX), labels], dim=1)
        if kwargs.get("prefix_len") is not None:  # prefix-LM: the virtual tokens join the bidirectional part
            kwargs["prefix_len"] = kwargs["prefix_len"] + p
        out = self.model(inputs_embeds=x, attention_mask=mask, **kwargs)
        return _strip(out, p, kwargs.get("last_logits_only", False))

    def encode(self, input_ids=None, attention_mask=None, *, inputs_embeds=None, adapter_ids=None, task_ids=None,
               **kwargs) -> torch.Tensor:
        """Seq2SeqLM: the encoder output (B, [P +] M, d), the virtual tokens first (prompt methods);
        adapter_ids / task_ids route the encoder's PEFT layers (see :mod:`.routing`)."""
        b = (input_ids if input_ids is not None else inputs_embeds).shape[0]
        with routing(b, adapter_ids, task_ids):
            if self.method == "prefix_tuning" or self.peft_disabled:
                return self.model.encode(input_ids, attention_mask, inputs_embeds=inputs_embeds, **kwargs)
            x, mask = self._prepend(input_ids, inputs_embeds, attention_mask)
            return self.model.encode(inputs_embeds=x, attention_mask=mask, **kwargs)

    def _seq2seq(self, input_ids, *, inputs_embeds=None, attention_mask=None, encoder_out=None, cache=None, **kwargs):
        p = self.n_virtual_tokens
        if self.method == "prefix_tuning":
            if cache is None or cache.length == cache.n_prefix:  # the first decoder call
                source = next(t for t in (input_ids, inputs_embeds, encoder_out) if t is not None)
                target = next((t for t in (kwargs.get("decoder_input_ids"), kwargs.get("decoder_inputs_embeds"),
                               kwargs.get("labels")) if t is not None), None)  # None: the model says what is missing
                cache = self._with_prefix(cache, source.shape[0], 0 if target is None else target.shape[1])
            return self.model(input_ids, inputs_embeds=inputs_embeds, attention_mask=attention_mask, encoder_out=encoder_out,
                              cache=cache, **kwargs)
        if encoder_out is None:
            ids = {k: kwargs[k] for k in ("adapter_ids", "task_ids") if k in kwargs}
            encoder_out = self.encode(input_ids, attention_mask, inputs_embeds=inputs_embeds, **ids)
        if attention_mask is not None and attention_mask.shape[1] + p == encoder_out.shape[1]:
            attention_mask = _cat_padding(attention_mask, attention_mask.shape[0], attention_mask.shape[1], p, encoder_out.device)
        return self.model(encoder_out=encoder_out, attention_mask=attention_mask, cache=cache, **kwargs)

    def _dtype(self) -> torch.dtype:
        return self.model.tok_embed.weight.dtype

    def generate(self, input_ids: torch.Tensor, **kwargs) -> torch.Tensor:
        """``fusedlm.generation.generate`` on this model."""
        from ..generation import generate

        return generate(self, input_ids, **kwargs)


_INSIDE: contextvars.ContextVar[bool] = contextvars.ContextVar("fusedlm_prompt_model_running", default=False)


def _refuse_alone(module: nn.Module, args, kwargs):
    if not _INSIDE.get():
        raise ValueError(f"this {type(module).__name__} carries virtual tokens that fusedlm.interop.peft.load_adapter loaded: "
                         "run the PromptModel load_adapter returned (running the model alone would silently drop them); "
                         "for the base model use `with fusedlm.peft.disable(prompt_model):`")


def bind(pm: PromptModel) -> PromptModel:
    """Makes the model `pm` wraps refuse to run on its own (a ValueError pointing at `pm`): after
    loading a prompt-learning adapter, the model the caller passed is no longer a plain base model
    that silently ignores it (``fusedlm.interop.peft.load_adapter``'s contract). Returns pm."""
    base = pm.model
    if not hasattr(base, "_fusedlm_prompt_bound"):
        base._fusedlm_prompt_bound = True
        base.register_forward_pre_hook(_refuse_alone, with_kwargs=True)
    return pm


# ---------------------------------------------------------------------------------------------
# constructors
# ---------------------------------------------------------------------------------------------
def _check_model(model) -> None:
    if not isinstance(model, (DecoderLM, EncoderLM, Seq2SeqLM)):
        raise TypeError(f"model must be a fusedlm DecoderLM, EncoderLM or Seq2SeqLM, got {type(model).__name__}")


def wrap(model, encoder, method: str, n: int) -> PromptModel:
    """Freezes `model` and wraps it with `encoder` (a PromptModel)."""
    freeze_base(model)
    return PromptModel(model, encoder.to(model.tok_embed.weight.device), method, n)


def token_init(model, token_ids, n_rows: int) -> torch.Tensor:
    """The embeddings (n_rows, d) float32 of token_ids repeated / truncated to n_rows (peft's TEXT init)."""
    ids = check.token_ids("init_token_ids", token_ids)
    if not ids:
        raise ValueError("init_token_ids must hold at least one token id")
    vocab = model.config.vocab_size
    if max(ids) >= vocab:
        raise ValueError(f"init_token_ids must be ids of the vocabulary, in [0, {vocab}), got {max(ids)}")
    ids = (ids * math.ceil(n_rows / len(ids)))[:n_rows]
    device = model.tok_embed.weight.device
    with torch.no_grad():
        return model.embed(torch.tensor([ids], device=device))[0].float()


def apply_prompt_tuning(model, *, n_virtual_tokens: int = 20, init_token_ids=None) -> PromptModel:
    """Prompt tuning: n_virtual_tokens trainable embeddings before the input (the model frozen).
    Init N(0, 1), or the embeddings of `init_token_ids` repeated and truncated to length."""
    _check_model(model)
    n = check.positive_int("n_virtual_tokens", n_virtual_tokens)
    rows = n * (2 if isinstance(model, Seq2SeqLM) else 1)
    init = None if init_token_ids is None else token_init(model, init_token_ids, rows)
    return wrap(model, PromptEmbedding(rows, model.config.d_model, init), "prompt_tuning", n)


def apply_p_tuning(model, *, n_virtual_tokens: int = 20, encoder: str = "MLP", hidden_size: int | None = None,
                   num_layers: int = 2, dropout: float = 0.0) -> PromptModel:
    """P-tuning: virtual token embeddings produced by a trainable prompt encoder (``encoder`` "MLP"
    or "LSTM"; hidden_size defaults to d_model, as peft's encoder_hidden_size)."""
    _check_model(model)
    n = check.positive_int("n_virtual_tokens", n_virtual_tokens)
    d = model.config.d_model
    rows = n * (2 if isinstance(model, Seq2SeqLM) else 1)
    hidden = d if hidden_size is None else check.positive_int("hidden_size", hidden_size)
    return wrap(model, PromptEncoder(rows, d, hidden, encoder, check.positive_int("num_layers", num_layers), dropout), "p_tuning", n)


def apply_prefix_tuning(model, *, n_virtual_tokens: int = 20, projection: bool = False, hidden_size: int | None = None) -> PromptModel:
    """Prefix tuning: per-layer key/value prefixes (Hkv heads), from a table or (projection=True) the
    reparametrisation MLP; hidden_size defaults to Hkv·D (peft's encoder_hidden_size)."""
    _check_model(model)
    n = check.positive_int("n_virtual_tokens", n_virtual_tokens)
    cfg = model.config
    if isinstance(model, Seq2SeqLM) and cfg.n_decoder_layers > cfg.n_layers:
        raise ValueError(f"prefix tuning on an encoder-decoder follows peft's layout, which has prefixes for n_layers={cfg.n_layers} "
                         f"decoder layers; this model has n_decoder_layers={cfg.n_decoder_layers}")
    token_dim = cfg.n_kv_heads * cfg.head_dim
    hidden = None if hidden_size is None else check.positive_int("hidden_size", hidden_size)
    return wrap(model, PrefixEncoder(n, cfg.n_layers, token_dim, bool(projection), hidden), "prefix_tuning", n)
