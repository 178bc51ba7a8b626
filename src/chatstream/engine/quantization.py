"""Dynamic int8 linear layers for CPU: int8 weights, activations quantized on the fly.

On CPUs without bfloat16 matrix units, a step of a small model is dominated by float32 linear
layers. PyTorch's dynamic quantization (fbgemm kernels, ``torch.ao.quantization``) runs them
with int8 weights and per-step int8 activations, 2-3x faster at batch 16-32. torchao's
maintained ``Int8DynamicActivationInt8WeightConfig`` was measured 4-6x *slower* than fbgemm on
this project's CPU (it targets GPUs), so the older API is used. The activation scale is one
per tensor, i.e. per step: a row's output may differ in the last bits with what else shares the
batch (float32 is exact there; see ``quantization=None``).

The swap is done in place and undone by the returned function, like the attention switch.
"""

from __future__ import annotations

import time
import warnings
from typing import Any, Callable, Literal

import torch

Quantization = Literal["auto", "int8", "none"]
QUANTIZATIONS: tuple[str, ...] = ("auto", "int8", "none")
# Kept in float: quantizing the output projection moved greedy replies and NLL more than the
# rest of the model together, for ~20% of a decode step.
_KEEP_FLOAT = ("lm_head",)


def resolve_quantization(mode: str | None, model: Any) -> Literal["int8", "none"]:
    """``"auto"``: int8 on a CPU with fbgemm/x86 kernels when a timed trial says it is faster."""
    if mode is None or mode == "none":
        return "none"
    if mode not in QUANTIZATIONS:
        raise ValueError(f"quantization must be one of {QUANTIZATIONS} or None, not {mode!r}")
    if model.device.type != "cpu" or model.dtype != torch.float32:
        if mode == "int8":
            raise ValueError("int8 dynamic quantization runs on CPU float32 models only")
        return "none"
    if not _int8_kernels_available():
        if mode == "int8":
            raise ValueError("this PyTorch build has no fbgemm/x86 quantized kernels")
        return "none"
    if mode == "int8":
        return "int8"
    return "int8" if _int8_is_faster(model) else "none"


def quantize_linears_int8(model: Any) -> Callable[[], None]:
    """Replace the model's ``nn.Linear`` layers (but the output projection) by dynamic int8 ones.

    Returns a function that puts the original float layers back.
    """
    originals = {
        name: module
        for name, module in model.named_modules()
        if type(module) is torch.nn.Linear and name.rsplit(".", 1)[-1] not in _KEEP_FLOAT
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao.quantization's deprecation notice
        spec = {name: torch.ao.quantization.default_dynamic_qconfig for name in originals}
        torch.ao.quantization.quantize_dynamic(model, spec, dtype=torch.qint8, inplace=True)

    def restore() -> None:
        for name, module in originals.items():
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, module)

    return restore


def _int8_kernels_available() -> bool:
    return any(engine in torch.backends.quantized.supported_engines for engine in ("x86", "fbgemm"))


def _int8_is_faster(model: Any, rows: int = 16) -> bool:
    """Time the model's widest linear layer at a typical batch, float32 vs int8 (~0.1 s)."""
    linears = [m for n, m in model.named_modules() if type(m) is torch.nn.Linear and not n.endswith(_KEEP_FLOAT)]
    if not linears:
        return False
    layer = max(linears, key=lambda m: m.weight.numel())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantized = torch.ao.quantization.quantize_dynamic(
            torch.nn.Sequential(layer), {torch.nn.Linear}, dtype=torch.qint8, inplace=False
        )
    x = torch.randn(rows, layer.in_features)

    def best_of(fn: Callable[[torch.Tensor], torch.Tensor]) -> float:
        with torch.inference_mode():
            fn(x)
            times = []
            for _ in range(5):
                start = time.perf_counter()
                for _ in range(4):
                    fn(x)
                times.append(time.perf_counter() - start)
        return min(times)

    return best_of(quantized) < 0.8 * best_of(layer)
