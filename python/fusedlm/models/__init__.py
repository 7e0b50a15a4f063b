"""The model layer: readable decoder-only, encoder-only and encoder-decoder transformers whose
every attention is ``fusedlm.ops.attention``.

    from fusedlm.models import build, get_config, count_parameters
    model = build(get_config("llama-tiny"))
"""
from .config import PRESETS, ModelConfig, get_config
from .decoder import DecoderLM
from .encoder import EncoderLM
from .cache import KVCache
from .inputs import ModelOutput
from .params import count_parameters
from .seq2seq import Seq2SeqLM

MODEL_CLASSES = {"decoder": DecoderLM, "encoder": EncoderLM, "encoder-decoder": Seq2SeqLM}


def build(config: ModelConfig):
    """The model class for config.arch, built from config (use ``with torch.device("meta")`` to
    build without allocating)."""
    return MODEL_CLASSES[config.arch](config)


__all__ = ["ModelConfig", "PRESETS", "get_config", "DecoderLM", "EncoderLM", "Seq2SeqLM", "KVCache", "ModelOutput",
           "count_parameters", "build"]
