"""The operations the fused Llama forward (:mod:`..model.llama`) is written against, one class per backend.

The forward is one function; what differs between backends is how each step of a layer is
computed: :class:`TorchOps` with PyTorch's operators (any device, any dtype), :class:`NativeOps`
with chatstream's C kernels (:mod:`.native`: float32 on CPU; RoPE fused with the KV write into the
keys-transposed cache layout, one-pass decode attention, and for ``int8-vnni`` linears the norm,
SiLU, activation quantization, matmul and residual add fused around each matmul). The backend
(:mod:`..model.backend`) picks the class once, at start-up. A projection's weight format (float, int8,
GGUF blocks: :class:`..model.llama._Projection`) is the ops' business only where a kernel fuses around
it (``proj.packed``; GGUF blocks' ``proj.quant``, whose norm, SiLU and residual add the quantized
kernels fuse the same way); every other format is computed by the projection itself.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from ..model.attention import TORCH_DECODE, BatchMetadata, paged_attention
from ..quant.gguf_model import quant_linears
from .native import NativeKernels

if TYPE_CHECKING:
    from ..model.llama import _Projection


class TorchOps:
    """PyTorch's operators. Each method returns a new tensor (the residual stream is not mutated)."""

    name = "torch"

    def __init__(self, eps: float, heads: int, kv_heads: int, head_dim: int, decode: str = "bmm") -> None:
        self.eps = eps
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, head_dim
        self.scale = head_dim**-0.5
        # The backend's decode attention ("flash" or "bmm", Backend.decode_attention), picked once.
        self._decode = TORCH_DECODE[decode]

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:
            return F.rms_norm(x, (x.shape[-1],), weight, self.eps)
        # Half precision: normalise in float32 as transformers does, then scale in the model dtype.
        return weight * F.rms_norm(x.float(), (x.shape[-1],), None, self.eps).to(x.dtype)

    def norm_project(self, x: torch.Tensor, norm: torch.Tensor, proj: _Projection) -> torch.Tensor:
        """``proj(rms_norm(x, norm))``."""
        return proj(self.rms_norm(x, norm))

    def attention(
        self, layer: int, qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, batch: BatchMetadata
    ) -> torch.Tensor:
        """RoPE on the query and key heads of ``qkv`` ``[N, (H + 2 Hkv) D]`` (``cos``, ``sin``
        ``[N, D]``, ``sin``'s first half negated), the new keys and values into layer ``layer``'s
        cache, then paged attention: ``[N, H * D]``."""
        n, h, hkv, d = qkv.shape[0], self.heads, self.kv_heads, self.head_dim
        qk_width = (h + hkv) * d
        qk = qkv[:, :qk_width].view(n, h + hkv, d)
        # rotate_half(x) * sin == roll(x, D / 2) * (sin with its first half negated)
        qk = torch.addcmul(qk * cos[:, None], qk.roll(d // 2, -1), sin[:, None])
        q = qk[:, :h].transpose(0, 1)[None]  # [1, H, N, D]
        k = qk[:, h:].transpose(0, 1)[None]
        v = qkv[:, qk_width:].view(n, hkv, d).transpose(0, 1)[None]
        return paged_attention(layer, q, k, v, batch, self.scale, self.decode_attention).reshape(n, h * d)

    def decode_attention(self, q: torch.Tensor, cache: torch.Tensor, batch: BatchMetadata, scale: float) -> torch.Tensor:
        """Each decode row's query ``q`` ``[rows, H, D]`` against its cached blocks in ``cache``
        (one layer's): ``[rows, H, D]``."""
        return self._decode(q, cache, batch, scale)

    def project_add(self, rows: torch.Tensor, proj: _Projection, x: torch.Tensor) -> torch.Tensor:
        """``x + proj(rows)`` (a residual connection)."""
        return x + proj(rows)

    def mlp_add(self, gate_up: torch.Tensor, down: _Projection, x: torch.Tensor) -> torch.Tensor:
        """``x + down(silu(gate) * up)`` for rows ``[gate | up]``."""
        width = gate_up.shape[-1] // 2
        return self.project_add(F.silu(gate_up[:, :width]) * gate_up[:, width:], down, x)


class NativeOps(TorchOps):
    """chatstream's C kernels; residual adds happen in place in ``x`` (float32, CPU)."""

    name = "native"

    def __init__(self, kernels: NativeKernels, eps: float, heads: int, kv_heads: int, head_dim: int) -> None:
        super().__init__(eps, heads, kv_heads, head_dim)
        self.nk = kernels

    def norm_project(self, x: torch.Tensor, norm: torch.Tensor, proj: _Projection) -> torch.Tensor:
        if proj.packed is not None:
            return self.nk.int8_linear(self.nk.rms_norm_quantize(x, norm, self.eps), proj.packed)
        if proj.quant is not None:  # GGUF blocks: normed and quantized in one pass (quant/)
            return quant_linears(proj.quant, x, norm=norm, eps=self.eps)
        return proj(self.rms_norm(x, norm)).contiguous()

    def attention(
        self, layer: int, qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, batch: BatchMetadata
    ) -> torch.Tensor:
        n, h, hkv, d = qkv.shape[0], self.heads, self.kv_heads, self.head_dim
        assert batch.token_blocks is not None and batch.token_offsets is not None
        # RoPE in place, and the new keys and values into the cache, in one call.
        self.nk.rope_store_kv(qkv, h, hkv, cos, sin, batch.cache.layers[layer], batch.token_blocks,
                              batch.token_offsets)
        heads = qkv.view(n, h + 2 * hkv, d).transpose(0, 1)[None]  # [1, H + 2Hkv, N, D]
        q, k, v = heads[:, :h], heads[:, h : h + hkv], heads[:, h + hkv :]
        return paged_attention(layer, q, k, v, batch, self.scale, self.decode_attention, kv_stored=True,
                               keys_transposed=True).reshape(n, h * d)

    def decode_attention(self, q: torch.Tensor, cache: torch.Tensor, batch: BatchMetadata, scale: float) -> torch.Tensor:
        """The native kernel: one pass over each row's blocks in the keys-transposed cache, its
        (row, KV head) pairs split across the process's thread pool (the same bits on any count)."""
        assert batch.decode_starts is not None and batch.decode_lengths is not None
        return self.nk.paged_decode_attention(q, cache, batch.pair_blocks, batch.decode_starts, batch.decode_lengths,
                                              scale)

    def project_add(self, rows: torch.Tensor, proj: _Projection, x: torch.Tensor) -> torch.Tensor:
        if proj.packed is not None:
            return self.nk.int8_linear(self.nk.quantize(rows), proj.packed, out=x)
        if proj.quant is not None:
            return quant_linears(proj.quant, rows, add_to=x)
        return x.add_(proj(rows))

    def mlp_add(self, gate_up: torch.Tensor, down: _Projection, x: torch.Tensor) -> torch.Tensor:
        if down.packed is not None:
            return self.nk.int8_linear(self.nk.silu_mul_quantize(gate_up), down.packed, out=x)
        if down.quant is not None:
            return quant_linears(down.quant, gate_up, silu_mul=True, add_to=x)
        return super().mlp_add(gate_up, down, x)
