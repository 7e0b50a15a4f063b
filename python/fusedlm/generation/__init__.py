"""Decoding strategies and hallucination remedies on fusedlm models.

    from fusedlm import generation
    ids = generation.generate(model, ids, max_new_tokens=20, num_beams=4)   # transformers' arguments

Strategies (each a loop over one model step with the KV cache, see step.py): greedy and sampling
(sampling.py, through ``ops.sample``), beam search (beam.py), contrastive search (contrastive.py);
transformers' processors (processors.py). Remedies: retrievers (retrieval.py: BM25, dense), RAG
prompts, abstention with a calibrated threshold and fact-checking (grounding.py).
"""
from .generate import GenerateOutput, generate
from .grounding import Answer, FactCheck, answer, calibrate_threshold, confidence, fact_check, rag_prompt
from .retrieval import BM25Retriever, DenseRetriever, Hit, SentenceEncoder, load_tokenizer

__all__ = ["generate", "GenerateOutput", "BM25Retriever", "DenseRetriever", "SentenceEncoder", "Hit", "load_tokenizer",
           "rag_prompt", "confidence", "answer", "Answer", "calibrate_threshold", "fact_check", "FactCheck"]
