"""The trainer's checkpoints: written atomically and durably, verified before resume, the last K kept.

A checkpoint `output_dir/checkpoints/step_XXXXXXXX/` is the folder `mmsoftmoe.checkpoint` describes: accelerate's
state (model, optimizer, per-process RNG; loaded with `weights_only=True`), `open_clip_config.json` (so `load_clip`,
`mmsoftmoe eval` and `mmsoftmoe export` read it), `trainer_state.json` and, written last, `manifest.json`.
`output_dir/final/` (the single-file model) is written the same way, and rewritten the same way when the final
evaluation's metrics are added to its `trainer_state.json` (`record_final_metrics`).

The save sequence, each step safe to be killed at:
1. every process writes into the hidden folder `.tmp_<name>` (accelerate's `save_state`; a sharded run writes
   its DCP shards to `sharded/` and each process its random state instead), then the main process adds the config
   and trainer state;
2. the manifest hashes and flushes every file, then itself and the folders (`mmsoftmoe.checkpoint.write_manifest`),
   so a power loss after the rename cannot leave a renamed but empty checkpoint;
3. an existing folder of the same name (the same step saved again) is moved aside to `.replaced_<name>`;
4. the rename into place, then a flush of the parent folder;
5. the replaced folder and checkpoints beyond the last K are renamed `.pruned_<name>` (so a half-deleted one is
   never listed) and deleted.
A killed save leaves only hidden folders; `remove_unfinished_saves` (at the start of the next run, under the run
lock) deletes them, putting back a `.replaced_<name>` whose successor never arrived. A failed save removes its
temporary folder itself; a full disk becomes one `DiskFullError` saying how much space the checkpoint needs.

`find_resume_checkpoint` verifies sizes and hashes: `resume=auto` takes the newest checkpoint that verifies and
logs each one it skips and why; an explicit `resume=PATH` that fails is an error. A run calls it through
`choose_resume_checkpoint`: the main process cleans up, verifies and chooses, the others follow its choice.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import shutil
from collections.abc import Iterator
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException

from mmsoftmoe.atomic import publish_folder
from mmsoftmoe.checkpoint import (
    MANIFEST_NAME,
    SHARDED_DIR,
    TRAINER_STATE_NAME,
    CheckpointError,
    fsync_dir,
    has_manifest,
    read_clip_weights,
    read_json,
    verify_before_reading,
    verify_checkpoint,
    write_manifest,
)
from mmsoftmoe.models.clip import save_clip, write_clip_config
from mmsoftmoe.parallel import load_sharded, save_sharded, save_sharded_async

logger = logging.getLogger("mmsoftmoe.train")

CHECKPOINTS_DIR = "checkpoints"
RNG_STATE_NAME = "rng_state_{rank}.pt"  # a sharded run's per-process random state (accelerate's own otherwise)
FINAL_DIR = "final"
TMP_PREFIX, REPLACED_PREFIX, PRUNED_PREFIX = ".tmp_", ".replaced_", ".pruned_"
DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
# How torch's and safetensors' writers report a failed write (they do not keep the OSError).
DISK_FULL_TEXT = ("No space left on device", "File too large", "Disk quota exceeded", "PytorchStreamWriter failed",
                  "unexpected pos")


class DiskFullError(CheckpointError):
    """A save that ran out of disk space (the device holding the output folder is full, or a quota or file-size
    limit was hit); its temporary folder is removed and the previous checkpoint kept."""


def checkpoint_root(output_dir: str | Path) -> Path:
    return Path(output_dir) / CHECKPOINTS_DIR


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """The checkpoint folders (`step_*`, verified or not), oldest first."""
    return sorted(p for p in checkpoint_root(output_dir).glob("step_*") if p.is_dir())


def remove_unfinished_saves(output_dir: str | Path) -> list[Path]:
    """Delete what killed saves left under `output_dir` (hidden `.tmp_*` / `.pruned_*` folders), putting back a
    `.replaced_*` checkpoint that was moved aside for a save that never finished; returns the deleted folders.
    Call on the main process only, while holding the run lock (another run's save would look unfinished)."""
    removed = []
    for parent, pattern in ((Path(output_dir), FINAL_DIR), (checkpoint_root(output_dir), "step_*")):
        for prefix in (TMP_PREFIX, REPLACED_PREFIX, PRUNED_PREFIX):
            for folder in sorted(p for p in parent.glob(prefix + pattern) if p.is_dir()):
                original = parent / folder.name[len(prefix):]
                if prefix == REPLACED_PREFIX and not original.exists():
                    folder.rename(original)
                    logger.warning("put back %s, moved aside by a save that was killed before replacing it", original)
                    continue
                shutil.rmtree(folder)
                logger.warning("removed %s, left by a save that was killed", folder)
                removed.append(folder)
    return removed


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def is_disk_full(err: BaseException) -> bool:
    """Whether `err` (or an error it wraps) is a write that failed for lack of space or a size limit."""
    while err is not None:
        if isinstance(err, OSError) and err.errno in DISK_FULL_ERRNOS:
            return True
        if isinstance(err, CheckpointException) and any(is_disk_full(e) for e, _ in err.failures.values()):
            return True
        if any(text in str(err) for text in DISK_FULL_TEXT):
            return True
        err = err.__cause__ or err.__context__
    return False


def _kept(output_dir: Path) -> str:
    kept = [p.name for p in list_checkpoints(output_dir)]  # a failed save never touches a published folder
    return f"the previous checkpoint {kept[-1]} is intact" if kept else "no earlier checkpoint exists"


def _disk_full_error(output_dir: Path, target: Path, needed: int) -> DiskFullError:
    free = shutil.disk_usage(output_dir).free
    return DiskFullError(
        f"no space left on the device holding {output_dir} (needs ~{needed / 2**20:.0f} MB, "
        f"{free / 2**20:.0f} MB free): {target.name} was not written and its temporary folder was removed; "
        f"{_kept(output_dir)}. Free some space (or lower keep_checkpoints) and run again with resume=auto")


def _sharded_write_error(output_dir: Path, target: Path, err: CheckpointException) -> CheckpointError:
    """A DCP save that failed on some rank for another reason than space, named with that rank's error."""
    rank, (first, _) = next(iter(err.failures.items()))
    return CheckpointError(f"writing the sharded checkpoint {target.name} failed on rank {rank} "
                           f"({type(first).__name__}: {first}); its temporary folder was removed and "
                           f"{_kept(output_dir)}. Fix the cause and run again with resume=auto")


@contextlib.contextmanager
def _staged(target: Path, output_dir: Path, needed: int, main_process: bool) -> Iterator[Path]:
    """Yield `.tmp_<name>` beside `target`; on error the main process removes it (a full disk becomes a
    `DiskFullError`, another failed DCP write a `CheckpointError`, on every rank); the caller publishes it."""
    tmp = target.parent / f"{TMP_PREFIX}{target.name}"
    try:
        yield tmp
    except (Exception, CheckpointException) as err:  # DCP's CheckpointException derives from BaseException
        if main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        if is_disk_full(err):
            raise _disk_full_error(output_dir, target, needed) from err
        if isinstance(err, CheckpointException):
            raise _sharded_write_error(output_dir, target, err) from err
        raise


def _discard(folder: Path) -> None:
    """Delete a published folder: renamed to `.pruned_<name>` first, so a half-deleted one is never listed."""
    pruned = folder.with_name(f"{PRUNED_PREFIX}{folder.name}")
    folder.rename(pruned)
    fsync_dir(folder.parent)
    shutil.rmtree(pruned)


def _publish(tmp: Path, target: Path) -> None:
    """Rename the complete `tmp` to `target` durably, replacing an existing `target` only once `tmp` is in place."""
    # `.replaced_<name>` is hidden: if a kill leaves it, `remove_unfinished_saves` deletes (or puts back) it.
    publish_folder(tmp, target, aside=target.with_name(f"{REPLACED_PREFIX}{target.name}"))


def _state_bytes(model: nn.Module) -> int:
    """A checkpoint's size before the first one exists: the weights and AdamW's two moments."""
    return 3 * sum(t.numel() * t.element_size() for t in model.state_dict().values())


def _save_rng_state(folder: Path, rank: int, device: torch.device) -> None:
    state = {"cpu": torch.get_rng_state()}
    if device.type != "cpu":
        state["device"] = torch.get_device_module(device).get_rng_state(device)
    torch.save(state, folder / RNG_STATE_NAME.format(rank=rank))


def _load_rng_state(folder: Path, accelerator: Accelerator) -> None:
    """This process's random state, when the checkpoint was saved by as many processes (else the streams restart
    from the run's seed: the data order is step-exact either way, only noise/dropout draws differ)."""
    saved = len(list(folder.glob(RNG_STATE_NAME.format(rank="*"))))
    if saved != accelerator.num_processes:
        if accelerator.is_main_process:
            logger.warning("%s was saved by %d processes and this run has %d: the data order resumes exactly, the "
                           "random streams (router noise, dropout) restart", folder, saved, accelerator.num_processes)
        return
    state = torch.load(folder / RNG_STATE_NAME.format(rank=accelerator.process_index), weights_only=True)
    torch.set_rng_state(state["cpu"])
    if "device" in state and accelerator.device.type != "cpu":
        torch.get_device_module(accelerator.device).set_rng_state(state["device"], accelerator.device)


def save_checkpoint(accelerator: Accelerator, model: nn.Module, output_dir: str | Path, *, step: int,
                    trainer_state: dict, model_cfg: dict, keep: int,
                    sharded_optimizer: torch.optim.Optimizer | None = None) -> Path:
    """Save the full training state at `step` (call on every process) and prune to the newest `keep`.

    `sharded_optimizer`: a sharded run's optimizer (`mmsoftmoe.parallel`); the model and it are then written as
    DCP shards, not through accelerate.
    """
    output_dir = Path(output_dir)
    target, needed = _checkpoint_target(accelerator, model, output_dir, step)
    with _staged(target, output_dir, needed, accelerator.is_main_process) as tmp:
        if sharded_optimizer is None:
            accelerator.save_state(str(tmp), safe_serialization=True)
        else:
            save_sharded(tmp / SHARDED_DIR, model, sharded_optimizer)
            _save_rng_state(tmp, accelerator.process_index, accelerator.device)
        accelerator.wait_for_everyone()  # every process's files are in `tmp` before the manifest lists them
        if accelerator.is_main_process:
            _write_run_files(tmp, accelerator.unwrap_model(model), model_cfg, trainer_state)
            write_manifest(tmp)
    if accelerator.is_main_process:
        _publish_checkpoint(tmp, target, output_dir, keep)
    accelerator.wait_for_everyone()
    return target


@dataclass
class PendingCheckpoint:
    """A sharded checkpoint whose shards are being written in the background (`start_checkpoint`)."""

    target: Path
    output_dir: Path
    needed: int
    keep: int
    main_process: bool
    future: Future

    def done(self) -> bool:
        return self.future.done()


def start_checkpoint(accelerator: Accelerator, model: nn.Module, output_dir: str | Path, *, step: int,
                     trainer_state: dict, model_cfg: dict, keep: int, sharded_optimizer: torch.optim.Optimizer,
                     process_group: dist.ProcessGroup | None) -> PendingCheckpoint:
    """Begin saving a sharded run's state at `step` (call on every process): the state is staged to host memory
    before this returns, so training may change it; the shards are written in the background into the hidden
    `.tmp_<name>` folder. `finish_checkpoint` waits for them and publishes the folder, so a run killed meanwhile
    leaves the previous checkpoint as the newest one."""
    output_dir = Path(output_dir)
    target, needed = _checkpoint_target(accelerator, model, output_dir, step)
    with _staged(target, output_dir, needed, accelerator.is_main_process) as tmp:
        (tmp / SHARDED_DIR).mkdir(parents=True, exist_ok=True)
        # Before the shards: the main process publishes once every process's shards are written, so this file
        # must already be there.
        _save_rng_state(tmp, accelerator.process_index, accelerator.device)
        if accelerator.is_main_process:
            _write_run_files(tmp, model, model_cfg, trainer_state)
        future = save_sharded_async(tmp / SHARDED_DIR, model, sharded_optimizer, process_group)
    return PendingCheckpoint(target, output_dir, needed, keep, accelerator.is_main_process, future)


def finish_checkpoint(pending: PendingCheckpoint) -> Path:
    """Wait for a background save's shards (every process, no collective: DCP completes a process's save only after
    every process's shards and the metadata are written), then, on the main process, write the manifest, publish
    the folder and prune, as `save_checkpoint` does."""
    with _staged(pending.target, pending.output_dir, pending.needed, pending.main_process) as tmp:
        pending.future.result()
        if pending.main_process:
            write_manifest(tmp)
    if pending.main_process:
        _publish_checkpoint(tmp, pending.target, pending.output_dir, pending.keep)
    return pending.target


def _checkpoint_target(accelerator: Accelerator, model: nn.Module, output_dir: Path, step: int) -> tuple[Path, int]:
    """The folder of the checkpoint at `step`, and the bytes it will need (for the message of a full disk)."""
    previous = list_checkpoints(output_dir)
    needed = _folder_bytes(previous[-1]) if previous else _state_bytes(accelerator.unwrap_model(model))
    return checkpoint_root(output_dir) / f"step_{step:08d}", needed


def _write_run_files(tmp: Path, model: nn.Module, model_cfg: dict, trainer_state: dict) -> None:
    """The files the main process adds to a checkpoint: the open_clip config and the trainer state."""
    write_clip_config(model, model_cfg, tmp)
    (tmp / TRAINER_STATE_NAME).write_text(json.dumps(trainer_state, indent=2))


def _publish_checkpoint(tmp: Path, target: Path, output_dir: Path, keep: int) -> None:
    _publish(tmp, target)
    for old in list_checkpoints(output_dir)[:-keep]:
        _discard(old)


def save_final_model(model: nn.Module, model_cfg: dict, output_dir: str | Path, trainer_state: dict) -> Path:
    """Write `output_dir/final/` (open_clip folder, `trainer_state.json`, manifest) atomically; main process only."""
    output_dir = Path(output_dir)
    target = output_dir / FINAL_DIR
    with _staged(target, output_dir, _state_bytes(model) // 3, main_process=True) as tmp:
        tmp.mkdir(parents=True)
        (tmp / TRAINER_STATE_NAME).write_text(json.dumps(trainer_state, indent=2))
        save_clip(model, model_cfg, tmp)  # its manifest lists the trainer state too
    _publish(tmp, target)
    return target


def record_final_metrics(output_dir: str | Path, trainer_state: dict) -> Path:
    """Rewrite `final/trainer_state.json` with the final evaluation's metrics, as atomically as `final/` itself
    was written: a copy whose other files are hard links to final/'s (no bytes copied), the new state and a new
    manifest, published in place of final/. Main process only."""
    output_dir = Path(output_dir)
    target = output_dir / FINAL_DIR
    with _staged(target, output_dir, 1 << 20, main_process=True) as tmp:
        tmp.mkdir()
        for path in target.iterdir():
            if path.is_file() and path.name not in (TRAINER_STATE_NAME, MANIFEST_NAME):
                try:
                    os.link(path, tmp / path.name)
                except OSError:  # a file system without hard links: copy the bytes instead
                    shutil.copy2(path, tmp / path.name)
        (tmp / TRAINER_STATE_NAME).write_text(json.dumps(trainer_state, indent=2))
        write_manifest(tmp)
    _publish(tmp, target)
    return target


def _verified(folder: Path) -> str | None:
    """None if `folder` is a complete checkpoint (manifest, sizes and hashes), else why not."""
    if not has_manifest(folder):
        return "no manifest.json (a save that did not finish, or an older mmsoftmoe: pass resume=PATH to use it)"
    try:
        verify_checkpoint(folder, hashes=True)
    except CheckpointError as err:
        return str(err)
    return None


def find_resume_checkpoint(resume: str, output_dir: str | Path, verify: bool = True) -> Path | None:
    """The checkpoint to resume from: `none`; `auto` = the newest that verifies (None if there is none at all);
    or a given folder, which must verify unless `verify` is off (`verify_checkpoints=false`).

    Raises:
        CheckpointError: `auto` found checkpoints but none verifies, or the given folder does not verify.
    """
    if resume == "none":
        return None
    if resume != "auto":
        return _explicit_checkpoint(Path(resume), verify)
    found = list_checkpoints(output_dir)
    for folder in reversed(found):
        problem = _verified(folder)
        if problem is None:
            return folder
        logger.warning("resume=auto: skipping %s: %s", folder, problem)
    if found:
        raise CheckpointError(f"resume=auto: none of the {len(found)} checkpoints in {checkpoint_root(output_dir)} "
                              "verifies (see the warnings above); pass resume=PATH to one of them, or resume=none "
                              "with a new output_dir to start over")
    return None


def choose_resume_checkpoint(accelerator: Accelerator, resume: str, output_dir: str | Path,
                             verify: bool = True) -> Path | None:
    """`find_resume_checkpoint` on the main process, after `remove_unfinished_saves`, its choice sent to every
    process (call on every process, while the main one holds the run lock): the checkpoint is read and hashed
    once, and all processes resume from the same one."""
    choice = [None]
    if accelerator.is_main_process:
        remove_unfinished_saves(output_dir)
        choice = [find_resume_checkpoint(resume, output_dir, verify)]
    return broadcast_object_list(choice)[0]


def _explicit_checkpoint(path: Path, verify: bool) -> Path:
    if not (path / TRAINER_STATE_NAME).is_file() and not has_manifest(path):
        raise FileNotFoundError(f"resume={str(path)!r} is not a checkpoint folder (no {TRAINER_STATE_NAME}); use "
                                "'auto', 'none' or a folder under <output_dir>/checkpoints/")
    if not verify:
        logger.warning("resume=%s: verify_checkpoints=false, so the checkpoint is loaded unverified", path)
        return path
    try:
        verify_before_reading(path, skip_hint="verify_checkpoints=false")
    except CheckpointError as err:
        raise CheckpointError(f"resume={path}: the checkpoint is damaged: {err}. Use resume=auto to take the newest "
                              "intact checkpoint, or pass another folder") from err
    return path


def read_start_weights(path: str | Path, verify: bool) -> dict[str, torch.Tensor]:
    """The weights `model.pretrained` / `model.upcycle_from` names (a model folder or one file), verified against
    their manifest first unless `verify_checkpoints=false`."""
    return read_clip_weights(path, verify=verify, skip_hint="verify_checkpoints=false")


def restore_training_state(accelerator: Accelerator, path: Path, model_name: str, *, model: nn.Module | None = None,
                           sharded_optimizer: torch.optim.Optimizer | None = None) -> dict:
    """Restore model, optimizer and RNG states from the checkpoint `path` (call on every process); return its
    trainer state. A sharded run passes its `model` and `sharded_optimizer` and reads DCP shards, resharded to
    its own process count and layout."""
    state = read_json(path / TRAINER_STATE_NAME)
    saved_name = state.get("config", {}).get("model", {}).get("name")
    if saved_name != model_name:
        raise ValueError(f"checkpoint {path} was trained with model.name={saved_name!r}, but this run builds "
                         f"{model_name!r}; use the same model or a new output_dir (or resume=none)")
    is_sharded = (path / SHARDED_DIR).is_dir()
    if sharded_optimizer is None and is_sharded:
        raise CheckpointError(f"{path} holds a sharded training state ({SHARDED_DIR}/): resume it with "
                              "parallel.dp_shard=-1 (FSDP2 over any number of processes, one included), or start a "
                              f"new run from its weights with `mmsoftmoe consolidate {path} OUT` and "
                              "model.pretrained=OUT")
    if sharded_optimizer is not None and not is_sharded:
        raise CheckpointError(f"{path} was saved by a DDP run (no {SHARDED_DIR}/), and this run is sharded "
                              "(parallel.dp_shard != 0): resume it without parallel.dp_shard, or start a sharded run "
                              f"from its weights with model.pretrained={path}")
    if sharded_optimizer is None:
        accelerator.load_state(str(path))
    else:
        load_sharded(path / SHARDED_DIR, model, sharded_optimizer)
        _load_rng_state(path, accelerator)
    return state
