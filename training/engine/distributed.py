"""``torchrun`` environment, device choice and barriers (gloo on CPU, NCCL on CUDA)."""
from __future__ import annotations

import datetime
import os
from typing import Tuple

import torch
import torch.distributed as dist


def distributed_env() -> Tuple[int, int, int]:
    """(rank, world size, local rank) from the ``torchrun`` environment (0, 1, 0 without it)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    return rank, world, local


def pick_device(choice: str, local_rank: int) -> torch.device:
    if choice == "cuda" or (choice == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise RuntimeError("train.device: 'cuda' requested but no CUDA device is available")
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def init_process_group(world_size: int, device: torch.device) -> None:
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=10))


def barrier(world_size: int) -> None:
    if world_size > 1 and dist.is_initialized():
        dist.barrier()


def destroy(world_size: int) -> None:
    if world_size > 1 and dist.is_initialized():
        dist.destroy_process_group()


def broadcast_buffers(model: torch.nn.Module, world_size: int) -> None:
    """Every rank's buffers (BatchNorm running statistics ...) <- rank 0's, as DDP does before each
    training forward; an eval-mode pass between steps needs it, since each rank's last training
    forward updated its own statistics."""
    if world_size > 1 and dist.is_initialized():
        for buffer in model.buffers():
            dist.broadcast(buffer.data, 0)


def shard(count: int, rank: int, world_size: int) -> Tuple[int, int]:
    """[start, stop) of ``rank``'s contiguous share of ``count`` items."""
    per = -(-count // world_size)
    return min(rank * per, count), min((rank + 1) * per, count)


def gather_rows(rows: torch.Tensor, count: int, world_size: int) -> torch.Tensor:
    """The ranks' :func:`shard` results, concatenated in rank order: the (count, ...) whole."""
    if world_size == 1 or not dist.is_initialized():
        return rows
    per = -(-count // world_size)
    padded = rows.new_zeros((per, *rows.shape[1:]))
    padded[: rows.shape[0]] = rows
    parts = [torch.empty_like(padded) for _ in range(world_size)]
    dist.all_gather(parts, padded.contiguous())
    return torch.cat(parts)[:count]


def gather_objects(obj, world_size: int) -> list:
    """``[rank 0's obj, rank 1's, ...]`` on every rank (``[obj]`` without DDP)."""
    if world_size == 1 or not dist.is_initialized():
        return [obj]
    out = [None] * world_size
    dist.all_gather_object(out, obj)
    return out


def wrap(model: torch.nn.Module, world_size: int, device: torch.device, local_rank: int) -> torch.nn.Module:
    """DDP without unused-parameter search: every recipe uses all its parameters in each step
    (a recipe's own head replaces the backbone's BNNeck and runs inside the forward)."""
    if world_size == 1:
        return model
    return torch.nn.parallel.DistributedDataParallel(
        model, device_ids=[local_rank] if device.type == "cuda" else None)
