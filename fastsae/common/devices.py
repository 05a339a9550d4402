"""Which torch device a step runs on: `auto` takes the GPU when there is one (under torchrun, this rank's GPU)."""

from __future__ import annotations

import functools

import cpuinfo
import torch

from fastsae.common import distributed
from fastsae.common.errors import UserError


def resolve_device(name: str) -> str:
    """`auto` → cuda if available, else cpu; asking for cuda without a GPU, or for one this machine lacks, is a user error."""
    kind, colon, index = name.partition(":")
    if kind not in ("auto", "cpu", "cuda") or (colon and (kind != "cuda" or not index.isdigit())):
        raise UserError(f"DEVICE must be auto, cpu, cuda or cuda:N (a GPU's number); got {name!r}.")
    if kind == "cuda" and not torch.cuda.is_available():
        raise UserError(f"DEVICE is {name!r} but no CUDA GPU is available. Use --device cpu or auto.")
    if index and int(index) >= torch.cuda.device_count():
        raise UserError(f"DEVICE is {name!r} but this machine has {torch.cuda.device_count()} GPU(s), numbered from 0.")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    ranks = distributed.current()
    if ranks.is_distributed and name.startswith("cuda"):
        if name != "cuda":
            raise UserError(
                f"DEVICE is {name!r} under torchrun, which would put every rank on one GPU. Use --device auto or cuda: each rank takes its own GPU."
            )
        return f"cuda:{ranks.local_rank}"  # torchrun starts one process per GPU
    return name


@functools.cache
def cpu_has_bfloat16_instructions() -> bool:
    """Whether this CPU multiplies bfloat16 matrices in hardware (AMX or AVX512-BF16); without them bf16 is emulated and slower.

    py-cpuinfo reads the flags on every OS (about a second, hence the cache)."""
    flags = set(cpuinfo.get_cpu_info().get("flags", []))
    return bool(flags & {"avx512_bf16", "amx_bf16", "amx_tile"})
