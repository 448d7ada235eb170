"""The on-disk checkpoint contract: file names, the manifest that makes a folder verifiable, readers whose errors
name the damaged file, and the consolidated model a checkpoint folder exposes.

Two kinds of folder hold a CLIP model, and `mmsoftmoe.models.clip.load_clip` (so `mmsoftmoe eval` and
`mmsoftmoe export`) reads both:

- a training checkpoint, `output_dir/checkpoints/step_XXXXXXXX/`: accelerate's state (`model.safetensors`,
  `optimizer.bin`, `random_states_*.pkl`), `open_clip_config.json`, `trainer_state.json` and `manifest.json`.
  A sharded run keeps a `torch.distributed.checkpoint` folder (`sharded/`) instead of `model.safetensors`; it
  exposes no single-file model until `mmsoftmoe consolidate` writes one (`mmsoftmoe eval` and `export` read the
  shards themselves: `mmsoftmoe.parallel.dcp`).
- a model folder (`output_dir/final/`, an open_clip export): `open_clip_config.json` and
  `open_clip_model.safetensors`, and from the trainer also `trainer_state.json` and `manifest.json`.

`manifest.json` lists every other file under the folder, nested ones included (so DCP shards fit unchanged), with
its size and xxh3-128 hash. It is written last, after every listed file is flushed to disk, so a folder whose manifest
verifies is complete. Sizes are checked on every read (cheap: catches truncation and missing files); hashes when
asked. Every reader of weights (`mmsoftmoe consolidate`, `eval`, `export`, a warm start, upcycling, resume) runs
`verify_before_reading` first, hashes included: a folder without a manifest is refused, and `--no-verify` (CLI) or
`verify_checkpoints=false` (training) is the explicit way to read it anyway. The hash is xxh3-128 rather than
sha256 because checkpoints reach tens of GB: measured here, sha256 hashes 1.7 GB/s with the CPU's SHA extensions
(~0.5 GB/s without), xxh3-128 20 GB/s, faster than the disk writes the file; corruption, not an adversary, is
what the manifest guards against.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import xxhash
from safetensors import SafetensorError
from safetensors.torch import load_file

CONFIG_NAME = "open_clip_config.json"
# open_clip's own weight file name first; `model.safetensors` is what accelerate writes in a training checkpoint.
WEIGHTS_NAMES = ("open_clip_model.safetensors", "model.safetensors")
TRAINER_STATE_NAME = "trainer_state.json"
MANIFEST_NAME = "manifest.json"
SHARDED_DIR = "sharded"  # a DCP checkpoint inside a training checkpoint folder (mmsoftmoe.parallel.dcp)
HASH_NAME = "xxh3_128"
CHUNK_BYTES = 1 << 24


class CheckpointError(ValueError):
    """A checkpoint folder that is missing, incomplete or damaged; the message names the file and the fix."""


class ConfigMismatchError(ValueError):
    """Weights that do not fit the model their folder's `open_clip_config.json` builds."""


def _hash_and_sync(path: Path) -> str:
    """The file's xxh3-128 hex digest; the file is flushed to disk on the way (one read serves both)."""
    digest = xxhash.xxh3_128()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(CHUNK_BYTES), b""):
            digest.update(block)
        os.fsync(f.fileno())
    return digest.hexdigest()


def fsync_dir(folder: Path) -> None:
    """Flush a folder's entries (created, renamed, removed files) to disk."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def listed_files(folder: Path) -> list[Path]:
    """Every file under `folder` but the manifest, sorted (what a manifest lists)."""
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.relative_to(folder).as_posix() != MANIFEST_NAME)


def write_manifest(folder: str | Path) -> Path:
    """Write `manifest.json` for every file now under `folder` (flushing each), then flush it and the folders."""
    folder = Path(folder)
    files = {p.relative_to(folder).as_posix(): {"size": p.stat().st_size, HASH_NAME: _hash_and_sync(p)}
             for p in listed_files(folder)}
    path = folder / MANIFEST_NAME
    with open(path, "w") as f:
        json.dump({"hash": HASH_NAME, "files": files}, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    for sub in {folder, *(p.parent for p in listed_files(folder))}:
        fsync_dir(sub)
    return path


def has_manifest(folder: str | Path) -> bool:
    return (Path(folder) / MANIFEST_NAME).is_file()


def read_json(path: Path) -> dict:
    """A JSON file's content; a CheckpointError names the file when it is missing or not valid JSON."""
    if not path.is_file():
        raise CheckpointError(f"{path} is missing: the checkpoint folder {path.parent} is incomplete")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path} is damaged (not valid JSON: {err})") from err


def verify_checkpoint(folder: str | Path, *, hashes: bool) -> None:
    """Check `folder` against its manifest: every listed file present with its size (and hash if `hashes`).

    Raises:
        CheckpointError naming the first file that is missing, of the wrong size or with the wrong content.
    """
    folder = Path(folder)
    manifest = read_json(folder / MANIFEST_NAME)
    if manifest.get("hash") != HASH_NAME or not isinstance(manifest.get("files"), dict):
        raise CheckpointError(f"{folder / MANIFEST_NAME} is not a manifest this mmsoftmoe version reads "
                              f"(expected hash {HASH_NAME!r} and a 'files' table)")
    for name, entry in manifest["files"].items():
        path = folder / name
        if not path.is_file():
            raise CheckpointError(f"{path} is missing (listed in {MANIFEST_NAME}): the checkpoint is incomplete")
        size = path.stat().st_size
        if size != entry["size"]:
            raise CheckpointError(f"{path} is damaged: {size} bytes, {MANIFEST_NAME} says {entry['size']} "
                                  "(truncated or rewritten)")
        if hashes and _hash_and_sync(path) != entry[HASH_NAME]:
            raise CheckpointError(f"{path} is damaged: its content differs from {MANIFEST_NAME} ({HASH_NAME})")


