"""Reference NF4 (4-bit NormalFloat) quantisation, in plain PyTorch.

Byte-compatible with ``bitsandbytes.functional.quantize_4bit(w, quant_type="nf4")``:

* ``w`` is flattened and cut into blocks of ``blocksize`` elements (the last block may be
  shorter); each block is scaled by its absolute maximum ``absmax`` into [-1, 1];
* each scaled value becomes the index of the nearest entry of :data:`NF4_CODE` (a value exactly
  half-way between two entries takes the lower one), found as the number of midpoints below it;
* two indices share a byte, element ``2j`` in the high nibble and ``2j + 1`` in the low one; an
  odd element count is padded with the code of 0.0 (index 7);
* ``data`` has shape ``[ceil(n / 2), 1]`` (uint8) and ``absmax`` shape ``[n_blocks]`` (float32).

Double quantisation (QLoRA's, bitsandbytes' ``compress_statistics=True``) stores absmax in 8 bits:
``offset = absmax.mean()``; ``absmax - offset`` is quantised in blocks of 256 with the signed
8-bit dynamic map (:func:`dynamic_map`), keeping one float32 scale per block (``nested_absmax``).

This module imports nothing of fusedlm: it is the ground truth the kernels are tested against,
and the one place the NF4 code table lives.
"""
from __future__ import annotations

import functools

import torch

# The 16 NF4 values (QLoRA, Dettmers et al. 2023): quantiles of N(0, 1) scaled to [-1, 1], with an
# exact zero. The kernels receive this table (and its midpoints) as an argument.
NF4_CODE = torch.tensor(
    [
        -1.0,
        -0.6961928009986877,
        -0.5250730514526367,
        -0.39491748809814453,
        -0.28444138169288635,
        -0.18477343022823334,
        -0.09105003625154495,
        0.0,
        0.07958029955625534,
        0.16093020141124725,
        0.24611230194568634,
        0.33791524171829224,
        0.44070982933044434,
        0.5626170039176941,
        0.7229568362236023,
        1.0,
    ],
    dtype=torch.float32,
)

# Decision boundaries between neighbouring codes, computed in float32 as bitsandbytes does.
NF4_MIDPOINTS = (NF4_CODE[:-1] + NF4_CODE[1:]) / 2

BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
NESTED_BLOCKSIZE = 256  # blocksize of the 8-bit quantisation of absmax


