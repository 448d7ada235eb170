"""Sharded checkpoints of a parallelized model with torch.distributed.checkpoint (DCP), and their consolidation.

torchtitan `components/checkpoint.py`: the model and optimizer state dicts come from
`torch.distributed.checkpoint.state_dict` (keyed by parameter name, values DTensors of their global shape), so
every process writes only its own shards and a checkpoint loads at any other process count or layout (DCP
reads the pieces each new shard needs), or into an unsharded model in one process. Atomic renaming, keeping
the last K and the trainer state are the trainer's business (`training/checkpointing.py`).

`mmsoftmoe consolidate` verifies the checkpoint against its manifest before DCP reads a byte (DCP itself checks no
content: a shard overwritten in place loads as garbage), and writes its output folder atomically, as export does.
"""

from __future__ import annotations

import argparse
from concurrent.futures import Future
from pathlib import Path

import open_clip
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from mmsoftmoe.checkpoint import SHARDED_DIR, CheckpointError, read_json, verify_before_reading
from mmsoftmoe.export.staging import atomic_folder, check_target, remove_stale_siblings
from mmsoftmoe.models.clip import CONFIG_NAME, build_clip_from_config, local_text_cfg, save_clip


def _state(model: nn.Module, optimizer: torch.optim.Optimizer | None) -> dict:
    state = {"model": get_model_state_dict(model)}
    if optimizer is not None:
        state["optimizer"] = get_optimizer_state_dict(model, optimizer)
    return state


def save_sharded(path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> None:
    """Write the model (and optimizer) state as a DCP checkpoint folder (call on every process)."""
    dcp.save(_state(model, optimizer), checkpoint_id=str(path), no_dist=not dist.is_initialized())


def save_sharded_async(path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer | None,
                       process_group: dist.ProcessGroup | None) -> Future:
    """Stage the model (and optimizer) state to host memory now and write it as a DCP checkpoint folder in a
    background thread (call on every process); the future completes on each process once every process's shards
    and the metadata are written. `process_group`: a group used by these saves only (a gloo group), since the
    background thread's collectives must not interleave with training's on the default group."""
    return dcp.async_save(_state(model, optimizer), checkpoint_id=str(path), process_group=process_group,
                          no_dist=not dist.is_initialized())


def load_sharded(path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> None:
    """Restore a DCP checkpoint into `model` (and `optimizer`) as laid out now: any process count or layout,
    or one process without a process group (call on every process)."""
    state = _state(model, optimizer)
    dcp.load(state, checkpoint_id=str(path), no_dist=not dist.is_initialized())
    set_model_state_dict(model, state["model"])
    if optimizer is not None:
        set_optimizer_state_dict(model, optimizer, state["optimizer"])


def full_model_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole model's weights as plain CPU tensors on rank 0 (empty on the others); call on every process.

    Parameters FSDP2 leaves whole (the 0-d ones) come back as the parameters themselves: clone before training on.
    """
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def consolidate(checkpoint: str | Path, out: str | Path, *, verify: bool = True, overwrite: bool = False) -> Path:
    """Turn a training checkpoint folder with a sharded state (`SHARDED_DIR`) into the single-file model folder
    that `mmsoftmoe eval` and `mmsoftmoe export` read (open_clip `local-dir:` layout); runs in one process.

    The checkpoint is verified against its manifest first (`verify`); `out` is written atomically and an existing
    one is replaced only with `overwrite`.
    """
    checkpoint, out = Path(checkpoint), Path(out)
    config_path, sharded = checkpoint / CONFIG_NAME, checkpoint / SHARDED_DIR
    if not config_path.is_file() or not (sharded / ".metadata").is_file():
        raise FileNotFoundError(f"{checkpoint} is not a sharded training checkpoint: it needs {CONFIG_NAME} and "
                                f"{SHARDED_DIR}/.metadata; give a folder under <output_dir>/checkpoints/")
    remove_stale_siblings(out)
    check_target(out, overwrite)  # before the costly part
    verify_before_reading(checkpoint, verify=verify)
    config = read_json(config_path)
    model_cfg = local_text_cfg(config["model_cfg"], checkpoint)  # an HF text tower's files travel to `out` too
    model, _ = build_clip_from_config(model_cfg)
    state = {"model": model.state_dict()}
    try:
        dcp.load(state, checkpoint_id=str(sharded), no_dist=True)
    except (Exception, CheckpointException) as err:  # CheckpointException derives from BaseException
        raise CheckpointError(f"{sharded} cannot be read as a DCP checkpoint (damaged or incomplete: "
                              f"{str(err).splitlines()[0][:200]}); consolidate an intact checkpoint") from err
    model.load_state_dict(state["model"])
    open_clip.set_model_preprocess_cfg(model, config["preprocess_cfg"])
    with atomic_folder(out, overwrite) as tmp:
        save_clip(model, model_cfg, tmp)
    return out


def main(argv: list[str] | None = None) -> int:
    """`mmsoftmoe consolidate CHECKPOINT OUT [--overwrite] [--no-verify]`."""
    parser = argparse.ArgumentParser(prog="mmsoftmoe consolidate", description=consolidate.__doc__.split(";")[0])
    parser.add_argument("checkpoint", help="a checkpoint folder of a sharded run (<output_dir>/checkpoints/step_*)")
    parser.add_argument("out", help="the model folder to write (refused if it exists, unless --overwrite)")
    parser.add_argument("--overwrite", action="store_true", help="replace OUT once the new folder is complete")
    parser.add_argument("--no-verify", dest="verify", action="store_false",
                        help="read a checkpoint that has no manifest.json (or fails it) without verifying it")
    args = parser.parse_args(argv)
    print(consolidate(args.checkpoint, args.out, verify=args.verify, overwrite=args.overwrite))
    return 0
