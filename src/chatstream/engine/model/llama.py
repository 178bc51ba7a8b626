"""A fused forward pass for Llama-family decoders (Llama, Mistral, Qwen2), over the paged cache.

A decode step of a small model on CPU is dominated less by arithmetic than by the number of
operators eager PyTorch dispatches: transformers' Llama layer issues ~120 per layer (separate
q/k/v and gate/up projections, each with its own activation quantization, a 7-operator RMSNorm,
RoPE through slices and concatenations, kwargs plumbing). This forward computes the same
function with ~40: q/k/v as one matmul and gate/up as one, ``F.rms_norm``, RoPE as one
multiply-add against a roll, and the paged attention called directly (nano-vllm and vLLM keep
their own model code for the same reason).

It reads the weights of the transformers model it is given (int8 :class:`Int8Linear` layers or
float ``nn.Linear``), so it computes the same tokens: tests compare it with the transformers path.
Other architectures keep running through transformers with the paged attention plugged in.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from ..ops.layer_ops import NativeOps, TorchOps
from ..ops.native import NativeKernels, PackedInt8Weight
from ..quant.gguf_model import QuantLinear, quant_linears
from ..quant.int8 import Int8Linear, OnednnInt8Weight, int8_linear
from .attention import BatchMetadata

if TYPE_CHECKING:
    from .backend import Backend

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")


class _Projection:
    """Several linear layers over the same input, computed as one matmul; outputs side by side."""

    def __init__(self, linears: list[torch.nn.Linear | Int8Linear | QuantLinear]) -> None:
        widths = [m.out_features for m in linears]
        self.bias: torch.Tensor | None = None
        self.weight_scale: torch.Tensor | None = None  # set for int8 weights
        self.onednn: OnednnInt8Weight | None = None
        self.packed: PackedInt8Weight | None = None
        # GGUF block weights: each layer kept as it is, computed side by side (see quant_linears)
        self.quant = [m for m in linears if isinstance(m, QuantLinear)] or None
        if self.quant is not None:
            self.weight = torch.empty(0)
            return
        self._init_float([m for m in linears if not isinstance(m, QuantLinear)], widths)

    def _init_float(self, linears: list[torch.nn.Linear | Int8Linear], widths: list[int]) -> None:
        if any(m.bias is not None for m in linears):
            self.bias = torch.cat([
                m.bias.detach() if m.bias is not None else torch.zeros(w, device=m.weight.device)
                for m, w in zip(linears, widths)
            ])
        if len(linears) == 1:
            self.weight = linears[0].weight.detach()
            if isinstance(linears[0], Int8Linear):
                self.weight_scale = linears[0].weight_scale
        elif all(isinstance(m, Int8Linear) for m in linears):
            self.weight = torch.cat([m.weight for m in linears])
            self.weight_scale = torch.cat([m.weight_scale for m in linears if isinstance(m, Int8Linear)])
        else:
            self.weight = torch.cat([m.weight.detach() for m in linears])
            # The originals become views of the fused matrix: no second copy of the weights.
            start = 0
            for m, w in zip(linears, widths):
                m.weight.data = self.weight[start : start + w]
                start += w
        if self.bias is not None:  # int8 layers keep a float32 bias; float ones the model's dtype
            self.bias = self.bias.to(torch.float32 if self.weight_scale is not None else self.weight.dtype)

    def pack(self) -> PackedInt8Weight:
        """The int8 weight laid out for the native kernel (the ``[out, in]`` one stays for ``--kernels torch``
        runners over the same model)."""
        assert self.weight_scale is not None
        self.packed = PackedInt8Weight.pack(self.weight, self.weight_scale, self.bias)
        return self.packed

    def use_onednn(self) -> None:
        """Compute through oneDNN's prepacked int8 kernel (the same sums, bit for bit)."""
        if self.weight_scale is not None:
            self.onednn = OnednnInt8Weight.check(self.weight)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.quant is not None:
            return quant_linears(self.quant, x).to(x.dtype)
        if self.weight_scale is not None:
            return int8_linear(x.float(), self.weight, self.weight_scale, self.bias, self.onednn).to(x.dtype)
        return F.linear(x, self.weight, self.bias)


