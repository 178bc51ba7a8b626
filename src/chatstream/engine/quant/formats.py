"""GGUF tensors as blocks of 32 quantized values: the one layout chatstream's kernels compute on.

A :class:`BlockWeight` keeps a ``[out, in]`` matrix as blocks of 32 values along ``in``, each block
with an fp16 scale ``d`` (and, 4-bit, an fp16 offset ``m``): ``value = d * q + m``.

- ``Q8_0`` is that layout already (8-bit ``q``): its bytes are only split into ``q`` and ``d``.
- ``Q4_0`` and ``Q4_1`` too (4-bit ``q``, two per byte as ggml packs them): ``Q4_0`` gets
  ``m = -8 d``, exactly.
- ``Q4_K`` (super-blocks of 256 with 6-bit sub-block scales and mins) stays 4-bit blocks of 32
  with its integers (``kind`` 5): ``value = d_super * scale * q - dmin * min``, exactly the
  file's values; 0.578 bytes a weight (the file packs the 6-bit scales: 0.5625).
- ``Q6_K`` stays 6-bit with its own scales (``kind`` 6): each value's low 4 bits as a 4-bit
  block's, its high 2 bits four to a byte, the int8 sub-scale per 16 values and the fp16 scale
  per 256; ``value = d_super * scale * (u - 32)``, exactly the file's values in the file's bytes.
- Every other type (``Q5_*``, ``Q2_K``/``Q3_K``/``Q5_K``, I-quants, F16, BF16, F32
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
NATIVE_TYPES: tuple[str, ...] = ("Q4_0", "Q4_1", "Q8_0", "Q4_K", "Q6_K")
_ROWS_PER_CHUNK = 4096  # rows dequantized at once for the requantized types (bounds peak memory)


@dataclass
class BlockWeight:
    """A ``[out_features, in_features]`` matrix in blocks of 32 (``in_features`` a multiple of 32).

    ``kind`` 4: ``qs`` uint8 ``[out, in / 2]`` (byte j of a block: value j in the low nibble, value
    j + 16 in the high one), ``m`` fp16 ``[out, in / 32]``. ``kind`` 8: ``qs`` int8 ``[out, in]``,
    ``m`` None. ``d``: fp16 ``[out, in / 32]``. ``kind`` 6 (Q6_K, ``in`` a multiple of 256):
    ``qs`` the low 4 bits of ``u`` as kind 4's, ``qh`` uint8 ``[out, in / 4]`` their high 2 bits
    (8 bytes a block: byte ``4 h + j`` holds values ``16 h + 4 g + j``, g = 0..3, at bits ``2 g``),
    ``d`` int8 ``[out, in / 16]`` the sub-scales, ``m`` fp16 ``[out, in / 256]`` the super-block
    scales. ``kind`` 5 (Q4_K, ``in`` a multiple of 256): ``qs`` as kind 4's, ``d`` uint8
    ``[out, in / 16]`` each block's sub-scale and min, ``m`` fp16 ``[out, in / 128]`` each
    super-block's scale and negated min scale. ``source`` names the GGUF type it came from.
    """

    kind: int
    qs: torch.Tensor
    d: torch.Tensor
    m: torch.Tensor | None
    out_features: int
    in_features: int
    source: str = ""
    qh: torch.Tensor | None = None

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.qs, self.qh, self.d, self.m) if t is not None)

    def values(self, rows: torch.Tensor | None = None) -> torch.Tensor:
        """The float32 matrix (or only ``rows`` of it): what the kernels multiply by."""
        qs, d = (self.qs, self.d) if rows is None else (self.qs[rows], self.d[rows])
        n = qs.shape[0]
        if self.kind == 6:
            assert self.m is not None and self.qh is not None
            qh, m = (self.qh, self.m) if rows is None else (self.qh[rows], self.m[rows])
            q = qs.view(n, -1, 16)
            low = torch.cat([q & 0x0F, q >> 4], dim=-1)  # [n, blocks, 32]
            shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8).view(1, 1, 1, 4, 1)
            high = (qh.view(n, -1, 2, 1, 4) >> shifts) & 3  # [n, blocks, half, g, j]
            u = low | (high.reshape(n, -1, 32) << 4)
            return _q6_values(u.reshape(n, -1), d, m)
        if self.kind == 5:
            assert self.m is not None
            m = self.m if rows is None else self.m[rows]
            q = qs.view(n, -1, 16)
            u = torch.cat([q & 0x0F, q >> 4], dim=-1)  # [n, blocks, 32]
            return _q4_k_values(u, d.view(n, -1, 2), m.view(n, -1, 2))
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
        qh = None if self.qh is None else self.qh[idx].contiguous()
        return BlockWeight(self.kind, self.qs[idx].contiguous(), self.d[idx].contiguous(), m,
                           self.out_features, self.in_features, self.source, qh)


@dataclass
class TiledWeight:
    """A :class:`BlockWeight` laid out for the kernels (``quant/kernels.c``): 16 output channels side
    by side, block after block, values unsigned (``value = d * u + m``; 8-bit: ``u = q + 128``,
    ``m = -128 d``, not stored; 6-bit: ``value = m * d * (u - 32)``, ``d`` per 16 values, ``m``
    per 256). Same bytes as the blocks, plus zero padding to 16 channels."""

    kind: int
    qs: torch.Tensor  # uint8 [tiles, blocks, groups (4-bit: 4, 8-bit: 8), 16, 4]; 6-bit [tiles, blocks, 384]
    d: torch.Tensor  # fp16 [tiles, blocks, 16]; 6-bit: int8 [tiles, blocks, 2, 16]
    m: torch.Tensor | None  # fp16 [tiles, blocks, 16], 4-bit; 6-bit: fp16 [tiles, blocks / 8, 16]
    out_features: int
    in_features: int
    source: str = ""

    @classmethod
    def from_blocks(cls, w: BlockWeight) -> TiledWeight:
        tiles, nb = -(-w.out_features // 16), w.in_features // 32
        pad = tiles * 16 - w.out_features

        def padded(t: torch.Tensor) -> torch.Tensor:
            return torch.cat([t, t.new_zeros(pad, t.shape[1])]) if pad else t

        if w.kind == 6:  # low nibbles as kind 4's, then per block the two 64-byte vectors of high bits
            assert w.qh is not None and w.m is not None
            qs = torch.empty((tiles, nb, 384), dtype=torch.uint8)  # written in place: no copy of the whole
            qs[..., :256].view(tiles, nb, 4, 16, 4).copy_(padded(w.qs).view(tiles, 16, nb, 4, 4).permute(0, 2, 3, 1, 4))
            qs[..., 256:].view(tiles, nb, 2, 16, 4).copy_(padded(w.qh).view(tiles, 16, nb, 2, 4).permute(0, 2, 3, 1, 4))
            sub = padded(w.d.view(torch.uint8)).view(tiles, 16, nb, 2).permute(0, 2, 3, 1).contiguous()
            return cls(6, qs, sub.view(torch.int8),
                       padded(w.m).view(tiles, 16, nb // 8).permute(0, 2, 1).contiguous(),
                       w.out_features, w.in_features, w.source)
        if w.kind == 5:
            assert w.m is not None
            return cls(5, padded(w.qs).view(tiles, 16, nb, 4, 4).permute(0, 2, 3, 1, 4).contiguous(),
                       padded(w.d).view(tiles, 16, nb, 2).permute(0, 2, 3, 1).contiguous(),
                       padded(w.m).view(tiles, 16, nb // 8, 2).permute(0, 2, 3, 1).contiguous(),
                       w.out_features, w.in_features, w.source)
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
        n = len(ids)
        if self.kind == 6:
            assert self.m is not None
            low = self.qs[tile, :, :256].view(n, -1, 4, 16, 4)[torch.arange(n), :, :, lane]  # [n, blocks, g, j]
            high = self.qs[tile, :, 256:].view(n, -1, 2, 16, 4)[torch.arange(n), :, :, lane]  # [n, blocks, half, j]
            shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8).view(1, 1, 1, 4, 1)
            high = (high.unsqueeze(3) >> shifts) & 3  # [n, blocks, half, g, j]
            u = torch.cat([low & 0x0F, low >> 4], dim=2).reshape(n, -1, 32) | (high.reshape(n, -1, 32) << 4)
            sub = self.d[tile, :, :, lane].reshape(n, -1)  # [n, blocks * 2]
            return _q6_values(u.reshape(n, -1), sub, self.m[tile, :, lane])
        qs = self.qs[tile, :, :, lane]  # [n, blocks, groups, 4]
        if self.kind == 5:
            assert self.m is not None
            u = torch.cat([qs & 0x0F, qs >> 4], dim=2).reshape(n, -1, 32)
            return _q4_k_values(u, self.d[tile, :, :, lane], self.m[tile, :, :, lane])
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
    if type_name == "Q6_K":
        return _from_q6_k(raw, shape)
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


def _q4_k_values(u: torch.Tensor, sub: torch.Tensor, sup: torch.Tensor) -> torch.Tensor:
    """``u`` [n, blocks, 32] (0..15), ``sub`` [n, blocks, (scale, min)], ``sup`` [n, blocks / 8,
    (d, -dmin)] -> the float32 values [n, in], rounded as the ``gguf`` package does."""
    n = u.shape[0]
    sup = sup.float().repeat_interleave(8, dim=1)
    scale, offset = sup[..., 0] * sub[..., 0].float(), sup[..., 1] * sub[..., 1].float()
    return (scale[..., None] * u.float() + offset[..., None]).reshape(n, -1)


def _from_q4_k(raw: np.ndarray, shape: tuple[int, ...]) -> BlockWeight:
    out_features, in_features = shape
    if in_features % 256:
        raise ValueError(f"Q4_K rows of {in_features} values are not whole super-blocks of 256")
    blocks = raw.reshape(-1, 144)  # d, dmin (fp16), 12 bytes of 6-bit scales and mins, 128 of nibbles
    sc, mn = quants.Q4_K.get_scale_min(blocks[:, 4:16])
    # 64 values per 32 bytes: the low nibbles are sub-block 2i, the high nibbles sub-block 2i + 1.
    qs = blocks[:, 16:].reshape(-1, 4, 1, 32) >> np.array([0, 4], dtype=np.uint8).reshape(1, 1, 2, 1)
    values = (qs & 0x0F).reshape(-1, 32)  # one row per sub-block of 32
    packed = values[:, :16] | (values[:, 16:] << 4)  # ggml's 4-bit block layout
    sup = np.stack([blocks[:, :2].view(np.float16), -blocks[:, 2:4].view(np.float16)], axis=-1)  # [blocks, 1, 2]
    return BlockWeight(
        5, torch.from_numpy(np.ascontiguousarray(packed).reshape(out_features, -1)),
        torch.from_numpy(np.stack([sc, mn], axis=-1).astype(np.uint8).reshape(out_features, -1)),
        torch.from_numpy(np.ascontiguousarray(sup).reshape(out_features, -1)),
        out_features, in_features, "Q4_K",
    )


def _q6_values(u: torch.Tensor, sub: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """``d * sub * (u - 32)`` for ``u`` [n, in] (0..63), ``sub`` [n, in / 16], ``d`` [n, in / 256],
    rounded as the ``gguf`` package does (``d * sub`` first)."""
    n = u.shape[0]
    scale = d.float().repeat_interleave(16, dim=1) * sub.float()  # [n, in / 16]
    return (scale[..., None] * (u.view(n, -1, 16).float() - 32)).reshape(n, -1)


def _from_q6_k(raw: np.ndarray, shape: tuple[int, ...]) -> BlockWeight:
    out_features, in_features = shape
    if in_features % 256:
        raise ValueError(f"Q6_K rows of {in_features} values are not whole super-blocks of 256")
    blocks = raw.reshape(-1, 210)  # ql (128), qh (64), int8 scales (16), fp16 d
    low = np.empty((len(blocks), 128), dtype=np.uint8)
    high = np.empty((len(blocks), 64), dtype=np.uint8)
    step = _ROWS_PER_CHUNK * (in_features // 256)  # super-blocks at once (bounds the transient copies)
    for start in range(0, len(blocks), step):
        b = blocks[start : start + step]
        ql = (b[:, :128].reshape(-1, 2, 1, 64) >> np.array([0, 4], dtype=np.uint8).reshape(1, 1, 2, 1)) & 0x0F
        qh = (b[:, 128:192].reshape(-1, 2, 1, 32) >> np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 1, 4, 1)) & 3
        u_low, u_high = ql.reshape(-1, 32), qh.reshape(-1, 32)  # the gguf package's value order, 32 at a time
        low[start : start + step] = (u_low[:, :16] | (u_low[:, 16:] << 4)).reshape(len(b), 128)
        g = u_high.reshape(-1, 2, 4, 4)  # [block of 32, half, g, j]
        high[start : start + step] = (g[:, :, 0] | g[:, :, 1] << 2 | g[:, :, 2] << 4 | g[:, :, 3] << 6).reshape(len(b), 64)
    return BlockWeight(
        6, torch.from_numpy(low.reshape(out_features, -1)),
        torch.from_numpy(np.array(blocks[:, 192:208]).view(np.int8).reshape(out_features, -1)),
        torch.from_numpy(np.array(blocks[:, 208:210]).view(np.float16).reshape(out_features, -1)),
        out_features, in_features, "Q6_K", torch.from_numpy(high.reshape(out_features, -1)),
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
