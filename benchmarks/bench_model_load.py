"""Load time of the embedded SmolLM2: dequantising the GGUF (every load without a cache) vs the cached safetensors.

python benchmarks/bench_model_load.py
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from fastsae.lm.models import EMBEDDED_MODEL, load_model, load_tokenizer, model_folder, resolve_model


def seconds(function) -> float:
    started = time.perf_counter()
    function()
    return time.perf_counter() - started


def main() -> None:
    source = resolve_model(EMBEDDED_MODEL)
    model_folder(source)  # make sure the cache exists, so the second row measures a cached load
    gguf = Path(source.location)

    def from_gguf() -> None:
        AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)

    def from_cache() -> None:
        load_tokenizer(source)
        load_model(source, torch.float32, "cpu")

    rows = [("GGUF, dequantised on load (transformers + gguf)", seconds(from_gguf)), ("fastsae cache (safetensors)", seconds(from_cache))]
    print(f"\nLoading {gguf.name} (tokenizer + model, float32, CPU)\n")
    print(f"| {'source':<48} | {'seconds':>7} |")
    print(f"|{'-' * 50}|{'-' * 9}|")
    for name, elapsed in rows:
        print(f"| {name:<48} | {elapsed:>7.1f} |")


if __name__ == "__main__":
    main()