class _Layer:
    def __init__(self, layer: Any) -> None:
        attn, mlp = layer.self_attn, layer.mlp  # their layers' types are checked by supports()
        self.qkv = _Projection([attn.q_proj, attn.k_proj, attn.v_proj])
        self.o = _Projection([attn.o_proj])
        self.gate_up = _Projection([mlp.gate_proj, mlp.up_proj])
        self.down = _Projection([mlp.down_proj])
        self.input_norm = layer.input_layernorm.weight.detach()
        self.post_norm = layer.post_attention_layernorm.weight.detach()


def supports(model: Any) -> bool:
    """Whether :class:`LlamaForward` computes this model (else it runs through transformers)."""
    config = model.config
    if getattr(config, "model_type", None) not in SUPPORTED_MODEL_TYPES:
        return False
    if getattr(config, "hidden_act", "silu") != "silu":
        return False
    if getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True):
        return False
    inner = getattr(model, "model", None)
    if inner is None or not hasattr(inner, "rotary_emb") or not hasattr(inner, "layers"):
        return False
    linear_types = (torch.nn.Linear, Int8Linear, QuantLinear)
    for layer in inner.layers:
        attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        groups = (
            (attn, ("q_proj", "k_proj", "v_proj")), (attn, ("o_proj",)),
            (mlp, ("gate_proj", "up_proj")), (mlp, ("down_proj",)),
        )
        for parent, names in groups:
            types = {type(getattr(parent, n, None)) for n in names}
            if len(types) != 1 or not types <= set(linear_types):  # one matmul: all int8 or all float
                return False
    return type(model.get_output_embeddings()) in linear_types


class LlamaForward:
    """``forward(ids, positions, batch, keep)`` -> logits of the ``keep`` rows, for the engine's
    flattened ragged batch (one ``[N]`` sequence of tokens from many requests).

    Written once against an ops object (:mod:`..ops.layer_ops`): the backend's :class:`~..ops.layer_ops.TorchOps` or
    :class:`~..ops.layer_ops.NativeOps`, chosen once in :mod:`.backend`."""

    def __init__(self, model: Any, backend: Backend, native: NativeKernels | None = None) -> None:
        config = model.config
        inner = model.model
        self.embed = inner.embed_tokens  # nn.Embedding, or QuantEmbedding's blocks
        self.rotary = inner.rotary_emb
        self.layers = [_Layer(layer) for layer in inner.layers]
        self.norm = inner.norm.weight.detach()
        dtype, device = self.norm.dtype, self.norm.device
        self.lm_head = _Projection([model.get_output_embeddings()])
        projections = [p for layer in self.layers for p in (layer.qkv, layer.o, layer.gate_up, layer.down)]
        projections.append(self.lm_head)
        if backend.linear == "int8-vnni":
            for p in projections:
                p.pack()
        elif backend.lm_head_onednn:
            # The widest matmul of a step; the hidden layers measured no faster through oneDNN here.
            self.lm_head.use_onednn()
        heads = int(config.num_attention_heads)
        kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
        head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
        eps = float(config.rms_norm_eps)
        # The backend's ops (chosen once, in .backend). Native kernels (float32 on CPU): RoPE, the KV
        # write and decode attention always; with int8-vnni linears also norms, activation
        # quantization, matmuls, dequantization and residual adds (six native calls a layer); GGUF
        # block linears (gguf-blocks) run their own kernels (quant/) inside the projection.
        if backend.ops == "native":
            if native is None:
                raise ValueError("a native-ops backend needs the loaded native kernels")
            self.ops: TorchOps = NativeOps(native, eps, heads, kv_heads, head_dim)
        else:
            self.ops = TorchOps(eps, heads, kv_heads, head_dim, backend.decode_attention)
        half = head_dim // 2
        # rotate_half(x) * sin == roll(x, half) * (sin with its first half negated)
        self.sin_sign = torch.cat([-torch.ones(half), torch.ones(half)]).to(device, dtype)

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, batch: BatchMetadata, keep: torch.Tensor
    ) -> torch.Tensor:
        ops = self.ops
        x = self.embed(input_ids)
        cos, sin = self.rotary(x[None], positions[None])
        cos, sin = cos[0], sin[0] * self.sin_sign  # [N, D]
        for i, layer in enumerate(self.layers):
            qkv = ops.norm_project(x, layer.input_norm, layer.qkv)
            x = ops.project_add(ops.attention(i, qkv, cos, sin, batch), layer.o, x)
            x = ops.mlp_add(ops.norm_project(x, layer.post_norm, layer.gate_up), layer.down, x)
        return ops.norm_project(x.index_select(0, keep), self.norm, self.lm_head)
