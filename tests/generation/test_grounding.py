"""RAG prompts, answer confidence and abstention, threshold calibration and fact-checking, on a tiny
store and tiny fusedlm models (a character tokenizer: the mechanics, not the model's knowledge)."""
import math

import pytest
import torch
from tiny_models import fused

from fusedlm.generation import (BM25Retriever, Hit, answer, calibrate_threshold, confidence, fact_check, generate,
                                rag_prompt)

pytest.importorskip("bm25s")

DOCS = ["Paris is the capital of France.", "Berlin is the capital of Germany.", "The Nile is the longest river in Africa.",
        "Mount Everest is the highest mountain on Earth."]


class CharTokenizer:
    """One token per character (code point mod 128), as a text tokenizer's encode / decode."""

    def encode(self, text):
        return [ord(c) % 128 for c in text]

    def decode(self, ids):
        return "".join(chr(i) for i in ids)


@pytest.fixture(scope="module")
def store():
    return BM25Retriever(DOCS)


@pytest.fixture(scope="module")
def llama():
    return fused("llama-tiny", max_seq_len=256, perturb=())


def test_rag_prompt():
    hits = [Hit(2, 1.0, "B."), Hit(0, 0.5, "A.")]
    assert rag_prompt("Q?", hits, "{context}|{question}") == "[1] B.\n[2] A.|Q?"
    assert rag_prompt("Q?", [], "Question: {question}") == "Question: Q?"
    with pytest.raises(ValueError, match="template"):
        rag_prompt("Q?", hits, "no slots")


def _manual_logprobs(model, prompt, ans):
    with torch.no_grad():
        logits = model(torch.tensor([prompt + ans])).logits[0, len(prompt) - 1 : -1]
    return torch.log_softmax(logits.float(), -1).gather(1, torch.tensor(ans)[:, None])[:, 0]


def test_confidence_of_a_padded_batch_equals_each_row(llama):
    prompts, answers = [[5, 6, 7, 8], [9, 10]], [[11, 12], [13, 14, 15]]
    p = torch.tensor([[5, 6, 7, 8], [0, 0, 9, 10]])
    pm = torch.tensor([[1, 1, 1, 1], [0, 0, 1, 1]])
    a = torch.tensor([[11, 12, 0], [13, 14, 15]])
    am = torch.tensor([[1, 1, 0], [1, 1, 1]])
    mean = confidence(llama, p, a, prompt_mask=pm, answer_mask=am)
    first = confidence(llama, p, a, prompt_mask=pm, answer_mask=am, method="first_token_prob")
    for r in range(2):
        lp = _manual_logprobs(llama, prompts[r], answers[r])
        assert float(mean[r]) == pytest.approx(float(lp.mean()), abs=1e-5)
        assert float(first[r]) == pytest.approx(float(lp[0].exp()), abs=1e-6)
    assert confidence(llama, p, a, answer_mask=torch.zeros_like(am))[0] == -math.inf
    with pytest.raises(ValueError, match="method"):
        confidence(llama, p, a, method="vibes")


def test_confidence_seq2seq():
    t5 = fused("t5-tiny", perturb=())
    src, ans = torch.tensor([[5, 6, 7]]), torch.tensor([[8, 9]])
    with torch.no_grad():
        logits = t5(src, decoder_input_ids=torch.tensor([[t5.config.decoder_start_token_id, 8]])).logits[0]
    want = torch.log_softmax(logits, -1)[[0, 1], [8, 9]].mean()
    assert float(confidence(t5, src, ans)[0]) == pytest.approx(float(want), abs=1e-5)


def test_answer_with_retrieval_and_abstention(llama, store):
    tok = CharTokenizer()
    q = "What is the capital of France?"
    ans = answer(llama, tok, q, retriever=store, k=2, max_new_tokens=6, eos_token_id=[])
    assert [h.index for h in ans.passages][0] == 0  # the France passage, ranked first, is in the prompt
    prompt = rag_prompt(q, ans.passages)
    assert "[1] Paris is the capital of France." in prompt
    ids = torch.tensor([tok.encode(prompt)])
    out = generate(llama, ids, max_new_tokens=6, eos_token_id=[], output_scores=True)
    assert ans.answer == tok.decode(out.sequences[0, ids.shape[1]:].tolist())
    # the teacher-forced confidence is the mean log-prob greedy decoding saw
    picked = [torch.log_softmax(s[0], -1)[t] for s, t in zip(out.scores, out.sequences[0, ids.shape[1]:])]
    assert ans.confidence == pytest.approx(float(torch.stack(picked).mean()), abs=1e-5)
    assert not ans.abstained and ans.text == ans.answer
    low = answer(llama, tok, q, retriever=store, k=2, max_new_tokens=6, eos_token_id=[], threshold=ans.confidence - 0.01)
    assert not low.abstained
    high = answer(llama, tok, q, retriever=store, k=2, max_new_tokens=6, eos_token_id=[], threshold=ans.confidence + 0.01,
                  reply="No idea.")
    assert high.abstained and high.text == "No idea." and high.answer == ans.answer
    plain = answer(llama, tok, q, max_new_tokens=3, eos_token_id=[])
    assert plain.passages == [] and len(plain.answer) == 3


def test_answer_stops_before_eos(llama):
    tok = CharTokenizer()
    free = answer(llama, tok, "Why?", max_new_tokens=6, eos_token_id=[])
    eos = ord(free.answer[2]) % 128
    cut = answer(llama, tok, "Why?", max_new_tokens=6, eos_token_id=eos)
    assert cut.answer == free.answer[: free.answer.index(free.answer[2])]


@pytest.mark.parametrize("target,want", [(1.0, 0.8), (0.75, 0.6), (0.7, 0.6), (0.5, 0.5)])
def test_calibrate_threshold(target, want):
    conf = [0.9, 0.5, 0.7, 0.6, 0.8]
    correct = [True, False, False, True, True]  # sorted: .9 T, .8 T, .7 F, .6 T, .5 F
    assert calibrate_threshold(conf, correct, target_precision=target) == pytest.approx(want)


def test_calibrate_threshold_edges():
    assert calibrate_threshold([0.3, 0.2], [False, False], target_precision=0.5) == math.inf
    # ties: a threshold answers every question of its confidence (0.8 twice: 1 of 2 correct)
    assert calibrate_threshold([0.9, 0.8, 0.8], [True, True, False], target_precision=0.9) == pytest.approx(0.9)
    for bad in (dict(confidences=[], correct=[]), dict(confidences=[0.1], correct=[True, False])):
        with pytest.raises(ValueError, match="confidences"):
            calibrate_threshold(**bad)
    with pytest.raises(ValueError, match="target_precision"):
        calibrate_threshold([0.1], [True], target_precision=0.0)


def test_fact_check(store):
    ok = fact_check("Paris", store, question="What is the capital of France?")
    assert ok.supported and ok.span == "Paris" and [h.index for h in ok.evidence] == [0]
    bad = fact_check("Lyon", store, question="What is the capital of France?")
    assert not bad.supported and bad.evidence and bad.evidence[0].index == 0  # what was found instead
    span = fact_check("It is the NILE, of course.", store, question="Longest river in Africa?", span="the nile!")
    assert span.supported and span.evidence[0].index == 2
    assert not fact_check("Everest is in Africa", store, span="Everest is in Africa").supported
    with pytest.raises(ValueError, match="span"):
        fact_check("...", store)
