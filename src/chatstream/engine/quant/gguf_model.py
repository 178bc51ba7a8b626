"""Load a quantized GGUF file as a transformers model whose linear layers stay quantized.

The model is built from the file's config on PyTorch's meta device (no memory), then filled
tensor by tensor: each matrix is read from the file on its own and becomes a :class:`QuantLinear`
(or :class:`QuantEmbedding`) over a :class:`~.formats.TiledWeight`, norms and biases become
float32 parameters. So memory holds the file's weights once, plus one tensor being read; no float32
copy of the model is ever made. The first load of a file reads its metadata with the ``gguf``
package (config, tokenizer, where each tensor lies: seconds for a large vocabulary) and keeps it in
a small folder under the cache directory, keyed by the file's content; later loads read that.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from . import native as quant_native
from .formats import TiledWeight, from_gguf

logger = logging.getLogger("chatstream.model")

# GGUF architectures whose tensors transformers maps to these model types with no reshaping other
# than llama's rows of q and k (which reorder output channels, so they apply to blocks as well).
ARCHITECTURES: tuple[str, ...] = ("llama", "mistral", "qwen2", "qwen3")
_FLOAT_TYPES = ("F32", "F16", "BF16")


class QuantLinear(torch.nn.Module):
    """``y = x @ W.T + b`` with ``W`` in blocks (:class:`TiledWeight`): through the native
    kernels when they run here, else by dequantizing ``W`` with PyTorch at each call."""

    def __init__(self, weight: TiledWeight, bias: torch.Tensor | None, kernels: quant_native.QuantKernels | None) -> None:
        super().__init__()
        self.weight_blocks = weight
        self.in_features, self.out_features = weight.in_features, weight.out_features
        self.bias = bias
        self.kernels = kernels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = quant_linears([self], x.reshape(-1, self.in_features))
        return out.to(x.dtype).reshape(*x.shape[:-1], self.out_features)


class QuantEmbedding(torch.nn.Module):
    """Token embeddings in blocks: each looked-up row is dequantized (the lm_head may share them)."""

    def __init__(self, weight: TiledWeight) -> None:
        super().__init__()
        self.weight_blocks = weight
        self.num_embeddings, self.embedding_dim = weight.out_features, weight.in_features

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.weight_blocks.values(ids.reshape(-1)).reshape(*ids.shape, self.embedding_dim)


def quant_linears(layers: list[QuantLinear], x: torch.Tensor, *, norm: torch.Tensor | None = None, eps: float = 0.0,
                  silu_mul: bool = False, add_to: torch.Tensor | None = None) -> torch.Tensor:
    """Several quantized layers over the same rows ``x`` [n, k], outputs side by side (q/k/v, gate/up):
    the rows are quantized once. With ``norm``, over ``rms_norm(x) * norm``; with ``silu_mul``, over
    ``silu(gate) * up`` of rows ``x = [gate | up]`` (either computed and quantized in one pass); with
    ``add_to`` (one layer), the result is added to it in place (a residual) and it is returned."""
    rows = x.float()
    kernels = layers[0].kernels
    if kernels is None or rows.stride(-1) != 1:
        if norm is not None:
            rows = F.rms_norm(rows, (rows.shape[-1],), norm, eps)
        if silu_mul:
            gate, up = rows.chunk(2, dim=-1)
            rows = F.silu(gate) * up
        out = torch.cat([F.linear(rows, m.weight_blocks.values(), m.bias) for m in layers], dim=-1)
        return out if add_to is None else add_to.add_(out)
    if norm is not None:
        quantized = kernels.rms_norm_quantize(rows.contiguous(), norm, eps)
    elif silu_mul:
        quantized = kernels.silu_mul_quantize(rows.contiguous())
    else:
        quantized = kernels.quantize(rows)
    if add_to is not None:
        if len(layers) != 1:
            raise ValueError("a residual add takes one layer")
        return kernels.linear(quantized, layers[0].weight_blocks, layers[0].bias, out=add_to, accumulate=True)
    if len(layers) == 1:
        return kernels.linear(quantized, layers[0].weight_blocks, layers[0].bias)
    out = torch.empty((rows.shape[0], sum(m.out_features for m in layers)), dtype=torch.float32)
    start = 0
    for m in layers:
        kernels.linear(quantized, m.weight_blocks, m.bias, out=out[:, start : start + m.out_features])
        start += m.out_features
    return out


def is_quantized(info: dict[str, Any]) -> bool:
    """Whether the file's matrices are quantized (then :func:`load_gguf` keeps them so)."""
    return any(t["type"] not in _FLOAT_TYPES for t in info["tensors"] if len(t["shape"]) == 2)


