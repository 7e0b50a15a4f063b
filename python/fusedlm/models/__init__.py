"""The model layer: readable decoder-only, encoder-only and encoder-decoder transformers whose
every attention is ``fusedlm.ops.attention``.

    from fusedlm.models import build, get_config, count_parameters
    model = build(get_config("llama-tiny"))

Files: config.py (ModelConfig, presets) and families/ (one record per model family), the model
classes (decoder.py, encoder.py, seq2seq.py on base.py), and their parts: stack.py, blocks.py,
positions.py, cache.py (KVCache), inputs.py (input checks, ModelOutput), logprobs.py.
"""
from .base import LanguageModel
from .cache import KVCache
from .config import PRESETS, ModelConfig, get_config
from .decoder import DecoderLM
from .encoder import EncoderLM
from .families import FAMILIES
from .inputs import ModelOutput
from .params import count_parameters
from .seq2seq import Seq2SeqLM

MODEL_CLASSES = {cls.arch: cls for cls in (DecoderLM, EncoderLM, Seq2SeqLM)}


def build(config: ModelConfig) -> LanguageModel:
    """The model class for config.arch, built from config (use ``with torch.device("meta")`` to
    build without allocating)."""
    return MODEL_CLASSES[config.arch](config)


__all__ = ["ModelConfig", "PRESETS", "FAMILIES", "get_config", "LanguageModel", "DecoderLM", "EncoderLM", "Seq2SeqLM",
           "KVCache", "ModelOutput", "count_parameters", "build"]
