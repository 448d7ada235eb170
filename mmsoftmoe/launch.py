"""The `accelerate.Accelerator` every command builds: told to use the CPU where no accelerator device exists, and
checked to see every process a launcher started.

Without a device, accelerate must be told `cpu=True`, or under `torchrun` it sees one process and every rank runs the
whole job alone (docs/design.md, section 7); `CUDA_VISIBLE_DEVICES` naming fewer devices than processes does the same.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from accelerate import Accelerator


def launched_accelerator(**kwargs: Any) -> Accelerator:
    """`Accelerator(**kwargs)` on the device there is, refusing to run as several independent copies of one job.

    Raises:
        RuntimeError: `WORLD_SIZE` (set by torchrun, `accelerate launch`) differs from the processes accelerate sees.
    """
    accelerator = Accelerator(cpu=not torch.accelerator.is_available(), **kwargs)
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched != accelerator.num_processes:
        raise RuntimeError(f"WORLD_SIZE={launched} processes were launched, but accelerate sees "
                           f"{accelerator.num_processes}: every process would run alone. Launch with torchrun or "
                           "`accelerate launch` and do not set CUDA_VISIBLE_DEVICES to fewer devices than processes")
    return accelerator
