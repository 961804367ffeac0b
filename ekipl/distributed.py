"""Joining the process group: DeepSpeed's launcher sets RANK, WORLD_SIZE and the rendezvous address; a run
without it (``python ekipl/train.py``, an in-process test) is a world of one. CPU ranks use DeepSpeed's CPU
accelerator with gloo, GPU ranks NCCL on their local device."""

from __future__ import annotations

import os
import socket

import torch


def prepare_environment() -> torch.device:
    """Fills in what the launcher did not set (the launcher's values win) and returns this rank's device."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1")):
        os.environ.setdefault(key, value)
    if "MASTER_PORT" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(s.getsockname()[1])
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        return torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return torch.device("cpu")


def join_process_group() -> torch.device:
    """:func:`prepare_environment`, then DeepSpeed's process group; returns this rank's device."""
    import deepspeed

    device = prepare_environment()
    deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo")
    return device
