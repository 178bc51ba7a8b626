"""Which code path runs the model: chosen once, at start-up, in one place, from facts only.

A :class:`Backend` names the forward (chatstream's fused Llama forward or transformers' own), the
attention and small ops (chatstream's C kernels or PyTorch's operators), the linear layers' format
(float, int8 through the native VNNI kernel, int8 through ``torch._int_mm``, with the output
projection through oneDNN's prepacked int8 kernel where it exists) and the KV cache's layout and
element type.
:func:`select_backend` decides it from the device, dtype, architecture, the CPU's features (what
the native build reports) and the user's flags. No timing takes part, so the same model on the
same machine runs the same path, busy or quiet, and gives the same greedy tokens.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from typing import Any, Literal

import torch

from ..ops import native
from ..quant.gguf_model import QuantLinear
from ..quant.int8 import Int8Linear
from . import attention, llama

Forward = Literal["fused", "hf"]
Ops = Literal["native", "torch"]
Linear = Literal["float", "int8-vnni", "int8-intmm", "gguf-blocks"]
KVLayout = Literal["keys-transposed", "heads-blocks"]
DecodeAttention = Literal["native", "flash", "bmm"]
KV_CACHE_DTYPES: tuple[str, ...] = ("auto", "float32", "bfloat16", "float16")


@dataclass(frozen=True)
class Backend:
    """One engine's code path; see the module docstring."""

    device: str
    dtype: str
    forward: Forward
    ops: Ops
    linear: Linear
    lm_head_onednn: bool  # int8-intmm's output projection through oneDNN's prepacked kernel
    kv_layout: KVLayout
    kv_dtype: str  # the KV cache's element type: float32, bfloat16 or float16
    decode_attention: DecodeAttention
    threads: int

    def describe(self) -> str:
        """One line for the start-up log."""
        linear = self.linear + (" (lm_head oneDNN)" if self.lm_head_onednn else "")
        return (f"{self.forward} forward, {self.ops} ops, {linear} linears, KV {self.kv_layout} {self.kv_dtype}, "
                f"{self.decode_attention} decode attention, {self.device} {self.dtype}, {self.threads} threads")

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def kv_torch_dtype(self) -> torch.dtype:
        dtype: torch.dtype = getattr(torch, self.kv_dtype)
        return dtype


def default_threads(device: torch.device, *, pool_runs_products: bool) -> int:
    """The engine's threads when ``--threads`` is not given.

    On CPU: every usable core where the step's matrix products run on the native thread pool (the
    GGUF block kernels), whose helpers claim chunks from one counter, so the event loop's few percent
    of a core delay a step by a chunk at most (2 cores, 16 clients, the default model: 339 against
    228 tok/s with chat sampling, 387 against 251 greedy). Otherwise every core but one: the event
    loop keeps a core, since with every core in torch's OpenMP pool the loop's work preempts a pool
    thread and the whole step waits at its barrier (144-152 tok/s with 1 thread against 100-106 with
    2). Elsewhere torch's own count.
    """
    if device.type != "cpu":
        return torch.get_num_threads()
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return cores if pool_runs_products else max(1, cores - 1)


