"""What every model checks and returns: token ids, attention masks, the embeddings of its
inputs, and ModelOutput."""
from __future__ import annotations

import dataclasses

import torch
import torch.nn as nn


def check_ids(name: str, ids: torch.Tensor, vocab_size: int | None = None) -> None:
    """Token ids must be an integer tensor (B, N), N >= 1, with values in [0, vocab_size) when given."""
    if not isinstance(ids, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(ids).__name__}")
    if ids.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"{name} must be an integer (int64) tensor, got {ids.dtype}")
    if ids.dim() != 2 or ids.shape[1] == 0:
        raise ValueError(f"{name} must have shape [B, N] with N >= 1, got {list(ids.shape)}")
    if vocab_size is not None and ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab_size):
        raise ValueError(f"{name} must be in [0, vocab_size={vocab_size}), got values in [{int(ids.min())}, {int(ids.max())}]")


def check_padding_mask(name: str, mask: torch.Tensor | None, shape: tuple, device) -> torch.Tensor:
    """A padding mask (B, N) of 0/1 or bool (an ``attention_mask``), True/1 = real token; None means
    all real. Returns it as bool."""
    if mask is None:
        return torch.ones(shape, dtype=torch.bool, device=device)
    if not isinstance(mask, torch.Tensor) or tuple(mask.shape) != tuple(shape):
        got = list(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise ValueError(f"{name} must be a tensor of the shape of the ids {list(shape)}, got {got}")
    return mask.bool()


def token_inputs(model: nn.Module, ids_name: str, input_ids: torch.Tensor | None, inputs_embeds: torch.Tensor | None,
                 mask_name: str, attention_mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The embeddings (B, N, d) and bool padding mask (B, N) of a model's inputs: exactly one of
    input_ids (embedded by ``model.embed``) or inputs_embeds (used as given)."""
    embeds_name = ids_name.replace("input_ids", "inputs_embeds")
    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError(f"pass exactly one of {ids_name} and {embeds_name}")
    if input_ids is not None:
        check_ids(ids_name, input_ids, model.config.vocab_size)
        x = model.embed(input_ids)  # (B, N, d)
    else:
        d = model.config.d_model
        if not isinstance(inputs_embeds, torch.Tensor) or inputs_embeds.dim() != 3 or inputs_embeds.shape[-1] != d \
                or inputs_embeds.shape[1] == 0:
            got = list(inputs_embeds.shape) if isinstance(inputs_embeds, torch.Tensor) else type(inputs_embeds).__name__
            raise ValueError(f"{embeds_name} must be a float tensor [B, N, d_model={d}] with N >= 1, got {got}")
        x = inputs_embeds
    return x, check_padding_mask(mask_name, attention_mask, x.shape[:2], x.device)


@dataclasses.dataclass
class ModelOutput:
    """What every model returns. logits: (B, N, V) for LM heads, (B, n_labels) for a classifier,
    None without a head or with return_logits=False; loss: mean cross-entropy over the labels (see logprobs),
    when labels are given; hidden_states: embeddings + every block (only with output_hidden_states=True)."""

    logits: torch.Tensor | None
    last_hidden_state: torch.Tensor
    loss: torch.Tensor | None = None
    hidden_states: list[torch.Tensor] | None = None
    pooled: torch.Tensor | None = None
    encoder_last_hidden_state: torch.Tensor | None = None
