"""Texts of the world -> tensors, and model answers -> scores.

Prompts are fusedlm.generation.grounding's templates (SFT trains on them, so that its `answer`
with or without a retriever asks the way the model learned):

    Question: Where was Vira Doltas born?\nAnswer: Morvik</s>
    Answer the question using the passages.\n\n[1] <passage>\n[2] <passage>\n\nQuestion: ...\nAnswer: Morvik</s>

and instructions "Instruction: Tell me about Vira Doltas.\nResponse: <biography></s>".

Shapes: B rows, N tokens.
"""
from __future__ import annotations

import random

import torch

from .tokenizer import Tokenizer
from .world import ATTRIBUTES, QUESTIONS, Person, fabricate

def qa_prompt(question: str, passages: list[str] | None = None) -> str:
    """The closed-book prompt, or (passages) the RAG prompt, as grounding.answer builds them."""
    from ..generation.grounding import PLAIN_TEMPLATE, RAG_TEMPLATE, rag_prompt
    from ..generation.retrieval import Hit

    if not passages:
        return rag_prompt(question, [], PLAIN_TEMPLATE)
    return rag_prompt(question, [Hit(i, 0.0, p) for i, p in enumerate(passages)], RAG_TEMPLATE)


def instruction_prompt(instruction: str) -> str:
    return f"Instruction: {instruction}\nResponse:"


def reading_examples(people: list[Person], k: int, seed: int) -> list[tuple[str, str, str]]:
    """(RAG prompt, true answer, a fabricated answer) about people who are in no corpus: one
    question per person, its passage among k - 1 others in a random order, so only reading the
    context answers it."""
    rng = random.Random(seed)
    out = []
    for i, p in enumerate(people):
        attribute = rng.choice(ATTRIBUTES)
        others = [people[j] for j in rng.sample(range(len(people)), k) if j != i][: k - 1]
        passages = [p.passage()] + [q.passage() for q in others]
        rng.shuffle(passages)
        prompt = qa_prompt(QUESTIONS[attribute].format(name=p.name), passages)
        out.append((prompt, p.value(attribute), fabricate(p, attribute, rng)))
    return out


def pack(tok: Tokenizer, texts: list[str], seq_len: int) -> torch.Tensor:
    """The texts tokenized, each followed by EOS, concatenated and cut into rows: (rows, seq_len)."""
    stream = [i for t in texts for i in tok.encode(t) + [tok.eos_id]]
    rows = len(stream) // seq_len
    if rows == 0:
        raise ValueError(f"the texts make {len(stream)} tokens, fewer than one row of {seq_len}")
    return torch.tensor(stream[: rows * seq_len]).view(rows, seq_len)


def right_pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids (B, N), mask (B, N) bool) with rows padded on the right to the longest."""
    return _pad(rows, pad_id, "right")


def left_pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids (B, N), mask (B, N) bool) with rows padded on the left (prompts for generation)."""
    return _pad(rows, pad_id, "left")


def _pad(rows: list[list[int]], pad_id: int, side: str) -> tuple[torch.Tensor, torch.Tensor]:
    from ..training.data import pad_rows

    ids = pad_rows([torch.tensor(r, dtype=torch.long) for r in rows], pad_id, side)
    return ids, pad_rows([torch.ones(len(r), dtype=torch.bool) for r in rows], False, side)


def generate_text(model, tok: Tokenizer, prompts: list[str], *, batch: int = 32, max_new_tokens: int = 6,
                  **generate_kwargs) -> list[str]:
    """Each prompt's continuation (up to EOS) as text, generated in left-padded batches with
    fusedlm.generation.generate (transformers' arguments)."""
    from ..generation import generate

    model.eval()
    out = []
    for start in range(0, len(prompts), batch):
        ids, mask = left_pad([tok.encode(p) for p in prompts[start: start + batch]], tok.pad_id)
        seqs = generate(model, ids, attention_mask=mask, max_new_tokens=max_new_tokens, eos_token_id=tok.eos_id,
                        pad_token_id=tok.pad_id, **generate_kwargs)
        n_ret = seqs.shape[0] // ids.shape[0]
        out += [tok.decode(_until_eos(s[ids.shape[1]:].tolist(), tok.eos_id)).strip() for s in seqs[::n_ret]]
    return out


def _until_eos(ids: list[int], eos: int) -> list[int]:
    return ids[: ids.index(eos)] if eos in ids else ids


def accuracy(answers: list[str], truths: list[str]) -> float:
    return sum(a == t for a, t in zip(answers, truths)) / max(len(truths), 1)


def distinct_2(texts: list[str]) -> float:
    """Distinct bigrams / all bigrams over the words of every text (diversity; Li et al. 2016)."""
    grams = [tuple(w[i: i + 2]) for w in (t.split() for t in texts) for i in range(len(w) - 1)]
    return len(set(grams)) / max(len(grams), 1)


def repetition_rate(texts: list[str], n: int = 3) -> float:
    """Share of word n-grams of a text that already occurred earlier in the same text (mean over texts)."""
    rates = []
    for t in texts:
        w = t.split()
        grams = [tuple(w[i: i + n]) for i in range(len(w) - n + 1)]
        rates.append((len(grams) - len(set(grams))) / len(grams) if grams else 0.0)
    return sum(rates) / max(len(rates), 1)