def select_backend(model: Any, *, fused: bool = True, kernels: str = "auto", threads: int | None = None,
                   block_size: int = 16, kv_cache_dtype: str = "auto") -> tuple[Backend, native.NativeKernels | None]:
    """The backend for ``model`` as it is now (its linears already int8 or float), and the native
    kernels it uses. ``kernels="native"`` raises when they cannot run this model; ``"auto"`` falls
    back to PyTorch's operators. ``kv_cache_dtype``: see :func:`_kv_dtype`."""
    from .runner import attention_shape

    if kernels not in native.KERNELS:
        raise ValueError(f"kernels must be one of {native.KERNELS}, not {kernels!r}")
    if kv_cache_dtype not in KV_CACHE_DTYPES:
        raise ValueError(f"kv_cache_dtype must be one of {KV_CACHE_DTYPES}, not {kv_cache_dtype!r}")
    device, dtype = model.device, model.dtype
    _, num_heads, num_kv_heads, head_dim = attention_shape(model.config)
    int8 = any(isinstance(m, Int8Linear) for m in model.modules())
    forward: Forward = "fused" if fused and llama.supports(model) else "hf"
    nk: native.NativeKernels | None = None
    if kernels != "torch":
        why_not = None
        if device.type != "cpu" or dtype != torch.float32:
            why_not = f"native kernels run float32 models on CPU, not {dtype} on {device}"
        elif not native.NativeKernels.fits(num_heads, num_kv_heads, head_dim, block_size):
            why_not = ("native kernels take at most 64 attention heads of at most 256 dimensions, "
                       "in blocks of at most 256 tokens")
        elif forward != "fused":
            # Only the fused forward writes the cache in the native layout (keys transposed).
            why_not = "native kernels run Llama-family models (llama, mistral, qwen2) through the fused forward only"
        if why_not is not None and kernels == "native":
            raise ValueError(why_not)
        if why_not is None:
            nk = native.load(kernels)
        if nk is not None and kv_cache_dtype != "auto" and getattr(torch, kv_cache_dtype) not in nk.kv_dtypes:
            if kernels == "native":
                raise ValueError(f"this build of the native kernels has no {kv_cache_dtype} KV cache")
            nk = None
    linear: Linear = "float"
    if any(isinstance(m, QuantLinear) for m in model.modules()):
        linear = "gguf-blocks"  # GGUF weights kept in blocks, through quant/'s kernels
    elif int8:
        linear = "int8-vnni" if nk is not None and nk.int8 and forward == "fused" else "int8-intmm"
    lm_head_onednn = linear == "int8-intmm" and forward == "fused" and _onednn_int8_exact(model)
    if threads is None:
        threads = default_threads(device, pool_runs_products=linear == "gguf-blocks" and nk is not None)
    # Without the native kernel, decode attention goes through PyTorch's CPU flash kernel on one
    # thread only: split across two, its many tiny (pair, head) problems ran 2.6x slower (2 cores).
    decode_attention: DecodeAttention = "native" if nk is not None else "bmm"
    if nk is None and device.type == "cpu" and threads == 1 and attention.cpu_flash_available():
        decode_attention = "flash"
    backend = Backend(
        device=str(device), dtype=str(dtype).removeprefix("torch."), forward=forward,
        ops="native" if nk is not None else "torch", linear=linear, lm_head_onednn=lm_head_onednn,
        kv_layout="keys-transposed" if nk is not None else "heads-blocks",
        kv_dtype=_kv_dtype(kv_cache_dtype, dtype, nk),
        decode_attention=decode_attention, threads=threads,
    )
    return backend, nk


def _kv_dtype(requested: str, model_dtype: torch.dtype, nk: native.NativeKernels | None) -> str:
    """The KV cache's element type. ``"auto"``, by rule (never a timing): the model's dtype. A 16-bit
    cache under a float32 model halves the KV bytes but did not measure faster on this project's
    AVX-512 CPU (native decode step, 16 sequences of 256 tokens, int8 linears, best of two loaded
    rounds: float32 134 ms, float16 175, bfloat16 199), so it is the user's choice for memory.
    ``nk`` (the native kernels) is where a CPU-feature rule would read float16 support
    (``nk.f16_hardware``). Otherwise what was asked."""
    if requested != "auto":
        return requested
    return str(model_dtype).removeprefix("torch.")


def _onednn_int8_exact(model: Any) -> bool:
    """Whether oneDNN's int8 kernel exists here and gives ``_int_mm``'s sums exactly (a check of
    correctness, not a timing: where it exists it measured up to ~3x faster for a wide output
    projection, 1.2 vs 3.4 ms for SmolLM2's 49,152 x 576 lm_head at one row)."""
    from ..quant.int8 import OnednnInt8Weight

    head = model.get_output_embeddings()
    return isinstance(head, Int8Linear) and OnednnInt8Weight.check(head.weight[:64]) is not None
