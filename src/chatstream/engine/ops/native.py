"""chatstream's own CPU kernels (``kernels.c``), compiled at first use by the machine's C compiler.

They run the parts of the fused Llama forward's CPU step that PyTorch has no fitting operator
for, or spends many small operators on:

- decode attention over the paged cache, in one pass with no gathered copy (through PyTorch it
  took a gathered copy of every block, one flash problem per (block, head) and a log-sum-exp
  merge: ~30 operators a layer, a third of a 16-sequence step here); the cache then keeps each
  block's keys transposed (:func:`keys_transposed`), written by ``rope_store_kv``;
- RoPE and the KV write, one call a layer;
- int8 linear layers on CPUs with AVX-512 VNNI, with the activation quantization fused into the
  norm or SiLU before and the dequantization, bias and residual add after (the integer sums and
  dequantization equal ``quantization.int8_linear``'s bit for bit).

It is plain C called through ``ctypes``, which releases the GIL during the call, so the event
loop runs beside it as beside any torch operator. Why not ``torch.utils.cpp_extension``: that
compiles torch's C++ headers (about a minute on 2 cores) and needs Python's headers; this file
builds in about a second. The shared library is cached under the cache directory, keyed by the
source, the compiler and the CPU (it is built with ``-march=native``). Where no compiler works,
or the built kernel disagrees with PyTorch on a start-up check, the engine uses PyTorch's
operators (``kernels="auto"``) or refuses to start (``kernels="native"``).
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

KERNELS: tuple[str, ...] = ("auto", "native", "torch")
SOURCE = Path(__file__).with_name("kernels.c")
HEADERS = sorted(SOURCE.parent.glob("*.h"))  # included by kernels.c and quant/kernels.c: part of the build key
FLAGS = ("-O3", "-march=native", "-fopenmp-simd", "-ffp-contract=off", "-std=gnu11", "-shared", "-fPIC", "-Wall",
         "-pthread")  # thread_pool.h's helper threads


class NativeKernelError(RuntimeError):
    """The native kernels could not be built, loaded or verified on this machine."""


@dataclass
class PackedInt8Weight:
    """An int8 ``[out, in]`` weight (one scale per output channel) laid out for ``int8_linear``'s
    VNNI tiles: ``[ceil(out / 16), ceil(in / 4), 16, 4]``, zero-padded."""

    weight: torch.Tensor
    sums128: torch.Tensor  # int32 [out]: 128 x each channel's weight sum (rows go in as value + 128)
    scale: torch.Tensor  # float32 [out]
    bias: torch.Tensor | None  # float32 [out]
    out_features: int
    in_features: int

    @classmethod
    def pack(cls, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> PackedInt8Weight:
        out_features, in_features = weight.shape
        padded = torch.zeros(-(-out_features // 16) * 16, -(-in_features // 4) * 4, dtype=torch.int8)
        padded[:out_features, :in_features] = weight
        tiles, groups = padded.shape[0] // 16, padded.shape[1] // 4
        packed = padded.view(tiles, 16, groups, 4).permute(0, 2, 1, 3).contiguous()
        return cls(
            packed, (weight.sum(dim=1, dtype=torch.int32) * 128).contiguous(),
            scale.float().contiguous(), None if bias is None else bias.float().contiguous(),
            out_features, in_features,
        )

    @property
    def groups(self) -> int:
        return int(self.weight.shape[1])


@dataclass
class QuantizedRows:
    """Rows quantized to int8 with one scale each, stored as value + 128 (VNNI multiplies unsigned
    by signed bytes); ``data`` is ``[rows, groups * 4]``, past ``in_features`` unused."""

    data: torch.Tensor
    scales: torch.Tensor


_P, _I, _F = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float
# The KV cache's element types, as kernels.c numbers them.
KV_DTYPE_CODES: dict[torch.dtype, int] = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


class NativeKernels:
    """The loaded shared library, with typed wrappers over its functions."""

    def __init__(self, path: Path) -> None:
        self.path = path
        lib = ctypes.CDLL(str(path))
        signatures: dict[str, list[Any]] = {
            "paged_decode_attention": [_P] * 6 + [_I] * 6 + [_F, ctypes.c_int, ctypes.c_int],
            "quantize_rows": [_P, _I, _I, _I, _P, _I, _P],
            "rms_norm_quantize_rows": [_P, _I, _I, _P, _F, _P, _P, _I, _P],
            "silu_mul_quantize_rows": [_P, _I, _I, _P, _P, _I, _P],
            "int8_linear": [_P, _I, _I, _P, _I, _I, _P, _P, _P, _P, _P, _I, ctypes.c_int],
            "rope_store_kv": [_P, _I, _I, _I, _I, _P, _P, _P, _P, _P, _I, ctypes.c_int],
            "kv_dtypes": [],
        }
        for name, argtypes in signatures.items():
            getattr(lib, name).argtypes = argtypes
        lib.paged_decode_attention.restype = lib.int8_linear.restype = ctypes.c_int
        self._lib = lib
        self._decode = lib.paged_decode_attention
        # The process's one thread pool (thread_pool.h), which the quantized kernels also run on.
        self.pool_run = ctypes.cast(lib.chatstream_pool_run, ctypes.c_void_p).value
        lib.chatstream_pool_threads.restype = lib.chatstream_pool_helped.restype = ctypes.c_int64
        # Whether this CPU has the int8 matmul (AVX-512 VNNI): with no rows it only answers that.
        self.int8 = lib.int8_linear(None, 0, 0, None, 0, 0, None, None, None, None, None, 0, 0) == 0
        mask = int(lib.kv_dtypes())
        # The KV-cache element types this build reads and writes, and whether it widens float16 in
        # hardware (F16C / AVX-512's vcvtph2ps) rather than one value at a time.
        self.kv_dtypes = frozenset(d for d, code in KV_DTYPE_CODES.items() if mask >> code & 1)
        self.f16_hardware = bool(mask >> 8 & 1)

    def pool_stats(self) -> tuple[int, int]:
        """The thread pool's helper threads started, and the chunks of work they have run."""
        return int(self._lib.chatstream_pool_threads()), int(self._lib.chatstream_pool_helped())

    @staticmethod
    def fits(heads: int, kv_heads: int, head_dim: int, block_size: int) -> bool:
        """Whether the attention kernel takes this shape (kernels.c's fixed buffers: MAX_HEADS,
        MAX_HEAD_DIM, MAX_BLOCK)."""
        return kv_heads > 0 and heads % kv_heads == 0 and heads <= 64 and head_dim <= 256 and block_size <= 256

    # -- int8 linear layers --
    def _rows(self, rows: int, in_features: int) -> QuantizedRows:
        return QuantizedRows(
            torch.empty((rows, -(-in_features // 4) * 4), dtype=torch.uint8), torch.empty(rows, dtype=torch.float32)
        )

    def quantize(self, x: torch.Tensor) -> QuantizedRows:
        """float32 ``[rows, k]`` (rows may be strided) -> int8 rows, as ``quantization.int8_linear`` does."""
        _check_float_rows(x)
        rows, k = x.shape
        out = self._rows(rows, k)
        self._lib.quantize_rows(x.data_ptr(), rows, k, x.stride(0), out.data.data_ptr(), out.data.stride(0),
                                out.scales.data_ptr())
        return out

    def rms_norm_quantize(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> QuantizedRows:
        """``quantize(F.rms_norm(x, weight, eps))`` in one pass; ``x`` contiguous float32 ``[rows, k]``."""
        _check_float_rows(x, contiguous=True)
        rows, k = x.shape
        if weight.shape != (k,) or weight.dtype != torch.float32 or not weight.is_contiguous():
            raise ValueError("rms_norm_quantize takes a contiguous float32 weight of the rows' width")
        out, work = self._rows(rows, k), torch.empty(k, dtype=torch.float32)
        self._lib.rms_norm_quantize_rows(x.data_ptr(), rows, k, weight.data_ptr(), eps, work.data_ptr(),
                                         out.data.data_ptr(), out.data.stride(0), out.scales.data_ptr())
        return out

    def silu_mul_quantize(self, gate_up: torch.Tensor) -> QuantizedRows:
        """``quantize(silu(gate) * up)`` for contiguous float32 rows ``[gate | up]``."""
        _check_float_rows(gate_up, contiguous=True)
        rows, width = gate_up.shape[0], gate_up.shape[1] // 2
        out, work = self._rows(rows, width), torch.empty(width, dtype=torch.float32)
        self._lib.silu_mul_quantize_rows(gate_up.data_ptr(), rows, width, work.data_ptr(), out.data.data_ptr(),
                                         out.data.stride(0), out.scales.data_ptr())
        return out

    def int8_linear(
        self, rows: QuantizedRows, weight: PackedInt8Weight, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``rows @ weight.T * scales (+ bias)`` as float32 ``[rows, out_features]``; with ``out``
        (contiguous float32), added to it in place instead (a residual connection)."""
        n_rows = rows.data.shape[0]
        if rows.data.shape[1] != weight.groups * 4:
            raise ValueError(f"rows of {rows.data.shape[1]} bytes for a weight of {weight.groups * 4}")
        accumulate = out is not None
        if out is None:
            out = torch.empty((n_rows, weight.out_features), dtype=torch.float32)
        elif out.shape != (n_rows, weight.out_features) or out.dtype != torch.float32 or not out.is_contiguous():
            raise ValueError(f"out must be contiguous float32 {(n_rows, weight.out_features)}")
        status = self._lib.int8_linear(
            rows.data.data_ptr(), n_rows, rows.data.stride(0), weight.weight.data_ptr(), weight.out_features,
            weight.groups, weight.sums128.data_ptr(), rows.scales.data_ptr(), weight.scale.data_ptr(),
            None if weight.bias is None else weight.bias.data_ptr(), out.data_ptr(), out.stride(0), int(accumulate),
        )
        if status != 0:
            raise RuntimeError("this CPU has no AVX-512 VNNI for the native int8 matmul")
        return out

    # -- attention --
    def rope_store_kv(
        self, qkv: torch.Tensor, heads: int, kv_heads: int, cos: torch.Tensor, sin: torch.Tensor,
        cache: torch.Tensor, blocks: torch.Tensor, offsets: torch.Tensor,
    ) -> None:
        """RoPE on ``qkv``'s query and key heads in place (``sin`` with its first half negated),
        then each token's keys and values into ``cache`` at (``blocks[t]``, ``offsets[t]``)."""
        _check_float_rows(qkv, contiguous=True)
        tokens, dim = qkv.shape[0], cache.shape[-1]
        if qkv.shape[1] != (heads + 2 * kv_heads) * dim or cache.shape[1] != kv_heads or dim > 256:
            raise ValueError(f"qkv rows of {qkv.shape[1]} for {heads} + 2 x {kv_heads} heads of {dim}")
        for t, shape in ((cos, (tokens, dim)), (sin, (tokens, dim))):
            if t.shape != shape or t.dtype != torch.float32 or not t.is_contiguous():
                raise ValueError(f"cos and sin must be contiguous float32 {shape}")
        for t in (blocks, offsets):
            if t.shape != (tokens,) or t.dtype != torch.int64 or not t.is_contiguous():
                raise ValueError("blocks and offsets must be contiguous int64, one per token")
        if cache.dtype not in self.kv_dtypes or not cache.is_contiguous():
            raise ValueError(f"the cache must be contiguous, of {sorted(map(str, self.kv_dtypes))}")
        self._lib.rope_store_kv(qkv.data_ptr(), tokens, heads, kv_heads, dim, cos.data_ptr(), sin.data_ptr(),
                                cache.data_ptr(), blocks.data_ptr(), offsets.data_ptr(), cache.shape[3],
                                KV_DTYPE_CODES[cache.dtype])


    def paged_decode_attention(
        self,
        q: torch.Tensor,  # [rows, heads, dim]; rows may be strided
        cache: torch.Tensor,  # [num_blocks, kv_heads, 2, block_size, dim], keys transposed: see keys_transposed;
        # float32, or float16/bfloat16 (widened to float32 as it is read)
        blocks: torch.Tensor,  # int64: every row's blocks, in order, row after row
        starts: torch.Tensor,  # int64 [rows + 1]: row r's blocks are blocks[starts[r]:starts[r + 1]]
        lengths: torch.Tensor,  # int64 [rows]: tokens each row attends to
        scale: float,
        threads: int | None = None,
    ) -> torch.Tensor:
        """Each row's single query attends to its first ``lengths[r]`` cached tokens; ``[rows, heads, dim]``.
        The (row, KV head) pairs are split across ``threads`` (default PyTorch's count); the
        result is the same bits for any count."""
        rows, heads, dim = q.shape
        if q.stride(2) != 1 or q.stride(1) != dim:
            q = q.contiguous()
        for t, dtype in ((q, torch.float32), (blocks, torch.int64), (starts, torch.int64), (lengths, torch.int64)):
            if t.dtype != dtype or t.device.type != "cpu":
                raise TypeError(f"native attention takes {dtype} CPU tensors, got {t.dtype} on {t.device}")
        if cache.dtype not in self.kv_dtypes or cache.device.type != "cpu":
            raise TypeError(f"native attention reads a CPU cache of {sorted(map(str, self.kv_dtypes))}, "
                            f"got {cache.dtype} on {cache.device}")
        if not (cache.is_contiguous() and blocks.is_contiguous() and starts.is_contiguous() and lengths.is_contiguous()):
            raise ValueError("native attention takes a contiguous cache and block lists")
        out = torch.empty((rows, heads, dim), dtype=torch.float32)
        _, kv_heads, _, block_size, _ = cache.shape
        status = self._decode(
            q.data_ptr(), cache.data_ptr(), blocks.data_ptr(), starts.data_ptr(), lengths.data_ptr(),
            out.data_ptr(), rows, q.stride(0), heads, kv_heads, block_size, dim, scale, KV_DTYPE_CODES[cache.dtype],
            torch.get_num_threads() if threads is None else threads,
        )
        if status != 0:
            raise ValueError(f"native attention does not handle this shape (heads {heads}, kv heads {kv_heads}, "
                             f"block size {block_size}, head dim {dim})")
        return out


def keys_transposed(cache: torch.Tensor) -> torch.Tensor:
    """A ``[blocks, kv_heads, 2, block_size, dim]`` cache in the native kernels' layout: each
    block's keys stored transposed (``[dim, block_size]`` in the same place), values as they are."""
    out = cache.clone()
    blocks, kv_heads, _, block_size, dim = cache.shape
    out[:, :, 0] = cache[:, :, 0].transpose(-1, -2).contiguous().view(blocks, kv_heads, block_size, dim)
    return out


def keys_in_order(keys: torch.Tensor) -> torch.Tensor:
    """The inverse view for keys gathered from such a cache: ``[..., block_size, dim]`` tensors
    whose memory is ``[dim, block_size]`` -> the keys as ``[..., block_size, dim]`` (a view)."""
    *lead, block_size, dim = keys.shape
    return keys.reshape(*lead, dim, block_size).transpose(-1, -2)


def _check_float_rows(x: torch.Tensor, contiguous: bool = False) -> None:
    if x.dim() != 2 or x.dtype != torch.float32 or x.device.type != "cpu" or x.stride(1) != 1:
        raise ValueError(f"expected float32 CPU rows [rows, k] with unit stride, got {x.dtype} {tuple(x.shape)}")
    if contiguous and not x.is_contiguous():
        raise ValueError("expected contiguous rows")


_loaded: dict[Path, NativeKernels] = {}


def load(mode: str = "auto") -> NativeKernels | None:
    """The kernels for ``mode``: ``"torch"`` -> None; ``"auto"`` -> the kernels, or None (logged)
    when they cannot be built or fail their check; ``"native"`` -> the kernels or
    :class:`NativeKernelError`."""
    if mode not in KERNELS:
        raise ValueError(f"kernels must be one of {KERNELS}, not {mode!r}")
    if mode == "torch":
        return None
    try:
        path = build()
        if path not in _loaded:
            kernels = NativeKernels(path)
            _check(kernels)
            _loaded[path] = kernels
        return _loaded[path]
    except (NativeKernelError, OSError) as exc:
        if mode == "native":
            raise NativeKernelError(f"native kernels unavailable: {exc}") from exc
        logger.warning("native kernels unavailable, using PyTorch's operators: %s", exc)
        return None


def build(source_path: Path = SOURCE, extra_flags: tuple[str, ...] = ()) -> Path:
    """Compile ``kernels.c`` (or another source of chatstream's, e.g. ``quant/kernels.c``, with
    ``extra_flags``) once per (source, flags, compiler, CPU); returns the cached shared library."""
    from ...model_loader import cache_dir

    flags = (*FLAGS, *extra_flags)
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise NativeKernelError("no C compiler found (set CC, or install gcc)")
    source = b"".join(path.read_bytes() for path in (source_path, *HEADERS))
    try:
        version = subprocess.run([compiler, "--version"], capture_output=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        raise NativeKernelError(f"{compiler} --version failed: {exc}") from exc
    key = hashlib.sha256(b"\0".join([source, version, " ".join(flags).encode(), _cpu_identity()])).hexdigest()
    target = cache_dir() / "kernels" / f"{source_path.stem}-{key[:16]}.so"
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f"{target.stem}.{os.getpid()}.partial.so")  # processes may race: last rename wins
    command = [compiler, *flags, "-o", str(partial), str(source_path), "-lm"]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.SubprocessError) as exc:
        raise NativeKernelError(f"{' '.join(command)}: {exc}") from exc
    if done.returncode != 0:
        partial.unlink(missing_ok=True)
        raise NativeKernelError(f"{' '.join(command)} failed: {done.stderr.strip()[-2000:]}")
    os.replace(partial, target)
    logger.info("built native kernels: %s", target)
    return target


def _cpu_identity() -> bytes:
    """What ``-march=native`` depends on: the CPU's model and feature flags."""
    identity = [platform.machine(), platform.processor()]
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            seen = set()
            for line in f:
                name = line.split(":", 1)[0].strip()
                if name in ("model name", "flags", "Features", "CPU part") and name not in seen:
                    seen.add(name)
                    identity.append(line.strip())
    except OSError:
        pass
    return "\n".join(identity).encode()


def _check(kernels: NativeKernels) -> None:
    """Compare with PyTorch on a small random case: GQA, a partial last block, shuffled blocks."""
    generator = torch.Generator().manual_seed(0)
    heads, kv_heads, block_size, dim = 6, 2, 4, 8
    cache = torch.randn(9, kv_heads, 2, block_size, dim, generator=generator)
    tables = [[3, 7, 1], [5], [0, 8]]
    lengths = [10, 2, 8]
    q = torch.randn(len(tables), heads, dim, generator=generator)
    expected = []
    for r, table in enumerate(tables):
        kv = cache[table].permute(2, 1, 0, 3, 4).reshape(2, kv_heads, -1, dim)[:, :, : lengths[r]]
        k, v = (t.repeat_interleave(heads // kv_heads, dim=0) for t in kv)  # [heads, L, dim]
        probs = torch.softmax((k @ q[r][:, :, None]).squeeze(-1) * dim**-0.5, dim=-1)
        expected.append((probs[:, None, :] @ v).squeeze(1))
    got = kernels.paged_decode_attention(
        q, keys_transposed(cache), torch.tensor([b for t in tables for b in t]),
        torch.tensor([0, 3, 4, 6]), torch.tensor(lengths), dim**-0.5,
    )
    if not torch.allclose(got, torch.stack(expected), atol=1e-5, rtol=1e-4):
        raise NativeKernelError(f"{kernels.path} disagrees with PyTorch on its attention check")
    # RoPE in place and the KV write, into the layout the attention above read.
    qkv = torch.randn(3, (heads + 2 * kv_heads) * dim, generator=generator)
    cos, sin = torch.randn(3, dim, generator=generator), torch.randn(3, dim, generator=generator)
    qk = qkv[:, : (heads + kv_heads) * dim].view(3, heads + kv_heads, dim)
    rotated = torch.addcmul(qk * cos[:, None], qk.roll(dim // 2, -1), sin[:, None])
    values = qkv[:, (heads + kv_heads) * dim :].view(3, kv_heads, dim).clone()
    stored = torch.zeros(4, kv_heads, 2, block_size, dim)
    original = qkv.clone()  # rope_store_kv rotates in place
    kernels.rope_store_kv(qkv, heads, kv_heads, cos, sin, stored, torch.tensor([2, 0, 2]), torch.tensor([1, 3, 0]))
    expected_cache = torch.zeros_like(stored)
    for t, (block, offset) in enumerate(((2, 1), (0, 3), (2, 0))):
        expected_cache[block, :, 0, offset] = rotated[t, heads:]
        expected_cache[block, :, 1, offset] = values[t]
    if not (torch.allclose(qk, rotated, atol=1e-6) and torch.allclose(stored, keys_transposed(expected_cache), atol=1e-6)):
        raise NativeKernelError(f"{kernels.path} disagrees with PyTorch on its RoPE and KV-write check")
    # A 16-bit cache: written rounded as PyTorch rounds, read widened exactly (so the same scores
    # as float32 kernels over the rounded values).
    for dtype in sorted(kernels.kv_dtypes - {torch.float32}, key=str):
        half = torch.zeros(4, kv_heads, 2, block_size, dim, dtype=dtype)
        kernels.rope_store_kv(original.clone(), heads, kv_heads, cos, sin, half, torch.tensor([2, 0, 2]),
                              torch.tensor([1, 3, 0]))
        wide = cache.to(dtype).float()
        read = kernels.paged_decode_attention(
            q, keys_transposed(cache).to(dtype), torch.tensor([b for t in tables for b in t]),
            torch.tensor([0, 3, 4, 6]), torch.tensor(lengths), dim**-0.5,
        )
        exact = kernels.paged_decode_attention(
            q, keys_transposed(wide), torch.tensor([b for t in tables for b in t]),
            torch.tensor([0, 3, 4, 6]), torch.tensor(lengths), dim**-0.5,
        )
        if not (torch.equal(half, keys_transposed(expected_cache).to(dtype)) and torch.equal(read, exact)):
            raise NativeKernelError(f"{kernels.path} disagrees with PyTorch on its {dtype} KV-cache check")
    if kernels.int8:  # odd sizes: partial tiles of rows, channels and 4-byte groups
        from ..quant.int8 import int8_linear, quantize_weight

        weight, scale = quantize_weight(torch.randn(37, 22, generator=generator))
        bias = torch.randn(37, generator=generator)
        x = torch.randn(7, 22, generator=generator) * 3
        packed = PackedInt8Weight.pack(weight, scale, bias)
        if not torch.equal(kernels.int8_linear(kernels.quantize(x), packed), int8_linear(x, weight, scale, bias)):
            raise NativeKernelError(f"{kernels.path} disagrees with PyTorch on its int8 check")
        # The fused norm and SiLU quantize what PyTorch computes, to within one int8 step.
        norm_weight = torch.rand(22, generator=generator) + 0.5
        for rows, reference in (
            (kernels.rms_norm_quantize(x, norm_weight, 1e-5), torch.nn.functional.rms_norm(x, (22,), norm_weight, 1e-5)),
            (kernels.silu_mul_quantize(torch.cat([x, x.flip(0)], dim=1)), torch.nn.functional.silu(x) * x.flip(0)),
        ):
            step = reference.abs().amax(dim=1, keepdim=True) / 127
            values = (rows.data[:, :22].float() - 128) * rows.scales[:, None]
            if not ((values - reference).abs() <= 0.5001 * step + 1e-6).all():
                raise NativeKernelError(f"{kernels.path} disagrees with PyTorch on its norm/SiLU check")

