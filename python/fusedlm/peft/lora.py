"""LoRA: ``y = x Wᵀ + b + s · (dropout(x) Aᵀ) Bᵀ`` on chosen linears, every one a ``ops.lora_linear`` call.

    from fusedlm import peft
    peft.apply_lora(model, r=8, alpha=16, targets=("q", "v"))            # adapter "default", active
    peft.apply_lora(model, r=16, alpha=32, targets="all", name="math")    # a second adapter (index 1)
    model(ids)                                                             # the active adapter
    model(ids, adapter_ids=torch.tensor([0, 1, -1]))                       # row 0 "default", 1 "math", 2 base
    peft.set_adapter(model, "math"); peft.merge(model); peft.unmerge(model)
    with peft.disable(model): model(ids)                                   # the base model

Each adapted linear becomes a :class:`LoraLinear` holding the original layer as ``base_layer`` and,
per adapter name, ``lora_A[name]`` (``nn.Linear(K, r)``, A ``[r, K]``) and ``lora_B[name]``
(``nn.Linear(r, N)``, B ``[N, r]``), peft's layout and init (A kaiming-uniform with a = sqrt(5),
B zero, so an adapted model starts equal to its base); s = alpha / r (rsLoRA: alpha / sqrt(r)).
The base layer is an ``nn.Linear`` or a 4-bit :class:`fusedlm.nn.NF4Linear` (QLoRA).

Mixed batches: ``adapter_ids`` (LongTensor [B], index = the order adapters were added, -1 = none)
reach the layers through :mod:`fusedlm.peft.routing` (the forward pre-hook apply_lora installs on
the model); each layer then makes ONE ``ops.lora_linear`` call for the whole batch, with its
adapters stacked into ``lora_a [A, r_max, K]`` and ``lora_b [A, N, r_max]``. Adapters of different
ranks are zero-padded to the largest rank: the padded rows of A and columns of B contribute exact
zeros (and get no gradient: the padding is made from the parameters by ``F.pad``), and one call
keeps the kernel's single pass over the batch, where grouping by rank would cost one call per
distinct rank. Each adapter's scale enters as its gate (``gates[a] = s_a``, ``scaling = 1``).
Outside autograd the stacked tensors are cached until a parameter changes (decoding re-reads them
every step).
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from .. import _validate as check
from .. import ops
from ..nn import NF4Linear
from . import routing
from .targets import find_targets, set_module


@dataclasses.dataclass
class LoraConfig:
    """One named adapter's hyper-parameters (what apply_lora was given)."""

    name: str
    r: int
    alpha: float
    dropout: float
    rslora: bool
    targets: tuple[str, ...]

    @property
    def scaling(self) -> float:
        return scaling_of(self.r, self.alpha, self.rslora)


def scaling_of(r: int, alpha: float, rslora: bool) -> float:
    """peft's scale of an adapter of rank r: alpha / r, or alpha / sqrt(r) with rsLoRA."""
    return alpha / math.sqrt(r) if rslora else alpha / r


class LoraState:
    """What the LoRA layers of one model share: the adapters in the order they were added (their
    index is the value of ``adapter_ids``), the active one, and whether adapters are disabled."""

    def __init__(self):
        self.adapters: dict[str, LoraConfig] = {}
        self.active: str | None = None
        self.peft_disabled = False
        self._checked: torch.Tensor | None = None  # the last adapter_ids validated (one check per forward)

    def index(self, name: str) -> int:
        return list(self.adapters).index(name)

    def check_ids(self, ids: torch.Tensor) -> None:
        if ids is self._checked:
            return
        n = len(self.adapters)
        if ids.numel() and (int(ids.min()) < -1 or int(ids.max()) >= n):
            raise ValueError(f"adapter_ids must lie in [-1, {n}) (-1 = the base model; {n} adapter(s): "
                             f"{list(self.adapters)}), got values in [{int(ids.min())}, {int(ids.max())}]")
        self._checked = ids


_NF4_MERGE = ("cannot merge a LoRA adapter into a 4-bit (NF4Linear) base layer (QLoRA): the sum does not fit NF4; "
              "keep the adapter unmerged")


def _base_weight(base: nn.Module):
    """The weight ops.lora_linear multiplies: a dense tensor, or the NF4Weight of an NF4Linear."""
    return base.qweight if isinstance(base, NF4Linear) else base.weight


def adapter_like(base: nn.Module) -> tuple[torch.device, torch.dtype]:
    """The device and dtype of an adapter on `base`, an nn.Linear or NF4Linear (TypeError otherwise)."""
    if isinstance(base, NF4Linear):
        return base.weight.device, base.weight_dtype
    if isinstance(base, nn.Linear):
        return base.weight.device, base.weight.dtype
    raise TypeError(f"base_layer must be a torch.nn.Linear or fusedlm.nn.NF4Linear, got {type(base).__name__}")


