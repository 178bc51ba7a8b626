"""Make a random-weight GGUF file of a real model's shape, with llama.cpp's own tools.

    .venv/bin/python -m benchmarks.make_gguf --shape llama-3.2-1b --type Q4_K_M --out /tmp/llama-1b.Q4_K_M.gguf \\
        [--tools /work/peers/bin]

Speed and memory depend on the shape and the weight format, not on what the weights learned, so a
random model of Llama-3.2-1B's or Llama-3.1-8B's shape (with SmolLM2's tokenizer: the vocabulary
of the embedded model, 49,152 tokens) measures what serving the real one costs. The weights are
written as a bfloat16 Hugging Face folder one layer a safetensors shard (the model itself only on
the meta device: peak 834 MiB for 8B), converted by llama.cpp's ``convert_hf_to_gguf.py`` (it
streams: peak 1,569 MiB for 8B) to F16, or to Q8_0 where the folder and an F16 file together would
pass 24 GB of disk (8B), and quantized by ``llama-quantize`` (tensor by tensor; both tools in
``--tools``; ``../shared/peers/build-llama-server.sh`` builds them). ``--from-folder`` quantizes a
real model folder instead (the quality gate's files: ``benchmarks.quality``).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

SHAPES: dict[str, dict[str, int | float | bool]] = {
    "llama-3.2-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                         num_key_value_heads=8, head_dim=64, tie_word_embeddings=True, rope_theta=500000.0),
    "llama-3.1-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=8, head_dim=128, tie_word_embeddings=False, rope_theta=500000.0),
    "tiny": dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=64, tie_word_embeddings=True, rope_theta=10000.0),
}


def hf_folder(shape: str, folder: Path) -> None:
    """A random-weight Llama of ``shape`` with the embedded model's tokenizer, as bfloat16 safetensors
    written one layer a shard: the model is built on the meta device (names and shapes only) and each
    shard's tensors are made, saved and freed before the next, so the peak is one layer (or the
    embedding), not the model (~16 GB in bfloat16 for 8B)."""
    import json

    import torch
    from safetensors.torch import save_file
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from chatstream.engine.quant.gguf_model import gguf_info
    from chatstream.model_loader import default_model_path

    _, meta = gguf_info(default_model_path())  # SmolLM2's tokenizer, as the GGUF loader keeps it
    tokenizer = AutoTokenizer.from_pretrained(meta)
    config = LlamaConfig(vocab_size=len(tokenizer), max_position_embeddings=8192, rms_norm_eps=1e-5,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         **SHAPES[shape])  # type: ignore[arg-type]
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    shards: dict[str, list[tuple[str, torch.Size]]] = {}
    for name, param in model.named_parameters():  # a tied lm_head is not listed: it is the embedding
        layer = re.match(r"model\.layers\.(\d+)\.", name)
        shards.setdefault(f"layer{int(layer.group(1)):03d}" if layer else name.split(".")[-2], []).append(
            (name, param.shape))
    generator = torch.Generator().manual_seed(0)
    folder.mkdir(parents=True, exist_ok=True)
    weight_map: dict[str, str] = {}
    total = 0
    for i, (_, params) in enumerate(sorted(shards.items())):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {}
        for name, shape_ in params:
            tensor = torch.empty(shape_, dtype=torch.bfloat16)
            if "norm" in name:
                tensor.fill_(1.0)
            else:
                tensor.normal_(0.0, config.initializer_range, generator=generator)
            tensors[name] = tensor
            weight_map[name] = file
            total += tensor.numel() * 2
        save_file(tensors, str(folder / file), metadata={"format": "pt"})
        del tensors
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    config.architectures = ["LlamaForCausalLM"]  # what the converter picks its model class by
    config.dtype = torch.bfloat16
    config.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def _peak_mib(who: str) -> float:
    """Peak resident memory of this process, or of the largest child waited for so far (Linux: KiB)."""
    import resource

    usage = resource.getrusage(resource.RUSAGE_SELF if who == "self" else resource.RUSAGE_CHILDREN)
    return usage.ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="llama-3.2-1b")
    parser.add_argument("--type", default="Q4_K_M", help="llama-quantize's type (Q4_K_M, Q4_0, Q8_0, ...)")
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--from-folder", type=Path, default=None,
                        help="quantize this Hugging Face folder's weights instead of random ones (e.g. the embedded "
                             "model's float32 conversion in ~/.cache/chatstream/models/), for the quality gate")
    parser.add_argument("--intermediate", choices=["auto", "f32", "f16", "q8_0"], default="auto",
                        help="the converter's output, which llama-quantize then quantizes: f16, or q8_0 (half the "
                             "disk; requantized with --allow-requantize); auto: q8_0 where the bfloat16 folder and "
                             "an F16 file together would pass 24 GB of disk (8B: 16 + 16 GB); f32 with --from-folder")
    parser.add_argument("--tools", type=Path, default=Path("/work/peers/bin"),
                        help="folder with convert_hf_to_gguf.py, its gguf-py and llama-quantize")
    opts = parser.parse_args()
    converter, quantize = opts.tools / "convert_hf_to_gguf.py", opts.tools / "llama-quantize"
    for tool in (converter, quantize):
        if not tool.exists():
            raise SystemExit(f"{tool} is missing: build llama.cpp's tools with ../shared/peers/build-llama-server.sh")
    work = Path(tempfile.mkdtemp(prefix="make-gguf-", dir=opts.out.parent))
    try:
        if opts.from_folder is None:
            print(f"random {opts.shape} weights -> {work}", flush=True)
            hf_folder(opts.shape, work / "hf")
            print(f"weights written; peak RSS so far {_peak_mib('self'):.0f} MiB", flush=True)
        folder = opts.from_folder or work / "hf"
        folder_bytes = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
        intermediate = opts.intermediate if opts.intermediate != "auto" else (
            "f32" if opts.from_folder else "q8_0" if 2 * folder_bytes > 24e9 else "f16")
        f16 = work / f"model.{intermediate}.gguf"
        # The converter imports sentencepiece before it looks for a tokenizer.model (this tokenizer has
        # none: it is BPE, so it is never called); a stand-in spares installing it.
        stub = work / "stub" / "sentencepiece"
        stub.mkdir(parents=True)
        (stub / "__init__.py").write_text("class SentencePieceProcessor:  # never used: no tokenizer.model\n    pass\n")
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(opts.tools / "gguf-py"), str(stub.parent)])}
        subprocess.run([sys.executable, str(converter), str(folder), "--outtype", intermediate, "--outfile", str(f16)],
                       check=True, env=env)
        print(f"converted to {intermediate}; the converter's peak RSS {_peak_mib('children'):.0f} MiB", flush=True)
        shutil.rmtree(work / "hf", ignore_errors=True)
        requantize = ["--allow-requantize"] if intermediate == "q8_0" else []
        subprocess.run([str(quantize), *requantize, str(f16), str(opts.out), opts.type], check=True)
        print(f"{opts.out}: {opts.out.stat().st_size / 2**20:.0f} MiB; the largest child's peak RSS "
              f"{_peak_mib('children'):.0f} MiB", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
