"""Scale-out on torch.distributed: process group set-up from torchrun's environment, DDP and
FSDP2 (``torch.distributed.fsdp.fully_shard``) wrapping for the Trainer, and tensor-parallel
inference of a DecoderLM (``torch.distributed.tensor.parallel``).

gloo on CPU, NCCL on GPUs. Under torchrun every process runs the same script:

    torchrun --nproc_per_node 2 train.py       # train.py: init(); Trainer(..., strategy="ddp").fit()
"""
from __future__ import annotations

import dataclasses
import os

import torch
import torch.distributed as dist
import torch.nn as nn

from .. import _validate as check

STRATEGIES = ("none", "ddp", "fsdp")


def init(backend: str | None = None) -> tuple[int, int]:
    """Joins the process group torchrun describes (RANK, WORLD_SIZE, MASTER_ADDR/PORT in the
    environment; gloo on CPU, nccl when CUDA is there); without torchrun, a single process.
    Returns (rank, world_size)."""
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return 0, 1
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group(backend)
    return dist.get_rank(), dist.get_world_size()


def rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main() -> bool:
    return rank_and_world()[0] == 0


def barrier() -> None:
    if rank_and_world()[1] > 1:
        dist.barrier()


def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    """The mean of t over the ranks (t itself in one process)."""
    if rank_and_world()[1] == 1:
        return t
    t = t.detach().clone()
    dist.all_reduce(t)
    return t / dist.get_world_size()


def any_rank(flag: bool) -> bool:
    """True when `flag` is True on any rank (`flag` itself in one process): a decision every rank
    takes together (stop, skip a step, refuse to save)."""
    if rank_and_world()[1] == 1:
        return bool(flag)
    t = torch.tensor([float(flag)], device=_device_type())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def _device_type() -> str:
    return "cuda" if torch.cuda.is_available() and dist.get_backend() == "nccl" else "cpu"


def wrap(model: nn.Module, strategy: str) -> nn.Module:
    """The model the Trainer steps: as is ("none"), in DistributedDataParallel ("ddp"), or sharded
    in place by FSDP2 ("fsdp": each transformer block, then the root, is ``fully_shard``-ed over
    all ranks; parameters become DTensors)."""
    check.choice("strategy", strategy, STRATEGIES)
    if strategy == "none":
        return model
    if not dist.is_initialized():
        raise RuntimeError(f"strategy={strategy!r} needs torch.distributed: run under torchrun (and call "
                           "fusedlm.training.distributed.init() first)")
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(_device_type(), (dist.get_world_size(),))
    for block in blocks(model):
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside a DDP wrapper (FSDP2 shards in place: the model itself)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def is_fsdp(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(unwrap(model), FSDPModule)


def blocks(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks of a fusedlm model (every ``blocks`` ModuleList inside it), the
    units FSDP2 shards one at a time."""
    found = []
    for name, module in model.named_modules():
        if name.endswith("blocks") and isinstance(module, nn.ModuleList):
            found.extend(module)
    return found


# ---------------------------------------------------------------------------------------------
# Tensor-parallel inference
# ---------------------------------------------------------------------------------------------
def tensor_parallel(model: nn.Module, world_size: int | None = None) -> nn.Module:
    """Shards a DecoderLM's attention and MLP projections over the ranks, in place (Megatron's
    plan): q/k/v and gate/up column-wise (each rank owns H / W query heads, Hkv / W key-value
    heads, d_ff / W hidden units), o and down row-wise, whose partial outputs are summed by one
    all-reduce each: two per block. Embeddings, norms and the LM head stay replicated.

    Every rank must hold the same weights before the call (build with one seed, or load the same
    checkpoint). The attention modules and the model's KV cache are told their local head
    counts, so ``fusedlm.generation.generate(model, ...)`` runs unchanged on every rank and
    returns the same tokens on each."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    from ..models import KVCache

    if not dist.is_initialized():
        raise RuntimeError("tensor_parallel needs torch.distributed: run under torchrun and call init() first")
    w = world_size or dist.get_world_size()
    cfg = model.config
    if getattr(model, "decoder", None) is None or cfg.arch != "decoder":
        raise ValueError(f"tensor_parallel shards a DecoderLM, got {type(model).__name__}")
    for name, n in (("n_heads", cfg.n_heads), ("n_kv_heads", cfg.n_kv_heads), ("d_ff", cfg.d_ff)):
        if n % w:
            raise ValueError(f"config.{name}={n} must be divisible by the {w} tensor-parallel ranks")
    plan = {}
    for i, block in enumerate(model.decoder.blocks):
        for proj in ("q_proj", "k_proj", "v_proj"):
            plan[f"decoder.blocks.{i}.attn.{proj}"] = ColwiseParallel()
        plan[f"decoder.blocks.{i}.attn.o_proj"] = RowwiseParallel()
        for proj in ("gate_proj", "up_proj"):
            if hasattr(block.mlp, proj):
                plan[f"decoder.blocks.{i}.mlp.{proj}"] = ColwiseParallel()
        plan[f"decoder.blocks.{i}.mlp.down_proj"] = RowwiseParallel()
        block.attn.n_heads, block.attn.n_kv_heads = cfg.n_heads // w, cfg.n_kv_heads // w
    parallelize_module(model, init_device_mesh(_device_type(), (w,)), plan)
    local = dataclasses.replace(cfg, n_heads=cfg.n_heads // w, n_kv_heads=cfg.n_kv_heads // w)

    def new_cache(batch: int, max_len: int) -> KVCache:  # the cache holds this rank's heads only
        p = model.tok_embed.weight
        return KVCache(local, local.n_layers, batch, max_len, dtype=p.dtype, device=p.device)

    model.new_cache = new_cache
    return model


def load_tensor_parallel(config, weights: str) -> nn.Module:
    """A DecoderLM built on the meta device, sharded by :func:`tensor_parallel`, then filled from
    `weights` (a fusedlm model.safetensors, e.g. a Trainer checkpoint's): each rank reads only its
    own slice of every sharded projection, so no rank ever holds the whole model."""
    from safetensors import safe_open
    from torch.distributed.tensor import DTensor, Shard

    from ..models import build

    with torch.device("meta"):
        model = build(config)
    tensor_parallel(model)
    model.to_empty(device=_device_type())
    rank, w = dist.get_rank(), dist.get_world_size()
    with safe_open(weights, framework="pt") as f, torch.no_grad():
        names = set(f.keys())
        for name, t in [*model.named_parameters(), *model.named_buffers()]:
            if name not in names:
                raise ValueError(f"{weights} has no tensor {name!r}: a tensor-parallel load needs the model's full state dict")
            if isinstance(t, DTensor):
                (placement,) = t.placements
                local = t.to_local()
                if isinstance(placement, Shard):
                    n = t.shape[placement.dim] // w
                    index = [slice(None)] * t.dim()
                    index[placement.dim] = slice(rank * n, (rank + 1) * n)
                    local.copy_(f.get_slice(name)[tuple(index)])
                else:
                    local.copy_(f.get_tensor(name))
            else:
                t.copy_(f.get_tensor(name))
    return model.eval()
