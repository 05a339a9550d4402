"""Runs under `torchrun`: which rank this process is, and the few collective steps extraction and training need.

`torchrun --nproc-per-node N script.py` starts N copies of a step script with
RANK, LOCAL_RANK and WORLD_SIZE set. `init_from_environment` joins them into one
process group (NCCL between GPUs, gloo on CPUs); without torchrun everything here
is a no-op for a world of one, so the single-process code path is the same code.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from datetime import timedelta
from typing import NamedTuple, TypeVar

import torch
import torch.distributed as dist

from fastsae.common.errors import UserError

Result = TypeVar("Result")


class Ranks(NamedTuple):
    rank: int  # this process among all of them; rank 0 writes manifests, checkpoints and metrics
    world_size: int  # how many processes share the work
    local_rank: int  # this process on its machine: picks its GPU

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1


def init_from_environment() -> Ranks:
    """Join the process group torchrun describes in the environment (once); a plain run is a world of one."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
            dist.init_process_group("cuda:nccl,cpu:gloo")  # NCCL between GPUs; gloo still serves a --device cpu run
        else:
            dist.init_process_group("gloo")
        if dist.get_rank() != 0:
            # One report, from rank 0. Every rank reads the same data, settings and model, so the others' warnings
            # (rows skipped, examples truncated, a run interrupted) and weight-loading bars only repeated rank 0's.
            from transformers.utils import logging as transformers_logging

            logging.getLogger().setLevel(logging.ERROR)
            transformers_logging.disable_progress_bar()
    return current()


def current() -> Ranks:
    if not dist.is_initialized():
        return Ranks(0, 1, 0)
    return Ranks(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def broadcast_from_main_(tensor: torch.Tensor) -> torch.Tensor:
    """Rank 0's `tensor` on every rank, in place (nothing to do for a world of one)."""
    if dist.is_initialized():
        dist.broadcast(tensor, src=0)
    return tensor


def all_reduce_sum_(tensor: torch.Tensor) -> torch.Tensor:
    """Sum `tensor` over the ranks, in place (nothing to do for a world of one)."""
    if dist.is_initialized():
        dist.all_reduce(tensor)
    return tensor


def on_main_then_shared(action: Callable[[], Result]) -> Result | None:
    """Run `action` on rank 0 only; a user error there is raised on every rank, so none waits forever.

    Returns the action's result on rank 0 and None elsewhere.
    """
    if not dist.is_initialized():
        return action()
    result, message = None, [None]
    if dist.get_rank() == 0:
        try:
            result = action()
        except UserError as error:
            message = [str(error)]
    dist.broadcast_object_list(message, src=0)
    if message[0] is not None:
        raise UserError(message[0])
    return result


def first_to_report() -> bool:
    """Whether this process is the first of torchrun's to end with a message (always, in a plain run).

    A user error one rank alone meets (a file only its machine lacks) must still be printed, and one every rank meets
    printed once. The ranks claim the report in the store torchrun keeps for them (at MASTER_ADDR:MASTER_PORT, which
    outlives any rank), so this works before the process group is joined and after a rank has died. A store out of
    reach reports anyway: a line twice is better than none.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return True
    try:
        store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False, timeout=timedelta(seconds=10))
        return store.add(f"fastsae/reported/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", 1) == 1
    except (KeyError, ValueError, RuntimeError):
        return True


def shares_by_tokens(token_counts: list[int], world_size: int) -> list[list[int]]:
    """Split items (indices into `token_counts`) among ranks so each gets about the same number of tokens.

    Largest first, each to the rank with the fewest tokens so far; each rank's items come back in
    index order. With near-equal items (shards) ranks differ by at most one item.
    """
    shares: list[list[int]] = [[] for _ in range(world_size)]
    loads = [0] * world_size
    for index in sorted(range(len(token_counts)), key=lambda item: (-token_counts[item], item)):
        lightest = min(range(world_size), key=lambda rank: (loads[rank], rank))
        shares[lightest].append(index)
        loads[lightest] += token_counts[index]
    return [sorted(share) for share in shares]
