"""A prefix-LM decoder (UniLM, T5's prefix objective): LLaMA's blocks under the "prefix" attention
mode, where the first prefix_len keys of a row are seen by every query and the rest causally. No
Hugging Face model has this mode, so the family has presets only."""
from __future__ import annotations

from .llama import LLAMA
from .record import Family

PREFIX_LM = Family(name="prefix-lm", arch="decoder",
                   presets={"prefix-lm-tiny": dict(LLAMA.presets["llama-tiny"], attn_mode="prefix")})
