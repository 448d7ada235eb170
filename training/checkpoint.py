"""Checkpoints through accelerate: written atomically, the last K kept, resumed step-exactly.

A checkpoint folder `output_dir/checkpoints/step_XXXXXXXX/` holds accelerate's state (`model.safetensors`,
`optimizer.bin`, per-process RNG states; loaded with `weights_only=True`), `open_clip_config.json` (so the folder
is a model that `mmsoftmoe.models.clip.load_clip`, `mmsoftmoe eval` and `mmsoftmoe export` read) and
`trainer_state.json` (step, samples seen, counters, the run config, the latest evaluation figures). It is
written to a hidden temporary folder and renamed into place, so a crash mid-save never leaves a half checkpoint.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from accelerate import Accelerator
from torch import nn

from mmsoftmoe.models.clip import write_clip_config

STATE_NAME = "trainer_state.json"


def checkpoint_root(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = checkpoint_root(output_dir)
    return sorted(p for p in root.glob("step_*") if p.is_dir() and (p / STATE_NAME).is_file())


def save_checkpoint(accelerator: Accelerator, model: nn.Module, output_dir: str | Path, *, step: int,
                    trainer_state: dict, model_cfg: dict, keep: int) -> Path:
    """Save the full training state at `step` (call on every process) and prune to the newest `keep`."""
    root = checkpoint_root(output_dir)
    final, tmp = root / f"step_{step:08d}", root / f".tmp_step_{step:08d}"
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)  # debris of a save that crashed
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp), safe_serialization=True)
    if accelerator.is_main_process:
        write_clip_config(accelerator.unwrap_model(model), model_cfg, tmp)
        (tmp / STATE_NAME).write_text(json.dumps(trainer_state, indent=2))
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        for old in list_checkpoints(output_dir)[:-keep]:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


def find_resume_checkpoint(resume: str, output_dir: str | Path) -> Path | None:
    """The checkpoint to resume from: `auto` = newest in `output_dir` (or none), `none`, or a given folder."""
    if resume == "none":
        return None
    if resume == "auto":
        found = list_checkpoints(output_dir)
        return found[-1] if found else None
    path = Path(resume)
    if not (path / STATE_NAME).is_file():
        raise FileNotFoundError(f"resume={resume!r} is not a checkpoint folder (no {STATE_NAME}); use 'auto', "
                                "'none' or a folder under <output_dir>/checkpoints/")
    return path


def load_checkpoint(accelerator: Accelerator, path: Path, model_name: str) -> dict:
    """Restore model, optimizer and RNG states from `path`; return its trainer state."""
    state = json.loads((path / STATE_NAME).read_text())
    saved_name = state.get("config", {}).get("model", {}).get("name")
    if saved_name != model_name:
        raise ValueError(f"checkpoint {path} was trained with model.name={saved_name!r}, but this run builds "
                         f"{model_name!r}; use the same model or a new output_dir (or resume=none)")
    accelerator.load_state(str(path))
    return state