def quantize(w: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Packs `w` (any shape, float) into NF4. Returns ``(data [ceil(n/2), 1] uint8, absmax [blocks] fp32)``."""
    flat = w.reshape(-1).float()
    n = flat.numel()
    full = n - n % blocksize
    blocks = flat[:full].view(-1, blocksize)
    absmax = blocks.abs().amax(dim=1)
    # Full blocks multiply by the reciprocal, the short tail block divides: as bitsandbytes does,
    # which matters for the last bit of the scaled value.
    scaled = (blocks * (1.0 / absmax.clamp(min=1e-38)).unsqueeze(1)).clamp(-1, 1).reshape(-1)
    if full < n:
        tail_absmax = flat[full:].abs().amax().clamp(min=1e-38)
        absmax = torch.cat([absmax, tail_absmax.view(1)])
        scaled = torch.cat([scaled, (flat[full:] / tail_absmax).clamp(-1, 1)])
    if n % 2:
        scaled = torch.cat([scaled, scaled.new_zeros(1)])
    index = torch.bucketize(scaled, NF4_MIDPOINTS.to(w.device)).to(torch.uint8)
    data = (index[0::2] << 4) | index[1::2]
    return data.view(-1, 1), absmax


def dequantize(data: torch.Tensor, absmax: torch.Tensor, blocksize: int, shape, dtype: torch.dtype) -> torch.Tensor:
    """Unpacks NF4 `data` with float32 `absmax` into a tensor of `shape` and `dtype`."""
    n = 1
    for s in shape:
        n *= s
    packed = data.reshape(-1)
    index = torch.stack([packed >> 4, packed & 0xF], dim=1).reshape(-1)[:n].long()
    values = NF4_CODE.to(data.device)[index]
    scale = absmax.float().repeat_interleave(blocksize)[:n]
    return (values * scale).to(dtype).reshape(shape)


def matmul(x: torch.Tensor, data: torch.Tensor, absmax: torch.Tensor, blocksize: int, shape, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ W.T + bias`` with ``W = dequantize(...)`` of `shape` [N, K]; computed in float32, returned in x.dtype."""
    w = dequantize(data, absmax, blocksize, shape, torch.float32)
    out = x.float() @ w.T
    if bias is not None:
        out = out + bias.float()
    return out.to(x.dtype)


@functools.cache
def dynamic_map() -> torch.Tensor:
    """bitsandbytes' signed 8-bit dynamic quantisation map (``create_dynamic_map(signed=True)``), sorted."""
    non_sign_bits, max_exponent_bits = 7, 7
    values: list[float] = []
    for i in range(max_exponent_bits):
        fraction_items = 2 ** (i + non_sign_bits - max_exponent_bits) + 1
        boundaries = torch.linspace(0.1, 1, fraction_items, dtype=torch.float32)
        means = (boundaries[:-1] + boundaries[1:]) / 2.0
        scale = 10 ** (-(max_exponent_bits - 1) + i)
        values += (scale * means).tolist()
        values += (-scale * means).tolist()
    values += [0.0, 1.0]
    values += [0.0] * (256 - len(values))
    return torch.tensor(values, dtype=torch.float32).sort().values


@functools.cache
def _absmax_code_table() -> torch.Tensor:
    """bitsandbytes' CPU lookup table for the 8-bit map: entry i is the index of the map entry
    nearest to ``i / 32767.5 - 1`` (float32; a tie takes the lower entry), i = 0 ... 65535."""
    code = dynamic_map()
    grid = torch.arange(65536, dtype=torch.float32) / 32767.5 - 1
    lower = (torch.searchsorted(code, grid, right=True) - 1).clamp(0, 255)
    upper = (lower + 1).clamp(max=255)
    take_upper = (code[upper] - grid).abs() < (grid - code[lower]).abs()
    return torch.where(take_upper, upper, lower).to(torch.uint8)


def quantize_absmax(absmax: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Double quantisation: returns ``(codes uint8 [blocks], nested_absmax fp32 [ceil(blocks/256)], offset fp32 [])``.

    The 8-bit codes are bitsandbytes' (CPU) exactly: the scaled value v in [-1, 1] is first rounded
    to a grid of 65536 points, ``trunc((v + 1) * 32767.5 + 0.5)`` in float32, and the grid point
    takes the map entry nearest to it (:func:`_absmax_code_table`). That is the nearest entry to v
    itself except for values within half a grid step (1.5e-5) of a decision boundary.
    """
    offset = absmax.mean()
    centred = absmax - offset
    n = centred.numel()
    pad = (-n) % NESTED_BLOCKSIZE
    blocks = torch.cat([centred, centred.new_zeros(pad)]).view(-1, NESTED_BLOCKSIZE)
    nested_absmax = blocks.abs().amax(dim=1)
    # bitsandbytes divides without clamping; a block of zeros gives 0/0 = NaN, stored as code 0
    # (which dequantises to 0 * nested_absmax + offset, the right value).
    scaled = (blocks / nested_absmax.unsqueeze(1)).reshape(-1)[:n]
    grid_index = torch.trunc((scaled + 1) * 32767.5 + 0.5).nan_to_num(0).long().clamp(0, 65535)
    codes = _absmax_code_table().to(absmax.device)[grid_index]
    codes = torch.where(torch.isnan(scaled), 0, codes).to(torch.uint8)
    return codes, nested_absmax, offset


def dequantize_absmax(codes: torch.Tensor, nested_absmax: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`quantize_absmax`: float32 absmax [blocks]."""
    code = dynamic_map().to(codes.device)
    scale = nested_absmax.repeat_interleave(NESTED_BLOCKSIZE)[: codes.numel()]
    return code[codes.long()] * scale + offset