class LoraLinear(nn.Module):
    """A linear layer with LoRA adapters: ``base_layer`` plus ``lora_A[name]`` / ``lora_B[name]``.

    x ``[..., K]`` -> ``[..., N]``. Which adapter runs: with ``adapter_ids`` in the current routing,
    each sequence's own (one ``ops.lora_linear`` call over the stacked adapters); otherwise the
    model's active adapter, if this layer has it; nothing when adapters are disabled or the active
    adapter is merged into the base weight.
    """

    def __init__(self, base_layer: nn.Module, state: LoraState):
        super().__init__()
        adapter_like(base_layer)
        self.base_layer = base_layer
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.r: dict[str, int] = {}
        self.scaling: dict[str, float] = {}
        self.dropout: dict[str, float] = {}
        self.merged: list[str] = []
        self._state = state
        self._stack_cache: tuple | None = None
        self._lut_cache: tuple | None = None

    def _new(self, name: str, r: int) -> tuple[nn.Linear, nn.Linear]:
        device, dtype = adapter_like(self.base_layer)  # the base may have been quantised since
        self.lora_A[name] = nn.Linear(self.in_features, r, bias=False, device=device, dtype=dtype)
        self.lora_B[name] = nn.Linear(r, self.out_features, bias=False, device=device, dtype=dtype)
        self._stack_cache = None
        return self.lora_A[name], self.lora_B[name]

    def add(self, config: LoraConfig) -> None:
        """Adds adapter `config.name` (A kaiming-uniform a=sqrt(5), B zero: the output is unchanged)."""
        a, b = self._new(config.name, config.r)
        nn.init.kaiming_uniform_(a.weight, a=math.sqrt(5))
        nn.init.zeros_(b.weight)
        self.r[config.name], self.scaling[config.name], self.dropout[config.name] = config.r, config.scaling, config.dropout

    def set_weights(self, name: str, a: torch.Tensor, b: torch.Tensor, scaling: float, dropout: float = 0.0) -> None:
        """Sets adapter `name` to A ``[r, K]``, B ``[N, r]``, scale `scaling` (loading a file)."""
        scaling = check.number("scaling", scaling)
        lin_a, lin_b = self._new(name, a.shape[0])
        with torch.no_grad():
            lin_a.weight.copy_(a)
            lin_b.weight.copy_(b)
        self.r[name], self.scaling[name], self.dropout[name] = a.shape[0], float(scaling), dropout

    def delta_weight(self, name: str) -> torch.Tensor:
        """s · B A ``[N, K]`` of adapter `name`, computed in float32."""
        return self.scaling[name] * (self.lora_B[name].weight.float() @ self.lora_A[name].weight.float())

    # ---- forward --------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        state = self._state
        if state.peft_disabled:
            return self.base_layer(x)
        ids = routing.current_routing().adapter_ids
        if ids is not None:
            return self._mixed(x, ids)
        name = state.active
        if name is None or name not in self.lora_A or name in self.merged:
            return self.base_layer(x)
        p = self.dropout[name] if self.training else 0.0
        return ops.lora_linear(x, _base_weight(self.base_layer), self.lora_A[name].weight, self.lora_B[name].weight,
                               self.scaling[name], bias=self.base_layer.bias, dropout_p=p, compute_dtype=self._compute_dtype())

    def _mixed(self, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Each sequence b with its adapter ids[b] (global index; -1 none): one lora_linear call."""
        if self.merged:
            raise ValueError(f"adapter(s) {self.merged} are merged into the base weight: unmerge before running a mixed batch "
                             "(adapter_ids)")
        state = self._state
        state.check_ids(ids)
        rows = x.numel() // x.shape[-1]
        if ids.shape[0] == 0 or rows % ids.shape[0]:
            raise ValueError(f"adapter_ids has {ids.shape[0]} entries but the layer input {list(x.shape)} is not a batch of that many")
        local = self._lut(ids.device)[ids.long() + 1]  # [B]: this layer's slot of each sequence's adapter, -1 none
        row_ids = local.repeat_interleave(rows // ids.shape[0])  # [M] over the flattened rows (batch first)
        lora_a, lora_b, gates = self._stacked()
        p = 0.0
        if self.training:
            drops = set(self.dropout[n] for n in self.lora_A)
            if len(drops) > 1:
                raise ValueError(f"a mixed-batch training step needs the adapters of one layer to share their dropout, got {sorted(drops)}")
            p = drops.pop()
        return ops.lora_linear(x, _base_weight(self.base_layer), lora_a, lora_b, 1.0, bias=self.base_layer.bias,
                               adapter_ids=row_ids, gates=gates, dropout_p=p, compute_dtype=self._compute_dtype())

    def _compute_dtype(self) -> torch.dtype | None:
        """The products' operand dtype: an NF4 base layer's compute_dtype (QLoRA), else x's."""
        return getattr(self.base_layer, "compute_dtype", None) if isinstance(self.base_layer, NF4Linear) else None

    def _lut(self, device) -> torch.Tensor:
        """LongTensor [1 + n_adapters]: global adapter index + 1 -> this layer's slot (-1: not here)."""
        names = list(self._state.adapters)
        key = (tuple(names), tuple(self.lora_A), device)
        if self._lut_cache is None or self._lut_cache[0] != key:
            mine = list(self.lora_A)
            lut = [-1] + [mine.index(n) if n in mine else -1 for n in names]
            self._lut_cache = (key, torch.tensor(lut, dtype=torch.long, device=device))
        return self._lut_cache[1]

    def _stacked(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """lora_a [A, r_max, K], lora_b [A, N, r_max] (ranks zero-padded), gates [A] = each adapter's scale."""
        names = list(self.lora_A)
        params = [p for n in names for p in (self.lora_A[n].weight, self.lora_B[n].weight)]
        tracked = torch.is_grad_enabled() and any(p.requires_grad for p in params)
        key = tuple((p.data_ptr(), p._version) for p in params) + tuple(self.scaling[n] for n in names)
        if not tracked and self._stack_cache is not None and self._stack_cache[0] == key:
            return self._stack_cache[1]
        r_max = max(self.r[n] for n in names)
        lora_a = torch.stack([F.pad(self.lora_A[n].weight, (0, 0, 0, r_max - self.r[n])) for n in names])
        # B stored [A, r_max, N] and passed as its [A, N, r_max] view: the kernel streams Bᵀ along N,
        # so this layout reaches it without a copy per call (a decode step re-reads every B).
        lora_b = torch.stack([F.pad(self.lora_B[n].weight, (0, r_max - self.r[n])).T for n in names]).transpose(1, 2)
        gates = torch.tensor([self.scaling[n] for n in names], dtype=torch.float32, device=lora_a.device)
        out = (lora_a, lora_b, gates)
        self._stack_cache = None if tracked else (key, tuple(t.detach() for t in out))
        return out

    # ---- merge ----------------------------------------------------------------------------------
    def merge(self, name: str) -> None:
        if isinstance(self.base_layer, NF4Linear):
            raise ValueError(_NF4_MERGE)
        if name in self.lora_A and name not in self.merged:
            w = self.base_layer.weight
            with torch.no_grad():
                w.copy_((w.float() + self.delta_weight(name)).to(w.dtype))
            self.merged.append(name)

    def unmerge(self) -> None:
        w = self.base_layer.weight
        with torch.no_grad():
            for name in reversed(self.merged):
                w.copy_((w.float() - self.delta_weight(name)).to(w.dtype))
        self.merged = []

    def extra_repr(self) -> str:
        return ", ".join(f"{n}: r={self.r[n]}, scaling={self.scaling[n]:g}" for n in self.lora_A)


# ---------------------------------------------------------------------------------------------
# model-level API
# ---------------------------------------------------------------------------------------------
def lora_layers(model: nn.Module) -> list[tuple[str, LoraLinear]]:
    return [(path, m) for path, m in model.named_modules() if isinstance(m, LoraLinear)]


def lora_state(model: nn.Module) -> LoraState | None:
    """The LoraState of `model` (shared by its LoRA layers), or None when it has no LoRA layer."""
    layers = lora_layers(model)
    return layers[0][1]._state if layers else None


def check_hparams(r, alpha, dropout, name) -> tuple[int, float, float]:
    """A LoRA adapter's rank (> 0), alpha (> 0), dropout (in [0, 1)) and name (no dots)."""
    if not isinstance(name, str) or not name or "." in name:
        raise ValueError(f"name must be a non-empty string without dots, got {name!r}")
    return (check.positive_int("r", r), check.number("alpha", alpha, low=0, low_open=True),
            check.probability("dropout", dropout, high_open=True))


def freeze_base(model: nn.Module) -> None:
    """requires_grad = False on every parameter (PEFT methods then enable their own)."""
    for p in model.parameters():
        p.requires_grad_(False)


def apply_lora(model: nn.Module, *, r: int = 8, alpha: float = 16, dropout: float = 0.0, targets=("q", "v"),
               rslora: bool = False, name: str = "default") -> nn.Module:
    """Adds LoRA adapter `name` to the `targets` of `model`, in place, and returns the model.

    targets: names out of ("q", "k", "v", "o", "gate", "up", "down") or "all" (every block linear,
    never the LM head). The base is frozen (every parameter but the LoRA weights); the new
    adapter's weights are trainable. The first adapter becomes the active one; later ones are
    used through ``adapter_ids`` or :func:`set_adapter`. Raises ValueError for r <= 0, an unknown
    target, a target the model does not have, or a name already in use.
    """
    r, alpha, dropout = check_hparams(r, alpha, dropout, name)
    found = find_targets(model, targets)
    state = lora_state(model) or LoraState()
    if name in state.adapters:
        raise ValueError(f"an adapter named {name!r} already exists on this model (adapters: {list(state.adapters)})")
    config = LoraConfig(name, r, alpha, dropout, bool(rslora), tuple(sorted({p.rsplit('.', 1)[1][:-5] for p, _ in found})))
    if not lora_layers(model):
        freeze_base(model)
    state.adapters[name] = config
    for path, module in found:
        if not isinstance(module, LoraLinear):
            module = LoraLinear(module, state)
            set_module(model, path, module)
        module.add(config)
    if state.active is None:
        state.active = name
    return routing.install(model)


def _require(model: nn.Module) -> LoraState:
    state = lora_state(model)
    if state is None:
        raise ValueError(f"this {type(model).__name__} has no LoRA adapter (use peft.apply_lora first)")
    return state


def adapter_names(model: nn.Module) -> list[str]:
    """The model's LoRA adapters in the order they were added: position = value in adapter_ids."""
    state = lora_state(model)
    return [] if state is None else list(state.adapters)


def set_adapter(model: nn.Module, name: str) -> None:
    """Makes `name` the active adapter; its weights become trainable and the others' frozen (peft's
    rule). On a model with merged adapters it unmerges them first, with a warning, as peft does:
    otherwise the merged adapter would keep running under the new one."""
    state = _require(model)
    if name not in state.adapters:
        raise ValueError(f"no adapter named {name!r}; adapters: {list(state.adapters)}")
    merged = sorted({n for _, layer in lora_layers(model) for n in layer.merged})
    if merged:
        warnings.warn(f"adapter(s) {merged} are merged into the base weights: unmerging them before activating {name!r}",
                      stacklevel=2)
        unmerge(model)
    state.active = name
    for _, layer in lora_layers(model):
        for n in layer.lora_A:
            for p in (layer.lora_A[n].weight, layer.lora_B[n].weight):
                p.requires_grad_(n == name)


@contextlib.contextmanager
def disable(model: nn.Module):
    """Inside the block `model` runs as its base model: every PEFT method on it is off (LoRA layers,
    AdaPtLoRA gates, a PromptModel's virtual tokens, bottleneck adapters: each module of these
    methods has a ``peft_disabled`` flag; LoRA layers share theirs through their LoraState)."""
    layers = lora_layers(model)
    if any(layer.merged for _, layer in layers):
        raise ValueError("an adapter is merged into the base weights: peft.unmerge(model) before disabling adapters")
    flagged = list({id(x): x for x in [layer._state for _, layer in layers]
                    + [m for m in model.modules() if hasattr(m, "peft_disabled")]}.values())
    if not flagged:
        raise ValueError(f"this {type(model).__name__} has no PEFT method applied (nothing to disable)")
    previous = [x.peft_disabled for x in flagged]
    for x in flagged:
        x.peft_disabled = True
    try:
        yield model
    finally:
        for x, p in zip(flagged, previous):
            x.peft_disabled = p


def merge(model: nn.Module, name: str | None = None) -> None:
    """Adds s · B A of adapter `name` (default: the active one) into each base weight; the layers then
    run the base product alone for that adapter. Raises ValueError on a 4-bit (QLoRA) base."""
    state = _require(model)
    name = state.active if name is None else name
    if name not in state.adapters:
        raise ValueError(f"no adapter named {name!r}; adapters: {list(state.adapters)}")
    layers = lora_layers(model)
    if any(isinstance(layer.base_layer, NF4Linear) for _, layer in layers if name in layer.lora_A):
        raise ValueError(_NF4_MERGE)  # before touching any layer
    for _, layer in layers:
        layer.merge(name)


def unmerge(model: nn.Module) -> None:
    """Subtracts every merged adapter from the base weights again (exact within float32 rounding)."""
    _require(model)
    for _, layer in lora_layers(model):
        layer.unmerge()
