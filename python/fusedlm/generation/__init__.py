"""Decoding strategies and hallucination remedies on fusedlm models.

    from fusedlm import generation
    ids = generation.generate(model, ids, max_new_tokens=20, num_beams=4)   # transformers' arguments

Strategies (each a loop over one model step with the KV cache, see step.py): greedy and sampling
(greedy.py, through ``ops.sample``), beam search (beam.py), contrastive search (contrastive.py);
transformers' processors (processors.py).
"""
from .generate import GenerateOutput, generate

__all__ = ["generate", "GenerateOutput"]
