"""The sampler's native kernel (``sampling.c``), built and cached like :mod:`..ops.native`'s kernels.

:func:`.sampler.sample` hands it the rows of a CPU float32 batch after the mask and penalties; it
draws each row's token in one pass over the row (see ``sampling.c``), where PyTorch spent a
``topk``, an ``argmax`` and several full passes of the batch per step. A start-up check compares
its tokens with the PyTorch sampler's; where it cannot be built or disagrees, :func:`load` returns
None and the sampler stays on PyTorch's operators.
"""

from __future__ import annotations

import ctypes
import logging
from pathlib import Path

import torch

from ..ops import native

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("sampling.c")
_P, _I = ctypes.c_void_p, ctypes.c_int64


class SamplingKernels:
    """The loaded library."""

    def __init__(self, path: Path) -> None:
        self.path = path
        lib = ctypes.CDLL(str(path))
        lib.sample_rows.argtypes = [_P, _I, _I, _I, _P, _P, _P, _P, _P, _P, _I, _P, _P, _P, _P, _I, _P]
        lib.sample_rows.restype = ctypes.c_int
        lib.uniform.argtypes = [_I, _I]
        lib.uniform.restype = ctypes.c_float
        self._lib = lib

    def sample(
        self, logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
        min_p: torch.Tensor | None, seed: torch.Tensor, step: torch.Tensor, candidates: int,
        repetition_penalty: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
        allowed: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """int64 ``[rows]``: each row's token, or -1 for a row to redo over the whole vocabulary
        (a top-k above ``candidates``, or a nucleus reaching past them). ``logits``: float32 CPU
        ``[rows, vocab]`` with unit stride along the vocabulary. ``repetition_penalty``: (penalty
        per row, seen rows, seen tokens) as in :class:`.sampler.SamplingBatch`, applied to a copy of
        each penalised row (``logits`` is never written). ``allowed``: a grammar's packed mask, int32
        ``[rows, words]`` as :func:`.sampler.pack_mask` makes it, applied to a copy of each row it
        constrains (a row of all ones is read in place)."""
        rows, vocab = logits.shape
        if logits.dtype != torch.float32 or logits.device.type != "cpu" or logits.stride(1) != 1:
            raise ValueError(f"native sampling takes float32 CPU rows, got {logits.dtype} on {logits.device}")
        params = [_contiguous(t, dtype, rows) for t, dtype in (
            (temperature, torch.float32), (top_k, torch.int64), (top_p, torch.float32), (seed, torch.int64),
            (step, torch.int64))]
        floor = None if min_p is None else _contiguous(min_p, torch.float32, rows)
        penalty = starts = tokens = None
        if repetition_penalty is not None:
            penalty = _contiguous(repetition_penalty[0], torch.float32, rows)
            seen_rows, seen_tokens = repetition_penalty[1].to("cpu", torch.int64), repetition_penalty[2].to("cpu", torch.int64)
            if seen_rows.shape != seen_tokens.shape or seen_rows.dim() != 1:
                raise ValueError("seen rows and tokens must be 1-D and of one length")
            if seen_rows.numel() and not bool((seen_rows[1:] >= seen_rows[:-1]).all()):
                order = seen_rows.argsort(stable=True)
                seen_rows, seen_tokens = seen_rows[order], seen_tokens[order]
            starts = torch.zeros(rows + 1, dtype=torch.int64)
            starts[1:] = torch.bincount(seen_rows, minlength=rows)[:rows].cumsum(0)
            tokens = seen_tokens.contiguous()
        mask = None
        if allowed is not None:
            if allowed.dim() != 2 or allowed.shape[0] != rows:
                raise ValueError(f"expected one mask row per row ({rows}), got shape {tuple(allowed.shape)}")
            mask = allowed.to(device="cpu", dtype=torch.int32).contiguous()
        out = torch.empty(rows, dtype=torch.int64)
        status = self._lib.sample_rows(
            logits.data_ptr(), rows, vocab, logits.stride(0), params[0].data_ptr(), params[1].data_ptr(),
            params[2].data_ptr(), None if floor is None else floor.data_ptr(), params[3].data_ptr(),
            params[4].data_ptr(), candidates, None if penalty is None else penalty.data_ptr(),
            None if starts is None else starts.data_ptr(), None if tokens is None else tokens.data_ptr(),
            None if mask is None else mask.data_ptr(), 0 if mask is None else mask.shape[1], out.data_ptr(),
        )
        if status != 0:
            raise MemoryError("native sampling could not allocate its work buffers")
        return out

    def uniform(self, seed: int, step: int) -> float:
        """The sampler's ``_uniform`` for one (seed, step), as the kernel computes it."""
        return float(self._lib.uniform(seed, step))


def _contiguous(t: torch.Tensor, dtype: torch.dtype, rows: int) -> torch.Tensor:
    if t.shape != (rows,):
        raise ValueError(f"expected one value per row ({rows}), got shape {tuple(t.shape)}")
    return t.to(device="cpu", dtype=dtype).contiguous()


_loaded: dict[Path, SamplingKernels] = {}


def load(mode: str = "auto") -> SamplingKernels | None:
    """The kernel for ``mode`` (:data:`..ops.native.KERNELS`): ``"torch"`` -> None; ``"auto"`` -> the
    kernel, or None (logged) when it cannot be built or fails its check; ``"native"`` -> the kernel
    or :class:`..ops.native.NativeKernelError`."""
    if mode not in native.KERNELS:
        raise ValueError(f"kernels must be one of {native.KERNELS}, not {mode!r}")
    if mode == "torch":
        return None
    try:
        path = native.build(SOURCE)
        if path not in _loaded:
            kernels = SamplingKernels(path)
            _check(kernels)
            _loaded[path] = kernels
        return _loaded[path]
    except (native.NativeKernelError, OSError) as exc:
        if mode == "native":
            raise native.NativeKernelError(f"native sampling unavailable: {exc}") from exc
        logger.warning("native sampling unavailable, sampling with PyTorch's operators: %s", exc)
        return None


def _check(kernels: SamplingKernels) -> None:
    """The same tokens as the PyTorch sampler on a small batch of every parameter mix."""
    from .sampler import SamplingBatch, _uniform, pack_mask, sample

    generator = torch.Generator().manual_seed(0)
    vocab = 3000
    logits = torch.randn(8, vocab, generator=generator) * 3
    batch = SamplingBatch(
        temperature=torch.tensor([0.0, 0.7, 0.7, 0.7, 1.0, 1.3, 0.5, 2.0]),
        top_k=torch.tensor([0, 0, 50, 0, 40, 7, 1, 0]),
        top_p=torch.tensor([1.0, 1.0, 1.0, 0.9, 0.95, 0.5, 1.0, 0.8]),
        repetition_penalty=torch.ones(8),
        seed=torch.tensor([3, -1, 2**62, 17, -(2**63), 5, 6, 99]),
        step=torch.tensor([0, 1, 2, 3, 40, 500, 6, 7]),
        min_p=torch.tensor([0.0, 0.0, 0.05, 0.0, 0.1, 0.0, 0.0, 0.02]),
    )
    for i, (s, t) in enumerate(zip(batch.seed.tolist(), batch.step.tolist())):
        if kernels.uniform(s, t) != float(_uniform(batch.seed[i : i + 1], batch.step[i : i + 1])[0]):
            raise native.NativeKernelError(f"{kernels.path} draws other uniforms than the sampler")
    got = kernels.sample(logits, batch.temperature, batch.top_k, batch.top_p, batch.min_p, batch.seed, batch.step,
                         1024)
    if not torch.equal(got, sample(logits, batch).tokens):
        raise native.NativeKernelError(f"{kernels.path} samples other tokens than the PyTorch sampler")
    # The repetition penalty on the favourites of some rows (given out of order, one twice).
    batch.repetition_penalty = torch.tensor([1.5, 1.0, 2.0, 1.2, 0.7, 1.1, 1.3, 3.0])
    batch.seen_rows = torch.tensor([7, 0, 2, 2, 4, 0, 7, 5, 3, 6])
    batch.seen_tokens = logits.argmax(dim=-1)[batch.seen_rows]
    got = kernels.sample(logits, batch.temperature, batch.top_k, batch.top_p, batch.min_p, batch.seed, batch.step,
                         1024, repetition_penalty=(batch.repetition_penalty, batch.seen_rows, batch.seen_tokens))
    if not torch.equal(got, sample(logits, batch).tokens):
        raise native.NativeKernelError(f"{kernels.path} applies the repetition penalty otherwise than the sampler")
    # A grammar's mask on some rows (the favourites of rows 1 and 2 forbidden), the penalty still on.
    allowed = torch.rand(8, vocab, generator=generator) < torch.tensor([0.01, 0.5, 0.5, 1, 1, 0.2, 1, 1])[:, None]
    allowed[[1, 2], logits[[1, 2]].argmax(dim=-1)] = False
    allowed[:, 0] = True
    mask = pack_mask(allowed)
    got = kernels.sample(logits, batch.temperature, batch.top_k, batch.top_p, batch.min_p, batch.seed, batch.step,
                         1024, repetition_penalty=(batch.repetition_penalty, batch.seen_rows, batch.seen_tokens),
                         allowed=mask)
    if not torch.equal(got, sample(logits, batch, mask).tokens):
        raise native.NativeKernelError(f"{kernels.path} applies a grammar's mask otherwise than the sampler")
