"""One record per model family (:class:`Family`): its presets, its Hugging Face config.json both
ways and its checkpoint name table. A new family is one module here and one entry in FAMILIES
(and a parity test against transformers); ``ModelConfig.family`` names the record a config
follows, so saving it needs no guessing.
"""
from .bart import BART
from .bert import BERT, ROBERTA
from .gpt2 import GPT2
from .llama import LLAMA, QWEN2
from .prefix_lm import PREFIX_LM
from .record import Family
from .t5 import T5

FAMILIES: dict[str, Family] = {f.name: f for f in (GPT2, LLAMA, QWEN2, BERT, ROBERTA, T5, BART, PREFIX_LM)}

__all__ = ["FAMILIES", "Family"]
