"""Process-group helpers: one code path for single-process, torchrun DDP on GPU (NCCL) and CPU (gloo).

Every function is a no-op or returns the single-process answer when no process group exists.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

__all__ = [
    "is_distributed",
    "rank",
    "world_size",
    "is_main",
    "local_device",
    "init_process_group",
    "destroy_process_group",
    "wrap",
    "unwrap",
    "barrier",
    "default_num_workers",
]


def is_distributed() -> bool:
    """True inside an initialised process group."""
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """Global rank (0 without a process group)."""
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    """Number of processes (1 without a process group)."""
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    """Only rank 0 writes files."""
    return rank() == 0


def local_device() -> torch.device:
    """``cuda:LOCAL_RANK`` when CUDA is present, else CPU."""
    if torch.cuda.is_available():
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count())
        torch.cuda.set_device(dev)
        return dev
    return torch.device("cpu")


def init_process_group(backend: str | None = None) -> bool:
    """Initialises the process group from torchrun's environment (NCCL on GPU, gloo on CPU).

    Args:
        backend: force a backend; default NCCL when CUDA is present, gloo otherwise.

    Returns:
        True when a group was (or already is) initialised, False when not launched by torchrun.
    """
    if is_distributed():
        return True
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return False
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if backend == "nccl":
        local_device()
    dist.init_process_group(backend=backend)
    return True


def destroy_process_group() -> None:
    """Tears the process group down (no-op without one)."""
    if is_distributed():
        dist.barrier()
        dist.destroy_process_group()


def barrier() -> None:
    """Synchronises ranks (no-op without a process group)."""
    if is_distributed():
        dist.barrier()


def broadcast(tensor: torch.Tensor, src: int = 0) -> None:
    """Rank ``src``'s ``tensor`` on every rank (in place; nothing to do in a single process)."""
    if is_distributed():
        dist.broadcast(tensor, src)


def wrap(network: torch.nn.Module, device: torch.device | str | None = None) -> torch.nn.Module:
    """``DistributedDataParallel`` around ``network`` inside a process group, else ``network``.

    Call after freezing: DDP only synchronises parameters that require grad.

    Args:
        network: the model (already on ``device``).
        device: its device.
    """
    if not is_distributed():
        return network
    dev = torch.device(device) if device is not None else next(network.parameters()).device
    ids = [dev] if dev.type == "cuda" else None
    # residual levels: a step decodes a random prefix and runs no level before the k-means of the
    # ones above it, so some levels' parameters get no gradient that step
    unused = int(getattr(network, "vq_depth", 1)) > 1
    return torch.nn.parallel.DistributedDataParallel(network, device_ids=ids, find_unused_parameters=unused)


def unwrap(network: torch.nn.Module) -> torch.nn.Module:
    """The plain module inside DDP / DataParallel wrappers."""
    while hasattr(network, "module") and isinstance(
        network, (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)
    ):
        network = network.module
    return network


def default_num_workers(cap: int = 8) -> int:
    """DataLoader workers per process: the CPUs this process may use, shared by the processes of the node,
    at most ``cap`` (2 on a 2-core machine, where more would make the DataLoader warn). On an H200 host
    4 workers made 27 crops/s of the shipped size, barely the 23 that training takes, 8 made 52
    (bench/README.md)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return max(0, min(int(cap), cpus // max(1, local)))