def gguf_info(path: Path) -> tuple[dict[str, Any], Path]:
    """The file's tensor index and architecture, and the folder with its config and tokenizer:
    read with the ``gguf`` package once, then from the cache."""
    from ...model_loader import _content_hash, cache_dir

    folder = cache_dir() / "models" / f"{path.stem}-{_content_hash(path)[:16]}-gguf"
    index = folder / "gguf-tensors.json"
    if index.is_file():
        return json.loads(index.read_text()), folder
    from gguf import GGUFReader
    from transformers import AutoConfig, AutoTokenizer

    reader = GGUFReader(path)
    arch_field = reader.get_field("general.architecture")
    architecture = arch_field.contents() if arch_field is not None else ""
    info = {
        "architecture": architecture,
        "tensors": [
            {"name": t.name, "type": t.tensor_type.name, "shape": [int(s) for s in t.shape],
             "offset": int(t.data_offset), "n_bytes": int(t.n_bytes)}
            for t in reader.tensors
        ],
    }
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".gguf-", dir=folder.parent))
    try:
        with _reader_reused(path, reader):
            AutoConfig.from_pretrained(path.parent, gguf_file=path.name).save_pretrained(staging)
            AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name).save_pretrained(staging)
        del reader
        (staging / "gguf-tensors.json").write_text(json.dumps(info))
        try:
            staging.rename(folder)
        except OSError:  # another process wrote it meanwhile
            if not index.is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return info, folder


@contextlib.contextmanager
def _reader_reused(path: Path, reader: Any) -> Iterator[None]:
    """transformers parses the file again for its config and again for its tokenizer (every
    metadata entry, one Python object each: most of a first load); hand it this parse instead."""
    import gguf

    original = gguf.GGUFReader

    def reuse(target: Any, *args: Any, **kwargs: Any) -> Any:
        return reader if Path(target).resolve() == path.resolve() else original(target, *args, **kwargs)

    gguf.GGUFReader = reuse  # type: ignore[assignment,misc]
    try:
        yield
    finally:
        gguf.GGUFReader = original  # type: ignore[misc]


