"""GGUF tensors as blocks of 32 quantized values: the one layout chatstream's kernels compute on.

A :class:`BlockWeight` keeps a ``[out, in]`` matrix as blocks of 32 values along ``in``, each block
with an fp16 scale ``d`` (and, 4-bit, an fp16 offset ``m``): ``value = d * q + m``.

- ``Q8_0`` is that layout already (8-bit ``q``): its bytes are only split into ``q`` and ``d``.
- ``Q4_0`` and ``Q4_1`` too (4-bit ``q``, two per byte as ggml packs them): ``Q4_0`` gets
  ``m = -8 d``, exactly.
- ``Q4_K`` (super-blocks of 256 with 6-bit sub-block scales and mins) becomes 4-bit blocks of 32
  with ``d = d_super * scale`` and ``m = -dmin * min`` rounded to fp16 (a relative 2^-11 of the
  scale, far below the format's own 4-bit step); same bytes per weight but for 0.0625 more.
- Every other type (``Q6_K``, ``Q5_*``, ``Q2_K``/``Q3_K``/``Q5_K``, I-quants, F16, BF16, F32
  matrices) is dequantized with the ``gguf`` package a few thousand rows at a time and
  requantized to 8-bit blocks (``Q8_0``'s scheme: 1.0625 bytes a weight; its rounding error is
  under half of a 6-bit format's step).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from gguf import GGMLQuantizationType as T
from gguf import quants

# Types computed on as stored (or as an exact/near-exact re-layout); others are requantized to 8 bits.
NATIVE_TYPES: tuple[str, ...] = ("Q4_0", "Q4_1", "Q8_0", "Q4_K")
_ROWS_PER_CHUNK = 4096  # rows dequantized at once for the requantized types (bounds peak memory)


@dataclass
class BlockWeight:
    """A ``[out_features, in_features]`` matrix in blocks of 32 (``in_features`` a multiple of 32).

    ``kind`` 4: ``qs`` uint8 ``[out, in / 2]`` (byte j of a block: value j in the low nibble, value
    j + 16 in the high one), ``m`` fp16 ``[out, in / 32]``. ``kind`` 8: ``qs`` int8 ``[out, in]``,
    ``m`` None. ``d``: fp16 ``[out, in / 32]``. ``source`` names the GGUF type it came from.
    """

    kind: int
    qs: torch.Tensor
    d: torch.Tensor
    m: torch.Tensor | None
    out_features: int
    in_features: int
    source: str = ""

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.qs, self.d, self.m) if t is not None)

    def values(self, rows: torch.Tensor | None = None) -> torch.Tensor:
        """The float32 matrix (or only ``rows`` of it): what the kernels multiply by."""
        qs, d = (self.qs, self.d) if rows is None else (self.qs[rows], self.d[rows])
        n = qs.shape[0]
        if self.kind == 4:
            assert self.m is not None
            m = self.m if rows is None else self.m[rows]
            q = qs.view(n, -1, 16)
            q = torch.cat([q & 0x0F, q >> 4], dim=-1).float()  # [n, blocks, 32]
            out = q * d.float()[..., None] + m.float()[..., None]
        else:
            out = qs.view(n, -1, 32).float() * d.float()[..., None]
        return out.reshape(n, self.in_features)

    def permute_rows(self, index: np.ndarray) -> BlockWeight:
        """The same matrix with its rows (output channels) reordered: ``new[i] = old[index[i]]``."""
        idx = torch.from_numpy(index)
        m = None if self.m is None else self.m[idx].contiguous()
        return BlockWeight(self.kind, self.qs[idx].contiguous(), self.d[idx].contiguous(), m,
                           self.out_features, self.in_features, self.source)


@dataclass
class TiledWeight:
    """A :class:`BlockWeight` laid out for the kernels (``quant/kernels.c``): 16 output channels side
    by side, block after block, values unsigned (``value = d * u + m``; 8-bit: ``u = q + 128``,
    ``m = -128 d``, not stored). Same bytes as the blocks, plus zero padding to 16 channels."""

    kind: int
    qs: torch.Tensor  # uint8 [tiles, blocks, groups (4-bit: 4, 8-bit: 8), 16, 4]
    d: torch.Tensor  # fp16 [tiles, blocks, 16]
    m: torch.Tensor | None  # fp16 [tiles, blocks, 16], 4-bit only
    out_features: int
    in_features: int
    source: str = ""

    @classmethod
    def from_blocks(cls, w: BlockWeight) -> TiledWeight:
        tiles, nb = -(-w.out_features // 16), w.in_features // 32
        pad = tiles * 16 - w.out_features

        def padded(t: torch.Tensor) -> torch.Tensor:
            return torch.cat([t, t.new_zeros(pad, t.shape[1])]) if pad else t

        if w.kind == 4:  # byte j of a block (values j and j + 16) goes to group j // 4, lane j % 4
            qs = padded(w.qs).view(tiles, 16, nb, 4, 4).permute(0, 2, 3, 1, 4)
        else:
            qs = (padded(w.qs).view(torch.uint8) ^ 0x80).view(tiles, 16, nb, 8, 4).permute(0, 2, 3, 1, 4)

        def scales(t: torch.Tensor) -> torch.Tensor:
            return padded(t).view(tiles, 16, nb).permute(0, 2, 1).contiguous()

        return cls(w.kind, qs.contiguous(), scales(w.d), None if w.m is None else scales(w.m),
                   w.out_features, w.in_features, w.source)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.qs, self.d, self.m) if t is not None)

    def values(self, rows: torch.Tensor | None = None) -> torch.Tensor:
        """The float32 matrix (or only ``rows`` of it)."""
        ids = torch.arange(self.out_features) if rows is None else rows
        tile, lane = ids // 16, ids % 16
        qs = self.qs[tile, :, :, lane]  # [n, blocks, groups, 4]
        n = qs.shape[0]
        if self.kind == 4:
            u = torch.cat([qs & 0x0F, qs >> 4], dim=2).reshape(n, -1, 32).float()
        else:
            u = qs.reshape(n, -1, 32).float()
        d = self.d[tile, :, lane].float()  # [n, blocks]
        m = self.m[tile, :, lane].float() if self.m is not None else -128 * d
        return (u * d[..., None] + m[..., None]).reshape(n, self.in_features)


def from_gguf(data: np.ndarray, type_name: str, shape: tuple[int, ...]) -> BlockWeight:
    """A :class:`BlockWeight` from a 2-D GGUF tensor's bytes (as stored: one row of blocks per
    output channel); ``shape`` is ``(out, in)``. Copies only what the layout change needs."""
    out_features, in_features = shape
    if in_features % 32:
        raise ValueError(f"rows of {in_features} values are not whole blocks of 32")
    raw = np.ascontiguousarray(data).view(np.uint8).reshape(out_features, -1)
    nb = in_features // 32
    if type_name == "Q8_0":
        blocks = raw.reshape(out_features, nb, 34)
        return _weight(8, blocks[..., 2:].view(np.int8), blocks[..., :2], None, shape, type_name)
    if type_name == "Q4_0":
        blocks = raw.reshape(out_features, nb, 18)
        d = blocks[..., :2].view(np.float16)
        return _weight(4, blocks[..., 2:], d, (d.astype(np.float32) * -8).astype(np.float16), shape, type_name)
    if type_name == "Q4_1":
        blocks = raw.reshape(out_features, nb, 20)
        return _weight(4, blocks[..., 4:], blocks[..., :2], blocks[..., 2:4], shape, type_name)
    if type_name == "Q4_K":
        return _from_q4_k(raw, shape)
    return requantize_q8(dequantize_rows(raw, type_name, shape), type_name)


def dequantize_rows(raw: np.ndarray, type_name: str, shape: tuple[int, ...]) -> np.ndarray:
    """float32 ``[out, in]`` of any type the ``gguf`` package reads (the reference for the tests)."""
    qtype = T[type_name]
    if qtype in (T.F32, T.F16, T.BF16):
        return quants.dequantize(raw.view(np.uint8), qtype).reshape(shape)
    return quants.dequantize(np.ascontiguousarray(raw).view(np.uint8), qtype).reshape(shape)


def requantize_q8(values: np.ndarray, source: str, chunk: int = _ROWS_PER_CHUNK) -> BlockWeight:
    """8-bit blocks of 32 of a float matrix (Q8_0's scheme), ``chunk`` rows at a time."""
    out_features, in_features = values.shape
    qs = np.empty((out_features, in_features), dtype=np.int8)
    d = np.empty((out_features, in_features // 32), dtype=np.float16)
    for start in range(0, out_features, chunk):
        rows = np.asarray(values[start : start + chunk], dtype=np.float32).reshape(-1, in_features // 32, 32)
        scale = (np.abs(rows).max(axis=-1) / 127).astype(np.float16)
        safe = np.where(scale == 0, 1, scale).astype(np.float32)
        qs[start : start + chunk] = np.clip(np.rint(rows / safe[..., None]), -127, 127).reshape(len(rows), -1)
        d[start : start + chunk] = scale
    return _weight(8, qs, d, None, (out_features, in_features), source)


def _from_q4_k(raw: np.ndarray, shape: tuple[int, ...]) -> BlockWeight:
    out_features, in_features = shape
    blocks = raw.reshape(-1, 144)  # d, dmin (fp16), 12 bytes of 6-bit scales and mins, 128 of nibbles
    d = blocks[:, :2].view(np.float16).astype(np.float32)
    dmin = blocks[:, 2:4].view(np.float16).astype(np.float32)
    sc, mn = quants.Q4_K.get_scale_min(blocks[:, 4:16])
    # 64 values per 32 bytes: the low nibbles are sub-block 2i, the high nibbles sub-block 2i + 1.
    qs = blocks[:, 16:].reshape(-1, 4, 1, 32) >> np.array([0, 4], dtype=np.uint8).reshape(1, 1, 2, 1)
    values = (qs & 0x0F).reshape(-1, 32)  # one row per sub-block of 32
    packed = values[:, :16] | (values[:, 16:] << 4)  # ggml's 4-bit block layout
    return _weight(
        4, packed.reshape(out_features, -1),
        (d * sc.astype(np.float32)).astype(np.float16).reshape(out_features, -1),
        (-dmin * mn.astype(np.float32)).astype(np.float16).reshape(out_features, -1),
        shape, "Q4_K",
    )


def _weight(kind: int, qs: np.ndarray, d: np.ndarray, m: np.ndarray | None, shape: tuple[int, ...],
            source: str) -> BlockWeight:
    out_features, in_features = shape

    def tensor(a: np.ndarray, dtype: np.dtype) -> torch.Tensor:
        return torch.from_numpy(np.array(a, order="C").view(dtype).reshape(out_features, -1))

    return BlockWeight(
        kind, tensor(qs, np.dtype(np.uint8 if kind == 4 else np.int8)), tensor(d, np.dtype(np.float16)),
        None if m is None else tensor(m, np.dtype(np.float16)), out_features, in_features, source,
    )
