"""What a worker says about itself: its default name, its system information, and its per-round seed."""

from __future__ import annotations

import hashlib
import os
import platform
import socket

import torch

from utils import device_description


def default_name(partition_id: int | None) -> str:
    """The host name and the partition id (or the process id): unique for workers of one host."""
    host = socket.gethostname()
    return f"{host}-p{partition_id}" if partition_id is not None else f"{host}-{os.getpid()}"


def system_info(device: torch.device) -> dict:
    """The host, platform, Python and torch versions, training device and core count, for monitors."""
    return {"hostname": socket.gethostname(), "platform": platform.platform(), "python": platform.python_version(),
            "torch": torch.__version__, "device": device_description(device), "cpu_count": os.cpu_count()}


def shuffle_seed(seed: int, round_number: int, name: str) -> int:
    """The seed of a node's shuffling and dropout in a round: from (run seed, round, node name), 63 bits."""
    digest = hashlib.sha256(f"{seed}/{round_number}/{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & 0x7FFF_FFFF_FFFF_FFFF