def load_gguf(path: Path, kernels: quant_native.QuantKernels | None | str = "auto") -> tuple[Any, Any]:
    """``(model, tokenizer)`` from a quantized GGUF file, its matrices kept in blocks (see the module).

    ``kernels``: ``"auto"`` builds and checks the native kernels (PyTorch dequantization where
    they fail), or give loaded ones, or None for PyTorch only.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor

    info, folder = gguf_info(path)
    if info["architecture"] not in ARCHITECTURES:
        raise ValueError(f"{path.name}: architecture {info['architecture']!r} is not one of {ARCHITECTURES}")
    if kernels == "auto":
        kernels = quant_native.load()
    assert not isinstance(kernels, str)
    config = AutoConfig.from_pretrained(folder, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    with torch.device("meta"):
        model: Any = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    processor = TENSOR_PROCESSORS.get(info["architecture"], TensorProcessor)(config=config.to_dict())
    names = _gguf_names(model, info["architecture"])
    biases: dict[str, torch.Tensor] = {}
    embedding: TiledWeight | None = None
    with open(path, "rb") as f:
        for t in info["tensors"]:
            hf_name = names.get(t["name"])
            if hf_name is None:
                logger.info("%s: tensor %s not used", path.name, t["name"])
                continue
            f.seek(t["offset"])
            raw = np.frombuffer(f.read(t["n_bytes"]), dtype=np.uint8)  # this tensor only
            module_name, _, kind = hf_name.rpartition(".")
            module = model.get_submodule(module_name)
            if len(t["shape"]) == 2 and isinstance(module, torch.nn.Linear | torch.nn.Embedding) and kind == "weight":
                shape = (t["shape"][1], t["shape"][0])  # GGUF lists the fastest dimension first
                rows = processor.process(weights=raw.reshape(shape[0], -1), name=t["name"]).weights
                weight = TiledWeight.from_blocks(from_gguf(rows, t["type"], shape))
                if isinstance(module, torch.nn.Embedding):
                    embedding = weight
                    _replace(model, module_name, QuantEmbedding(weight))
                else:
                    _replace(model, module_name, QuantLinear(weight, None, kernels))
            else:
                processed = processor.process(weights=_float_values(raw, t["type"], t["shape"]), name=t["name"])
                values = torch.from_numpy(np.array(processed.weights))
                if kind == "bias" and isinstance(module, torch.nn.Linear):
                    biases[module_name] = values.float().contiguous()
                else:
                    param = getattr(module, kind)
                    setattr(module, kind, torch.nn.Parameter(values.float().reshape(param.shape), requires_grad=False))
    for module_name, bias in biases.items():
        layer = model.get_submodule(module_name)
        if isinstance(layer, QuantLinear):
            layer.bias = bias
    if isinstance(model.get_output_embeddings(), torch.nn.Linear):  # tied: the embeddings' blocks, shared
        if embedding is None or not getattr(config, "tie_word_embeddings", False):
            raise ValueError(f"{path.name} has no output weights and no tied embeddings")
        model.set_output_embeddings(QuantLinear(embedding, None, kernels))
    _rebuild_meta_buffers(model)
    model.eval()
    _release_freed_heap()
    return model, tokenizer


def _release_freed_heap() -> None:
    """Give the OS back the heap pages that loading's temporaries freed: glibc keeps them (after
    one large block is freed it serves later ones from the heap, which then fragments), 94 MiB of
    a 1.2 GiB resident set for a Llama-3.2-1B-shaped file. Elsewhere than glibc: nothing."""
    name = ctypes.util.find_library("c")
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(name).malloc_trim(0)


def _gguf_names(model: Any, architecture: str) -> dict[str, str]:
    """GGUF tensor name -> the model's parameter name, from the ``gguf`` package's name table (built
    once: transformers' own helper builds it again for every submodule, ~40 s for a 30-layer model)."""
    from gguf import MODEL_ARCH_NAMES, get_tensor_name_map

    arch = next(key for key, value in MODEL_ARCH_NAMES.items() if value == architecture)
    table = get_tensor_name_map(arch, model.config.num_hidden_layers)
    names: dict[str, str] = {}
    for hf_name in model.state_dict():
        base, _, suffix = hf_name.rpartition(".")
        gguf_name = table.get_name(base)
        if gguf_name is not None:
            names[f"{gguf_name}.{suffix}"] = hf_name
    return names


def _float_values(raw: np.ndarray, type_name: str, shape: list[int]) -> np.ndarray:
    from gguf import GGMLQuantizationType, quants

    return quants.dequantize(raw, GGMLQuantizationType[type_name]).reshape(list(reversed(shape)))


def _replace(model: Any, name: str, module: torch.nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def _rebuild_meta_buffers(model: Any) -> None:
    """Modules whose buffers are computed at construction (rotary embeddings) are built again on
    the CPU; any parameter left on the meta device means the file lacked it."""
    for name, module in list(model.named_modules()):
        if any(b.is_meta for b in module.buffers(recurse=False)):
            _replace(model, name, type(module)(config=model.config))
    missing = [n for n, p in model.named_parameters() if p.is_meta] + [n for n, b in model.named_buffers() if b.is_meta]
    if missing:
        raise ValueError(f"the GGUF file has no values for {', '.join(missing[:5])}")


def resident_bytes(model: Any) -> int:
    """Bytes of the model's weights as held in memory (blocks and float tensors)."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    seen: set[int] = set()
    for module in model.modules():
        weight = getattr(module, "weight_blocks", None)
        if isinstance(weight, TiledWeight) and id(weight) not in seen:
            seen.add(id(weight))
            total += weight.nbytes
    return total


def env_flag(name: str) -> bool:
    return os.environ.get(name, "").lower() in ("1", "true", "yes")
