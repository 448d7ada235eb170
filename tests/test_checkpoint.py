"""The checkpoint contract: manifests catch damage, resume falls back past a damaged newest checkpoint and then
trains exactly like the uninterrupted run, and eval / export read a `checkpoints/step_*` folder as well as
`final/` and refuse a damaged one with one error line naming the file."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from accelerate.state import AcceleratorState

import mmsoftmoe_cli
from mmsoftmoe.checkpoint import MANIFEST_NAME, CheckpointError, verify_checkpoint, write_manifest
from mmsoftmoe.export import export_checkpoint
from mmsoftmoe.models.clip import load_clip
from mmsoftmoe_eval.main import main as eval_main
from mmsoftmoe_training.checkpointing import find_resume_checkpoint
from tests.checkpoint_fixtures import losses, run, run_killed_after

RUN = ("steps=6", "checkpoint_every=2", "keep_checkpoints=3")


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """An uninterrupted 6-step run (checkpoints at steps 2, 4, 6, and final/)."""
    out = tmp_path_factory.mktemp("reference")
    run(out, *RUN)
    return out


@pytest.fixture(scope="module")
def killed(tmp_path_factory) -> Path:
    """The same run killed after step 5: checkpoints at steps 2 and 4, no final/."""
    out = tmp_path_factory.mktemp("killed")
    run_killed_after(out, 5, *RUN)
    return out


def damage(folder: Path, kind: str) -> str:
    """Damage a checkpoint the way the issue reproduced; returns the name of the damaged file."""
    if kind == "truncated_model":
        path = folder / "model.safetensors"
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif kind == "missing_optimizer":
        path = folder / "optimizer.bin"
        path.unlink()
    else:
        path = folder / "trainer_state.json"
        path.write_text(path.read_text()[:100])
    return path.name


def test_manifest_lists_nested_files_and_catches_each_kind_of_damage(tmp_path):
    folder = tmp_path / "ckpt"
    (folder / "sharded").mkdir(parents=True)  # a DCP folder inside the checkpoint: listed like any other file
    files = {"model.safetensors": b"w" * 1000, "sharded/__0_0.distcp": b"s" * 300, "sharded/.metadata": b"m"}
    for name, data in files.items():
        (folder / name).write_bytes(data)
    write_manifest(folder)
    manifest = json.loads((folder / MANIFEST_NAME).read_text())
    assert {name: entry["size"] for name, entry in manifest["files"].items()} == {k: len(v) for k, v in files.items()}
    verify_checkpoint(folder, hashes=True)

    (folder / "sharded/__0_0.distcp").write_bytes(b"x" * 300)  # same size, other bytes: only the hash sees it
    verify_checkpoint(folder, hashes=False)
    with pytest.raises(CheckpointError, match=r"__0_0.distcp is damaged: its content differs"):
        verify_checkpoint(folder, hashes=True)
    (folder / "model.safetensors").write_bytes(b"w" * 10)
    with pytest.raises(CheckpointError, match=r"model.safetensors is damaged: 10 bytes, manifest.json says 1000"):
        verify_checkpoint(folder, hashes=False)
    (folder / "model.safetensors").write_bytes(files["model.safetensors"])
    (folder / "sharded/.metadata").unlink()
    with pytest.raises(CheckpointError, match=r"\.metadata is missing"):
        verify_checkpoint(folder, hashes=False)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["truncated_model", "missing_optimizer", "cut_trainer_state"])
def test_resume_skips_a_damaged_newest_checkpoint_and_trains_like_the_uninterrupted_run(
        kind, reference, killed, tmp_path, caplog):
    out = tmp_path / "run"
    shutil.copytree(killed, out)
    name = damage(out / "checkpoints/step_00000004", kind)
    (out / "checkpoints/.tmp_step_00000006").mkdir()  # a save killed mid-way, cleaned at the next start
    (out / "checkpoints/.tmp_step_00000006/model.safetensors").write_bytes(b"partial")
    with caplog.at_level(logging.WARNING, logger="mmsoftmoe.train"):
        resumed = run(out, *RUN)
    assert f"resume=auto: skipping {out / 'checkpoints/step_00000004'}" in caplog.text and name in caplog.text
    assert "removed" in caplog.text and ".tmp_step_00000006" in caplog.text
    expected = losses(reference)
    assert sorted(resumed) == list(range(1, 7))
    for step in range(3, 7):  # resumed from step 2, not 4
        assert resumed[step] == pytest.approx(expected[step], abs=1e-6), step
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_00000002", "step_00000004",
                                                                        "step_00000006"]
    for folder in (out / "checkpoints").iterdir():  # the damaged step 4 was replaced by an intact one
        verify_checkpoint(folder, hashes=True)


@pytest.mark.slow
def test_explicit_resume_of_a_damaged_checkpoint_is_an_error(killed, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(killed, out)
    damage(out / "checkpoints/step_00000004", "truncated_model")
    with pytest.raises(CheckpointError, match=r"resume=.*step_00000004: the checkpoint is damaged: .*model.safetens"):
        find_resume_checkpoint(str(out / "checkpoints/step_00000004"), out)
    assert find_resume_checkpoint(str(out / "checkpoints/step_00000002"), out) == out / "checkpoints/step_00000002"
    damage(out / "checkpoints/step_00000002", "missing_optimizer")
    with pytest.raises(CheckpointError, match="none of the 2 checkpoints .* verifies"):
        find_resume_checkpoint("auto", out)


@pytest.mark.slow
def test_a_step_folder_is_the_same_model_as_final(reference):
    step, final = reference / "checkpoints/step_00000006", reference / "final"
    from_step, _, config = load_clip(step)
    from_final, _, _ = load_clip(final)
    assert config == json.loads((final / "open_clip_config.json").read_text())
    for (name, a), b in zip(from_step.state_dict().items(), from_final.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


@pytest.mark.slow
def test_eval_and_export_read_a_step_folder(reference, tmp_path):
    step = reference / "checkpoints/step_00000006"
    numbers = {}
    for name, folder in (("step", step), ("final", reference / "final")):
        AcceleratorState._reset_state(True)
        argv = ["--checkpoint", str(folder), "--dataset", "shapes", "--tasks", "zeroshot", "--no-cache",
                "--batch-size", "128", "--out", str(tmp_path / name)]
        assert eval_main(argv) == 0
        numbers[name] = json.loads((tmp_path / name / "results.json").read_text())["shapes"]["zeroshot"]
    assert numbers["step"]["acc1"] == numbers["final"]["acc1"]
    report = export_checkpoint(step, "timm", tmp_path / "timm")["timm"]
    assert report["parity"]["max_abs_diff"] <= report["parity"]["tolerance"]
    assert report["checkpoint"] == str(step)


@pytest.mark.slow
@pytest.mark.parametrize("command", ["eval", "export"])
@pytest.mark.parametrize("manifest", [True, False], ids=["with_manifest", "no_manifest"])
def test_damaged_checkpoint_is_one_error_line(command, manifest, reference, tmp_path, capsys):
    folder = tmp_path / "ckpt"
    shutil.copytree(reference / "checkpoints/step_00000006", folder)
    unverified = []
    if not manifest:  # e.g. a folder from an older mmsoftmoe, read with --no-verify: the safetensors reader names it
        (folder / MANIFEST_NAME).unlink()
        unverified = ["--no-verify"]
    damage(folder, "truncated_model")
    out = ["--out", str(tmp_path / "out"), *unverified]
    args = ["--dataset", "shapes", "--tasks", "zeroshot"] if command == "eval" else ["--format", "timm"]
    AcceleratorState._reset_state(True)
    assert mmsoftmoe_cli.main([command, "--checkpoint", str(folder), *args, *out]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and f"{folder / 'model.safetensors'} is damaged" in err[0]
    assert not (tmp_path / "out").exists()
