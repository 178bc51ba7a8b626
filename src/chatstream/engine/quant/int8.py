"""Int8 linear layers for CPU: int8 weights, activations quantized per token on the fly.

On CPUs without bfloat16 matrix units a step of a small model is dominated by float32 linear
layers. Here each ``nn.Linear`` becomes an :class:`Int8Linear`: weights int8 with one scale per
output channel, each input row (token) quantized to int8 with its own scale, one integer matmul
(``torch._int_mm``, int32 accumulation), then both scales applied. On this project's 2-core CPU
a decode step of SmolLM2-135M took 29/53/78 ms at batch 1/16/32 against 59/103/153 ms in
float32, and the mean NLL of a fixed text moved from 2.587 to 2.574 nats
(``benchmarks/step_time.py``). Every linear layer is converted, the output projection included:
keeping ``down_proj`` or ``lm_head`` float cost 15-30% of the gain and improved nothing.

Why not the ready-made kernels: PyTorch's dynamic quantization (fbgemm, ``torch.ao``) is ~25%
faster still, but scales a whole step's activations with one number, so one token with large
activations (chat templates' first tokens have them) crushes every other token of a prompt:
greedy replies changed from the first token. Per-token scales keep each row exact integer
arithmetic of its own, so a reply never depends on what else shares the batch, as in float32.
torchao's ``Int8DynamicActivationInt8WeightConfig`` (per token too) measured 4-6x slower than
fbgemm on this CPU: it targets GPUs.

The fused Llama forward runs these same layers through :mod:`..ops.native`'s int8 matmul on CPUs with
AVX-512 VNNI (the same integer sums and dequantization, bit for bit). The swap is done in place
and undone by the function :func:`quantize_linears_int8` returns.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import torch

QUANTIZATIONS: tuple[str, ...] = ("auto", "int8", "none")
# Layers kept in float (names ending so); none by default. benchmarks/step_time.py overrides
# it to show what keeping some would cost.
_KEEP_FLOAT: tuple[str, ...] = ()


class Int8Linear(torch.nn.Module):
    """``y = x @ W.T + b`` with int8 ``W`` (per output channel scale) and int8 ``x`` (per row)."""

    weight: torch.Tensor
    weight_scale: torch.Tensor
    bias: torch.Tensor | None

    def __init__(self, linear: torch.nn.Linear) -> None:
        super().__init__()
        weight, scale = quantize_weight(linear.weight)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("weight", weight)
        self.register_buffer("weight_scale", scale)
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().float().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = int8_linear(x.reshape(-1, self.in_features).float(), self.weight, self.weight_scale, self.bias)
        return out.to(x.dtype).reshape(*x.shape[:-1], self.out_features)


def quantize_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 ``[out, in]`` weights and their float32 scale per output channel (symmetric)."""
    weight = weight.detach().float()
    scale = (weight.abs().amax(dim=1) / 127.0).clamp(min=1e-12)
    return (weight / scale[:, None]).round().clamp(-127, 127).to(torch.int8).contiguous(), scale


def int8_linear(
    rows: torch.Tensor,
    weight: torch.Tensor,
    weight_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    packed: OnednnInt8Weight | None = None,
) -> torch.Tensor:
    """float32 ``rows`` [M, in] times int8 ``weight`` [out, in]: each row quantized with its own scale.

    The weight goes to ``_int_mm`` as the transpose of an ``[out, in]`` matrix: the kernel reads
    that layout faster at one row (14 vs 35 us for a 576x1536 layer here) and no slower at 16.
    With ``packed``, oneDNN's kernel computes the same int32 sums instead (bit for bit).
    """
    scale = (rows.abs().amax(dim=1, keepdim=True) / 127.0).clamp_(min=1e-12)
    quantized = (rows / scale).round_()
    if packed is not None:
        sums = packed.matmul(quantized)
    else:
        sums = torch._int_mm(quantized.to(torch.int8), weight.t()).float()
    out = sums.mul_(scale).mul_(weight_scale)
    return out if bias is None else out.add_(bias)


class OnednnInt8Weight:
    """An int8 ``[out, in]`` weight prepacked for oneDNN's int8 matmul (``onednn.qlinear_pointwise``,
    what torch.compile's x86 int8 path calls), used as a plain integer matmul: rows go in unsigned
    with zero point 128 and every scale is 1, so it returns the exact int32 sums as float32, the
    same numbers as ``_int_mm(...).float()``. Its prepacked layout is up to ~3x faster for a wide
    output projection (1.2 vs 3.4 ms for SmolLM2's 49,152 x 576 ``lm_head`` at one row here)."""

    def __init__(self, weight: torch.Tensor) -> None:
        self.packed = torch.ops.onednn.qlinear_prepack(weight, [1, weight.shape[1]])
        self.ones = torch.ones(weight.shape[0])
        self.zero_points = torch.zeros(weight.shape[0], dtype=torch.long)

    def matmul(self, quantized: torch.Tensor) -> torch.Tensor:
        """``quantized``: float rows of integers in [-127, 127]. Returns their int32 sums as float32."""
        unsigned = quantized.add(128).to(torch.uint8)
        return torch.ops.onednn.qlinear_pointwise(
            unsigned, 1.0, 128, self.packed, self.ones, self.zero_points, None,
            1.0, 0, torch.float32, "none", [], "",
        )

    @classmethod
    def check(cls, weight: torch.Tensor) -> OnednnInt8Weight | None:
        """The packed weight when oneDNN's int8 kernel exists here and gives ``_int_mm``'s sums
        exactly; else None. A check of correctness only: no timing decides a path."""
        if weight.device.type != "cpu":
            return None
        try:
            packed = cls(weight)
            probe = torch.randint(-127, 128, (3, weight.shape[1])).float()
            exact = torch.equal(packed.matmul(probe), torch._int_mm(probe.to(torch.int8), weight.t()).float())
        except (AttributeError, RuntimeError, NotImplementedError):  # no oneDNN int8 on this build or CPU
            return None
        return packed if exact else None


def resolve_quantization(mode: str | None, model: Any) -> Literal["int8", "none"]:
    """``"auto"``: int8 on a float32 CPU model (about 2x faster steps on the CPUs measured), else none.
    Decided from the device and dtype only, never by a timing, so a busy start-up picks the same."""
    if mode is None or mode == "none":
        return "none"
    if mode not in QUANTIZATIONS:
        raise ValueError(f"quantization must be one of {QUANTIZATIONS} or None, not {mode!r}")
    if model.device.type != "cpu" or model.dtype != torch.float32:
        if mode == "int8":
            raise ValueError("int8 quantization runs on CPU float32 models only")
        return "none"
    if mode == "int8":
        return "int8"
    return "int8"


def quantize_linears_int8(model: Any) -> Callable[[], None]:
    """Replace the model's ``nn.Linear`` layers by :class:`Int8Linear` ones, in place.

    Returns a function that puts the original float layers back.
    """
    originals = {
        name: module
        for name, module in model.named_modules()
        if type(module) is torch.nn.Linear and not (_KEEP_FLOAT and name.endswith(_KEEP_FLOAT))
    }
    for name, module in originals.items():
        _replace(model, name, Int8Linear(module))

    def restore() -> None:
        for name, module in originals.items():
            _replace(model, name, module)

    return restore


def _replace(model: Any, name: str, module: torch.nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)
