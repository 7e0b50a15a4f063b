"""Hallucination remedies on top of generate: retrieval-augmented prompts, abstention when the model
is not confident, and checking an answer against the knowledge store.

    store = BM25Retriever(docs)                                        # or DenseRetriever (retrieval.py)
    ans = answer(model, tok, "What is the capital of France?", retriever=store, threshold=-1.2)
    ans.text, ans.confidence, ans.abstained, ans.passages
    t = calibrate_threshold(confidences, correct, target_precision=0.9)   # on held-out questions
    fact_check("Paris", store, question="What is the capital of France?")  # FactCheck(supported=True, ...)

A text tokenizer is anything with ``encode(str) -> list[int]`` and ``decode(list[int]) -> str``
(a Hugging Face tokenizer, or the tokenizers library's). Low temperature, the fourth remedy, is
generate's own argument.
"""
from __future__ import annotations

import dataclasses
import math
import re

import torch

from ..models.logprobs import IGNORE_INDEX, token_logprobs
from .generate import generate
from .retrieval import Hit, Retriever

RAG_TEMPLATE = "Answer the question using the passages.\n\n{context}\n\nQuestion: {question}\nAnswer:"
PLAIN_TEMPLATE = "Question: {question}\nAnswer:"
PASSAGE = "[{n}] {text}"
METHODS = ("mean_logprob", "first_token_prob")


def rag_prompt(question: str, passages: list[Hit], template: str = RAG_TEMPLATE, passage: str = PASSAGE) -> str:
    """`template` with {context} = the passages, one per line, each formatted by `passage`
    ({n}: its rank from 1, {text}), and {question}."""
    if "{question}" not in template or ("{context}" not in template and passages):
        raise ValueError(f"template must contain {{question}} (and {{context}} for the passages), got {template!r}")
    context = "\n".join(passage.format(n=i + 1, text=h.text) for i, h in enumerate(passages))
    return template.format(context=context, question=question)


@torch.no_grad()
def confidence(model, prompt_ids: torch.Tensor, answer_ids: torch.Tensor, *, prompt_mask: torch.Tensor | None = None,
               answer_mask: torch.Tensor | None = None, method: str = "mean_logprob") -> torch.Tensor:
    """How sure the model is of an answer, by teacher forcing: (B,) float32.

    prompt_ids (B, N) (left-padded, prompt_mask), answer_ids (B, T) (right-padded, answer_mask).
    method "mean_logprob": the mean log p of the answer's tokens; "first_token_prob": p of its
    first token. A Seq2SeqLM reads the prompt as its source and the answer as its target. An empty
    answer (no real token) has confidence -inf."""
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    b, t = answer_ids.shape
    amask = torch.ones_like(answer_ids, dtype=torch.bool) if answer_mask is None else answer_mask.bool()
    labels = answer_ids.masked_fill(~amask, IGNORE_INDEX)
    if model.config.arch == "encoder-decoder":
        start = torch.full((b, 1), model.config.decoder_start_token_id, dtype=torch.long, device=answer_ids.device)
        dec = torch.cat([start, answer_ids[:, :-1].masked_fill(~amask[:, :-1], model.config.pad_token_id or 0)], 1)
        logits = model(prompt_ids, attention_mask=prompt_mask, decoder_input_ids=dec).logits  # (B, T, V)
    else:
        pmask = torch.ones_like(prompt_ids, dtype=torch.bool) if prompt_mask is None else prompt_mask.bool()
        ids = torch.cat([prompt_ids, answer_ids.masked_fill(~amask, 0)], 1)
        logits = model(ids, attention_mask=torch.cat([pmask, amask], 1)).logits[:, prompt_ids.shape[1] - 1 : -1]  # (B, T, V)
    logp = token_logprobs(logits, labels)  # (B, T), 0 where IGNORE_INDEX
    n = amask.sum(1)
    if method == "mean_logprob":
        out = logp.sum(1) / n.clamp(min=1)
    else:
        out = logp[:, 0].exp()
    return out.masked_fill(n == 0, -math.inf)


@dataclasses.dataclass
class Answer:
    text: str  # the answer, or the abstention reply
    answer: str  # what the model generated (also when it abstained)
    confidence: float
    abstained: bool
    passages: list[Hit]