def verify_before_reading(folder: str | Path, *, verify: bool = True, skip_hint: str = "--no-verify") -> None:
    """The one check every reader of a checkpoint folder runs before it reads a byte of weights: the folder's
    manifest (sizes and hashes of every file). `verify=False` skips it; `skip_hint` names that switch in errors.

    Raises:
        CheckpointError naming the missing manifest, or the first missing or damaged file.
    """
    folder = Path(folder)
    if not verify:
        return
    if not has_manifest(folder):
        raise CheckpointError(f"{folder / MANIFEST_NAME} is missing, so {folder} cannot be verified (a save that did "
                              f"not finish, or a folder not written by mmsoftmoe); pass {skip_hint} to read it "
                              "unverified")
    verify_checkpoint(folder, hashes=True)


def model_weights(folder: str | Path) -> Path:
    """The single-file model a folder exposes: `open_clip_model.safetensors` (final/, exports) or accelerate's
    `model.safetensors` (training checkpoints). Errors say what the folder is instead and what to pass."""
    folder = Path(folder)
    if not folder.exists():
        raise FileNotFoundError(f"checkpoint {folder} does not exist (expected a folder holding {CONFIG_NAME} and "
                                "the weights)")
    if folder.is_file():
        raise CheckpointError(f"checkpoint {folder} is a file: pass the folder holding {CONFIG_NAME} and the "
                              f"weights ({folder.parent})")
    if not (folder / CONFIG_NAME).is_file() and (folder / "final" / CONFIG_NAME).is_file():
        raise FileNotFoundError(f"{folder} is a run folder, not a model folder: pass {folder / 'final'} (or a "
                                "checkpoint under checkpoints/)")
    if not (folder / CONFIG_NAME).is_file():
        raise FileNotFoundError(f"{folder} is not an mmsoftmoe/open_clip model folder: {CONFIG_NAME} is missing")
    weights = next((folder / n for n in WEIGHTS_NAMES if (folder / n).is_file()), None)
    if weights is None and (folder / SHARDED_DIR).is_dir():
        raise CheckpointError(f"{folder} holds a sharded training state ({SHARDED_DIR}/), not a single-file model: "
                              f"run `mmsoftmoe consolidate {folder} OUT` and pass OUT")
    if weights is None:
        raise FileNotFoundError(f"no weights in {folder}: expected one of {list(WEIGHTS_NAMES)}")
    return weights


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """A safetensors file's tensors (CPU); a CheckpointError names the file when it cannot be parsed."""
    try:
        return load_file(str(path))
    except SafetensorError as err:
        raise CheckpointError(f"{path} is damaged (not a readable safetensors file: {err})") from err


def read_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from one file: safetensors, or a `torch.save` file (plain or under "state_dict"/"model",
    read with `weights_only=True`); a CheckpointError names the file when it is neither."""
    path = Path(path)
    if path.suffix == ".safetensors":
        return read_safetensors(path)
    expected = "expected a .safetensors file or a torch.save state dict (.pt/.pth)"
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # the unpickler raises whatever the bytes provoke (UnpicklingError, IndexError, ...)
        detail = (str(err).splitlines() or [type(err).__name__])[0]
        raise CheckpointError(f"{path} is not a weights file ({expected}): {detail}") from err
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path} holds a {type(state).__name__}, not a state dict of tensors ({expected})")
    return state


def read_clip_weights(path: str | Path, *, verify: bool = True, skip_hint: str = "--no-verify"
                      ) -> dict[str, torch.Tensor]:
    """The state dict of a model folder (final/, an open_clip folder, checkpoints/step_*) or of one weights file,
    verified first (`verify_before_reading`): a folder against its manifest, a file against its folder's
    manifest when that lists it (a loose file has nothing to be checked against)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist; give a model folder or a .safetensors/.pt weights file")
    if path.is_dir():
        return read_model_folder(path, verify=verify, skip_hint=skip_hint)[1]
    if has_manifest(path.parent) and path.name in read_json(path.parent / MANIFEST_NAME).get("files", {}):
        verify_before_reading(path.parent, verify=verify, skip_hint=skip_hint)
    return read_state_dict_file(path)


def verify_model_folder(folder: str | Path, *, verify: bool = True, skip_hint: str = "--no-verify") -> None:
    """What a reader of a model folder checks first: `verify_before_reading`, and with `verify` off the sizes its
    manifest lists, when it has one (cheap: truncation and missing files)."""
    verify_before_reading(folder, verify=verify, skip_hint=skip_hint)
    if not verify and has_manifest(folder):
        verify_checkpoint(folder, hashes=False)


def read_model_folder(folder: str | Path, *, verify: bool = True, skip_hint: str = "--no-verify"
                      ) -> tuple[dict, dict[str, torch.Tensor]]:
    """(`open_clip_config.json` content, weights) of the model a folder exposes, verified against its manifest
    first (`verify_before_reading`; sizes only when `verify` is off and a manifest exists); every error names the
    folder or file and is a user error (no traceback)."""
    weights = model_weights(folder)
    verify_model_folder(folder, verify=verify, skip_hint=skip_hint)
    config = read_json(Path(folder) / CONFIG_NAME)
    if "model_cfg" not in config:
        raise CheckpointError(f"{Path(folder) / CONFIG_NAME} has no 'model_cfg': not an open_clip model config")
    return config, read_safetensors(weights)
