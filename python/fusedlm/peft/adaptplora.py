"""AdaPtLoRA: adaptive prompt tuning + LoRA for many tasks in one batch.

    mt = peft.apply_adaptplora(model, n_tasks=4, n_prompt_tokens=8, r=8, targets=("q", "v"))
    out = mt(ids, task_ids=torch.tensor([0, 3, 1]), attention_mask=mask)
    peft.freeze_gate(mt, task=2, layers=["decoder.blocks.0.attn.q_proj"])   # no LoRA there for task 2

Per task t: a soft prompt P_t (l_p, d) prepended to the input embeddings (as prompt tuning does, see
``fusedlm.peft.prompts``), and at each insertion point (an adapted linear) the shared low-rank A, B
with a task gate s_t = sigmoid(g_t) ∈ [0, 1] (g_t a learned logit per task and insertion point):
ΔW_t = s_t · (α / r) · B A. A batch mixing tasks runs ONE ``ops.lora_linear`` call per layer: the
shared A, B are viewed as one adapter per task (``expand``, no copy) with the gates as the kernel's
per-adapter gates and the task ids as the row -> adapter map; autograd sums the per-task gradients
back into the shared A, B. Prompts, A, B and gate logits are trainable. :func:`freeze_gate` pins a
gate at 0 (a mask: s_t = sigmoid(g_t) · m_t, so g_t also gets no gradient), dropping LoRA from that
layer for that task: the method's adaptive placement. Init: A kaiming-uniform, B zero (the LoRA
part starts at zero), gate logits 0 (s = 0.5), prompts N(0, 1) or token embeddings.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .. import _validate as check
from .. import ops
from .lora import _base_weight, adapter_like, check_hparams, freeze_base, scaling_of
from .prompts import PromptModel, _check_model, token_init
from .routing import current_routing, install, routing
from .targets import find_targets, set_module


class GatedLoraLinear(nn.Module):
    """``base_layer`` + s_t · scaling · B A, with t the task of each sequence (``task_ids`` routing)."""

    def __init__(self, base_layer: nn.Module, n_tasks: int, r: int, alpha: float, dropout: float = 0.0, rslora: bool = False):
        super().__init__()
        device, dtype = adapter_like(base_layer)
        self.base_layer = base_layer
        k, n = base_layer.in_features, base_layer.out_features
        self.lora_A = nn.Linear(k, r, bias=False, device=device, dtype=dtype)
        self.lora_B = nn.Linear(r, n, bias=False, device=device, dtype=dtype)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        self.gate_logits = nn.Parameter(torch.zeros(n_tasks, device=device))
        self.register_buffer("gate_mask", torch.ones(n_tasks, device=device))
        self.r, self.scaling, self.dropout = r, scaling_of(r, alpha, rslora), dropout
        self.peft_disabled = False

    def gates(self) -> torch.Tensor:
        """s_t for every task, float32 [T]."""
        return torch.sigmoid(self.gate_logits) * self.gate_mask

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.peft_disabled:
            return self.base_layer(x)
        ids = current_routing().task_ids
        if ids is None:
            raise ValueError("an AdaPtLoRA layer needs task_ids [B] (run the model through its AdaPtLoRAModel, or pass task_ids=)")
        rows = x.numel() // x.shape[-1]
        if ids.shape[0] == 0 or rows % ids.shape[0]:
            raise ValueError(f"task_ids has {ids.shape[0]} entries but the layer input {list(x.shape)} is not a batch of that many")
        n_tasks = self.gate_logits.shape[0]
        row_ids = ids.long().repeat_interleave(rows // ids.shape[0])  # [M]
        lora_a = self.lora_A.weight.expand(n_tasks, *self.lora_A.weight.shape)  # [T, r, K], a view of the shared A
        lora_b = self.lora_B.weight.expand(n_tasks, *self.lora_B.weight.shape)  # [T, N, r]
        return ops.lora_linear(x, _base_weight(self.base_layer), lora_a, lora_b, self.scaling, bias=self.base_layer.bias,
                               adapter_ids=row_ids, gates=self.gates(), dropout_p=self.dropout if self.training else 0.0)

    def extra_repr(self) -> str:
        return f"r={self.r}, scaling={self.scaling:g}, tasks={self.gate_logits.shape[0]}"


class TaskPrompts(nn.Module):
    """One soft prompt per task: ``embedding`` (T, l_p, d)."""

    def __init__(self, n_tasks: int, length: int, dim: int, init: torch.Tensor | None = None):
        super().__init__()
        self.embedding = nn.Parameter(torch.randn(n_tasks, length, dim) if init is None else init.expand(n_tasks, length, dim).clone())

    def forward(self) -> torch.Tensor:
        return self.embedding


class AdaPtLoRAModel(PromptModel):
    """A model with per-task soft prompts and gated LoRA layers; forward needs ``task_ids`` [B],
    values in [0, n_tasks) (every row has a task: its prompt fixes the row's length)."""

    def __init__(self, model: nn.Module, prompts: TaskPrompts, n_tasks: int):
        super().__init__(model, prompts, "prompt_tuning", prompts.embedding.shape[1])
        self.n_tasks = n_tasks
        self.n_submodules = 1

    def prompts(self, b: int, dtype: torch.dtype) -> torch.Tensor:
        ids = current_routing().task_ids
        return self.prompt_encoder()[ids.long()].to(dtype)  # (B, l_p, d)

    def _task_ids(self, task_ids, b: int) -> torch.Tensor:
        if not isinstance(task_ids, torch.Tensor) or task_ids.dtype not in (torch.int64, torch.int32) or tuple(task_ids.shape) != (b,):
            got = list(task_ids.shape) if isinstance(task_ids, torch.Tensor) else type(task_ids).__name__
            raise ValueError(f"task_ids must be an integer tensor [B] = [{b}], got {got}")
        if b and (int(task_ids.min()) < 0 or int(task_ids.max()) >= self.n_tasks):
            raise ValueError(f"task_ids must lie in [0, {self.n_tasks}), got values in [{int(task_ids.min())}, {int(task_ids.max())}]")
        return task_ids

    def forward(self, input_ids: torch.Tensor | None = None, *, task_ids: torch.Tensor, **kwargs):
        first = next(t for t in (input_ids, kwargs.get("inputs_embeds"), kwargs.get("decoder_input_ids"),
                                 kwargs.get("encoder_out")) if t is not None)
        task_ids = self._task_ids(task_ids, first.shape[0])
        with routing(first.shape[0], task_ids=task_ids):  # prompts() reads the task of each row
            return super().forward(input_ids, task_ids=task_ids, **kwargs)

    def encode(self, input_ids=None, attention_mask=None, *, inputs_embeds=None, task_ids=None, **kwargs):
        b = (input_ids if input_ids is not None else inputs_embeds).shape[0]
        task_ids = self._task_ids(task_ids, b)
        return super().encode(input_ids, attention_mask, inputs_embeds=inputs_embeds, task_ids=task_ids, **kwargs)


def gated_layers(model: nn.Module) -> list[tuple[str, GatedLoraLinear]]:
    return [(p, m) for p, m in model.named_modules() if isinstance(m, GatedLoraLinear)]


def apply_adaptplora(model: nn.Module, *, n_tasks: int, n_prompt_tokens: int = 8, r: int = 8, alpha: float = 16,
                     dropout: float = 0.0, targets=("q", "v"), rslora: bool = False, init_token_ids=None) -> AdaPtLoRAModel:
    """Freezes `model`, puts a gated shared LoRA on each of its `targets` and returns the
    :class:`AdaPtLoRAModel` that prepends the per-task prompts (length n_prompt_tokens)."""
    _check_model(model)
    n_tasks = check.positive_int("n_tasks", n_tasks)
    length = check.positive_int("n_prompt_tokens", n_prompt_tokens)
    r, alpha, dropout = check_hparams(r, alpha, dropout, "adaptplora")
    found = find_targets(model, targets)
    freeze_base(model)
    for path, module in found:
        set_module(model, path, GatedLoraLinear(module, n_tasks, r, alpha, dropout, bool(rslora)))
    init = None if init_token_ids is None else token_init(model, init_token_ids, length)
    prompts = TaskPrompts(n_tasks, length, model.config.d_model, init).to(model.tok_embed.weight.device)
    return AdaPtLoRAModel(install(model), prompts, n_tasks)


@torch.no_grad()
def freeze_gate(model: nn.Module, task: int, layers=None) -> None:
    """Pins task `task`'s gate at 0 (no LoRA for that task) in `layers` (module paths as in
    ``named_modules()`` of `model`; None = every gated layer)."""
    gated = dict(gated_layers(model))
    if not gated:
        raise ValueError(f"this {type(model).__name__} has no AdaPtLoRA layer")
    n_tasks = next(iter(gated.values())).gate_logits.shape[0]
    check.integer("task", task, low=0, high=n_tasks - 1)
    names = list(gated) if layers is None else list(layers)
    unknown = [n for n in names if n not in gated]
    if unknown:
        raise ValueError(f"not AdaPtLoRA layers: {unknown[:3]}; gated layers look like {next(iter(gated))!r}")
    for n in names:
        gated[n].gate_mask[task] = 0.0
