"""Sharded checkpoints of a parallelized model with torch.distributed.checkpoint (DCP), and their consolidation.

torchtitan `components/checkpoint.py`: the model and optimizer state dicts come from
`torch.distributed.checkpoint.state_dict` (keyed by parameter name, values DTensors of their global shape), so
every process writes only its own shards and a checkpoint loads at any other process count or layout (DCP
reads the pieces each new shard needs), or into an unsharded model in one process. Atomic renaming, keeping
the last K and the trainer state are the trainer's business (`training/checkpointing.py`).

`load_sharded_clip` reads a checkpoint's model sharded over the processes of a new layout (what `mmsoftmoe eval`
under torchrun evaluates, with no whole copy anywhere); `read_sharded_model` reads it whole into one process.
`mmsoftmoe consolidate` verifies the checkpoint against its manifest before DCP reads a byte (DCP itself checks no
content: a shard overwritten in place loads as garbage), and writes its output folder atomically, as export does.
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Iterator
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

from mmsoftmoe.checkpoint import SHARDED_DIR, WEIGHTS_NAMES, CheckpointError, read_json, verify_model_folder
from mmsoftmoe.models.clip import CONFIG_NAME, build_clip_from_config, load_clip, local_text_cfg, save_clip
from mmsoftmoe.parallel.init import init_buffers_
from mmsoftmoe.parallel.mesh import ParallelMeshes, build_meshes, check_layout
from mmsoftmoe.parallel.parallelize import expert_layers, parallelize
from mmsoftmoe.staging import atomic_folder, check_target, remove_stale_siblings


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


def is_sharded_checkpoint(folder: str | Path) -> bool:
    """Whether `folder` is a training checkpoint of a sharded run (`SHARDED_DIR/` and no single-file model)."""
    folder = Path(folder)
    return (folder / SHARDED_DIR).is_dir() and not any((folder / name).is_file() for name in WEIGHTS_NAMES)


def _check_sharded_folder(checkpoint: Path) -> None:
    if not (checkpoint / CONFIG_NAME).is_file() or not (checkpoint / SHARDED_DIR / ".metadata").is_file():
        raise FileNotFoundError(f"{checkpoint} is not a sharded training checkpoint: it needs {CONFIG_NAME} and "
                                f"{SHARDED_DIR}/.metadata; give a folder under <output_dir>/checkpoints/")


@contextlib.contextmanager
def _dcp_errors(sharded: Path) -> Iterator[None]:
    """DCP's failures while reading `sharded` as one CheckpointError naming the folder."""
    try:
        yield
    except (Exception, CheckpointException) as err:  # CheckpointException derives from BaseException
        raise CheckpointError(f"{sharded} cannot be read as a DCP checkpoint (damaged or incomplete: "
                              f"{str(err).splitlines()[0][:200]})") from err


def read_sharded_model(checkpoint: str | Path, *, verify: bool = True, skip_hint: str = "--no-verify"
                       ) -> tuple[nn.Module, object, dict]:
    """The whole CLIP model of a sharded training checkpoint, in this one process (DCP reads every shard).

    Returns:
        (model in eval mode, tokenizer, `open_clip_config.json` content with the model config `local_text_cfg`
        resolved against the checkpoint).
    """
    checkpoint = Path(checkpoint)
    _check_sharded_folder(checkpoint)
    verify_model_folder(checkpoint, verify=verify, skip_hint=skip_hint)
    config = read_json(checkpoint / CONFIG_NAME)
    config = {**config, "model_cfg": local_text_cfg(config["model_cfg"], checkpoint)}
    model, tokenizer = build_clip_from_config(config["model_cfg"])
    state = {"model": model.state_dict()}
    with _dcp_errors(checkpoint / SHARDED_DIR):  # whole, whatever process group there is
        dcp.load(state, checkpoint_id=str(checkpoint / SHARDED_DIR), no_dist=True)
    model.load_state_dict(state["model"])
    open_clip.set_model_preprocess_cfg(model, config["preprocess_cfg"])
    return model.eval(), tokenizer, config


def load_whole_clip(folder: str | Path, *, device: torch.device | str = "cpu", verify: bool = True
                    ) -> tuple[nn.Module, object, dict]:
    """The whole CLIP model of any checkpoint folder, in this process: a sharded run's from its DCP shards
    (`read_sharded_model`), any other by `load_clip`. Returns (model in eval mode on `device`, tokenizer, config)."""
    if not is_sharded_checkpoint(folder):
        return load_clip(folder, device=device, verify=verify)
    model, tokenizer, config = read_sharded_model(folder, verify=verify)
    return model.to(device), tokenizer, config


def load_sharded_clip(checkpoint: str | Path, *, device: torch.device | str, ep: int = 1,
                      param_dtype: torch.dtype | None = None, verify: bool = True, skip_hint: str = "--no-verify"
                      ) -> tuple[nn.Module, object, dict, ParallelMeshes]:
    """The CLIP model of a sharded training checkpoint, sharded over every process of the default process group as
    a run shards it (FSDP2 over all of them, the experts split over `ep`): built on the meta device, each process
    allocates and reads only its own shards (DCP reshards the files to this layout). Call on every process.

    The main process verifies the checkpoint (`verify_before_reading`) and every process raises its verdict.

    Returns:
        (model in eval mode, tokenizer, `open_clip_config.json` content, the meshes it is sharded over).
    """
    checkpoint = Path(checkpoint)
    problem: list[BaseException | None] = [None]
    if dist.get_rank() == 0:
        try:
            _check_sharded_folder(checkpoint)
            verify_model_folder(checkpoint, verify=verify, skip_hint=skip_hint)
        except (CheckpointError, FileNotFoundError) as err:
            problem = [err]
    dist.broadcast_object_list(problem, src=0)
    if problem[0] is not None:
        raise problem[0]
    config = read_json(checkpoint / CONFIG_NAME)
    model, tokenizer = build_clip_from_config(config["model_cfg"], device="meta", folder=checkpoint)
    world = dist.get_world_size()
    check_layout(world_size=world, dp_replicate=1, dp_shard=world, ep=ep,
                 num_experts=tuple(layer.num_experts for layer in expert_layers(model).values()))
    meshes = build_meshes(device_type=torch.device(device).type, dp_replicate=1, dp_shard=world, ep=ep)
    parallelize(model, meshes, param_dtype=param_dtype)
    model.to_empty(device=device)
    init_buffers_(model)  # the buffers no state dict holds (open_clip's causal mask, an HF tower's ids)
    with _dcp_errors(checkpoint / SHARDED_DIR):
        load_sharded(checkpoint / SHARDED_DIR, model)
    open_clip.set_model_preprocess_cfg(model, config["preprocess_cfg"])
    return model.eval(), tokenizer, config, meshes


def consolidate(checkpoint: str | Path, out: str | Path, *, verify: bool = True, overwrite: bool = False) -> Path:
    """Turn a training checkpoint folder with a sharded state (`SHARDED_DIR`) into the single-file model folder
    that `mmsoftmoe eval` and `mmsoftmoe export` read (open_clip `local-dir:` layout); runs in one process.

    The checkpoint is verified against its manifest first (`verify`); `out` is written atomically and an existing
    one is replaced only with `overwrite`.
    """
    checkpoint, out = Path(checkpoint), Path(out)
    _check_sharded_folder(checkpoint)
    remove_stale_siblings(out)
    check_target(out, overwrite)  # before the costly part
    model, _, config = read_sharded_model(checkpoint, verify=verify)
    with atomic_folder(out, overwrite) as tmp:
        save_clip(model, config["model_cfg"], tmp)
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
