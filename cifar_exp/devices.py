"""Device choice, DataParallel/DDP wrapping and unwrapping.

DataParallel: one process drives several GPUs (one command, simplest). DDP (`device=ddp` under
`torchrun`): one process per GPU or CPU slot, each on its own shard of the data; PyTorch
recommends it for speed, and it is the only way to use several machines."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
import torch.distributed as dist
from filelock import BaseFileLock, FileLock, Timeout
from torch import nn

from cifar_exp.config import DeviceConfig
from cifar_exp.errors import UserError

# Below this batch size a step is mostly per-op overhead, and waking a second thread for each
# tiny op costs more than it saves (measured on 2 cores: batch 4 runs ~2x faster on 1 thread).
SMALL_BATCH = 32
# The GPU locks this worker process holds (claim_gpu) until it exits: a FileLock that is dropped unlocks.
HELD_GPU_LOCKS: list[BaseFileLock] = []


def select_device(cfg: DeviceConfig, batch_size: int) -> torch.device:
    """auto: CUDA when a GPU is visible, else CPU. On CPU also sets torch's thread count:
    `threads`, or with threads=0 one thread for small batches and torch's default otherwise."""
    if cfg.name == "ddp":
        return _init_distributed(cfg)
    if cfg.name == "cuda" and not torch.cuda.is_available():
        raise UserError("device=cuda but no CUDA GPU is visible here; use device=cpu or device=auto")
    if cfg.name != "cpu" and torch.cuda.is_available():
        return torch.device("cuda")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    elif batch_size < SMALL_BATCH:
        torch.set_num_threads(1)
    return torch.device("cpu")


def cudnn_autotune(device: torch.device, fixed_shapes: bool) -> bool:
    """Whether to set torch.backends.cudnn.benchmark: cuDNN then times its convolution algorithms
    on the first batch of each new shape and keeps the fastest. That pays on CUDA when every
    training batch has one shape (trainer.drop_last); with a smaller last batch it would time
    that shape too, and on CPU the flag does nothing."""
    return device.type == "cuda" and fixed_shapes


def _init_distributed(cfg: DeviceConfig) -> torch.device:
    """Joins the process group torchrun set up: NCCL on GPUs (one per local rank), gloo on CPU."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        raise UserError("device=ddp needs torchrun: torchrun --nproc_per_node=N -m cifar_exp device=ddp ...")
    cuda = torch.cuda.is_available()
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    if cuda:
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    return torch.device("cpu")


def distributed() -> tuple[int, int]:
    """(rank, world size): (0, 1) outside DDP."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def wrap_model(model: nn.Module, device: torch.device, data_parallel: bool) -> tuple[nn.Module, int]:
    """Moves the model to `device`; under DDP wraps it in DistributedDataParallel; with several
    GPUs visible and `data_parallel`, in DataParallel. Returns the model to train and the number
    of GPUs it uses (0 on CPU; under DDP, the GPUs of all processes)."""
    model = model.to(device)
    if dist.is_available() and dist.is_initialized():
        cuda = device.type == "cuda"
        ddp = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if cuda else None)
        return ddp, dist.get_world_size() if cuda else 0
    if device.type != "cuda":
        return model, 0
    gpus = torch.cuda.device_count()
    if data_parallel and gpus > 1:
        return nn.DataParallel(model), gpus
    return model, 1


def claim_gpu(job_num: int, lock_dir: Path) -> int | None:
    """For a job of a parallel sweep (Hydra's joblib launcher runs jobs in worker processes that
    later jobs reuse): gives this process one GPU of its own, by narrowing CUDA_VISIBLE_DEVICES
    before anything touches CUDA, so parallel jobs spread over the GPUs, one job per GPU at a time.
    A lock file per GPU in `lock_dir`, held until the worker exits, keeps two workers off one GPU;
    job N tries GPU N mod count first. Keep hydra.launcher.n_jobs at most the GPU count: further
    workers share a GPU (a warning says so). Returns the claimed index among the visible GPUs, or
    None and changes nothing: on CPU, with one GPU, or once CUDA is in use (a reused worker keeps
    its GPU)."""
    if torch.cuda.is_initialized():
        return None
    count = torch.cuda.device_count()  # asks NVML, so CUDA is not initialised yet
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    ids = visible.split(",")[:count] if visible else [str(i) for i in range(count)]
    count = len(ids)
    if count < 2:
        return None
    lock_dir.mkdir(parents=True, exist_ok=True)
    preferred = job_num % count
    for index in [(preferred + k) % count for k in range(count)]:
        lock = FileLock(lock_dir / f"gpu-{ids[index].replace('/', '_')}.lock", thread_local=False)
        try:
            lock.acquire(blocking=False)
        except Timeout:
            continue
        HELD_GPU_LOCKS.append(lock)  # this worker holds the GPU until it exits
        break
    else:
        index = preferred
        logging.getLogger(__name__).warning(
            f"job {job_num}: each of the {count} GPUs already has a job; sharing GPU {ids[index]} "
            f"(set hydra.launcher.n_jobs to at most {count})"
        )
    os.environ["CUDA_VISIBLE_DEVICES"] = ids[index]
    return index


def unwrap_model(model: nn.Module) -> nn.Module:
    """The plain model inside DataParallel/DDP/torch.compile, so saved weights carry no prefix."""
    while True:
        if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod"):  # torch.compile's OptimizedModule
            model = model._orig_mod
        else:
            return model