def answer(model, tokenizer, question: str, *, retriever: Retriever | None = None, k: int = 3, template: str | None = None,
           threshold: float | None = None, method: str = "mean_logprob", reply: str = "I don't know",
           max_new_tokens: int = 32, **generate_kwargs) -> Answer:
    """Answers `question`: retrieves k passages (with a retriever) into the prompt (RAG), generates
    (greedy unless generate_kwargs say otherwise), and abstains — returns `reply` — when the
    answer's confidence (see :func:`confidence`) is below `threshold` (None: never abstains)."""
    passages = retriever.search(question, k) if retriever is not None else []
    template = template or (RAG_TEMPLATE if retriever is not None else PLAIN_TEMPLATE)
    prompt = torch.tensor([tokenizer.encode(rag_prompt(question, passages, template))], dtype=torch.long)
    prompt = prompt.to(next(model.parameters()).device)
    out = generate(model, prompt, max_new_tokens=max_new_tokens, **generate_kwargs)
    new = out[0, 1:] if model.config.arch == "encoder-decoder" else out[0, prompt.shape[1]:]
    eos = generate_kwargs.get("eos_token_id", model.config.eos_token_id)
    eos = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
    ends = [i for i, tok in enumerate(new.tolist()) if tok in eos]
    new = new[: ends[0]] if ends else new  # the answer stops before its eos
    conf = float(confidence(model, prompt, new[None], method=method)[0]) if new.numel() else -math.inf
    text = tokenizer.decode(new.tolist())
    abstained = threshold is not None and not conf >= threshold
    return Answer(text=reply if abstained else text, answer=text, confidence=conf, abstained=abstained, passages=passages)


def calibrate_threshold(confidences, correct, *, target_precision: float = 0.9) -> float:
    """The abstention threshold that answers as many held-out questions as possible while the
    answered ones (confidence >= threshold) are correct at least `target_precision` of the time.
    Returns inf when no threshold reaches it (abstain always)."""
    conf = torch.as_tensor(confidences, dtype=torch.float64).reshape(-1)
    ok = torch.as_tensor(correct, dtype=torch.bool).reshape(-1)
    if conf.numel() == 0 or conf.shape != ok.shape:
        raise ValueError(f"confidences and correct must be non-empty and of one length, got {conf.numel()} and {ok.numel()}")
    if not 0.0 < target_precision <= 1.0:
        raise ValueError(f"target_precision must be in (0, 1], got {target_precision}")
    if bool(torch.isnan(conf).any()):
        raise ValueError("confidences must not contain NaN")
    order = torch.argsort(conf, descending=True)
    conf, ok = conf[order], ok[order]
    precision = ok.double().cumsum(0) / torch.arange(1, conf.numel() + 1, dtype=torch.float64)
    last_of_tie = torch.ones_like(ok)
    last_of_tie[:-1] = conf[1:] != conf[:-1]  # a threshold answers all questions of equal confidence
    good = ((precision >= target_precision) & last_of_tie).nonzero()
    return float(conf[int(good[-1])]) if good.numel() else math.inf


def _words(text: str) -> list[str]:
    return re.findall(r"\w+", text.lower())


def _contains(words: list[str], span: list[str]) -> bool:
    n = len(span)
    return any(words[i : i + n] == span for i in range(len(words) - n + 1))


@dataclasses.dataclass
class FactCheck:
    supported: bool
    span: str  # the key span that was looked for
    evidence: list[Hit]  # supported: the passages that contain the span; else what was retrieved


def fact_check(answer_text: str, retriever: Retriever, *, question: str | None = None, span: str | None = None,
               k: int = 3) -> FactCheck:
    """Checks an answer against the store: retrieves k passages for (question +) answer, and the
    answer's key span (default: the whole answer) is supported when a retrieved passage contains
    it word for word (lower case, punctuation ignored)."""
    span = answer_text if span is None else span
    if not _words(span):
        raise ValueError(f"the key span must contain a word, got {span!r}")
    hits = retriever.search(f"{question} {answer_text}" if question else answer_text, k)
    support = [h for h in hits if _contains(_words(h.text), _words(span))]
    return FactCheck(supported=bool(support), span=span, evidence=support or hits)
