"""Export safety: atomic folders, no silent overwrite, clear errors, the CLI, and the parity check's teeth."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch

import mmsoftmoe_cli
from mmsoftmoe.checkpoint import write_manifest
from mmsoftmoe.export import ParityError, check_parity, export_checkpoint, timm_format
from mmsoftmoe.export import core as export_core
from mmsoftmoe.export.hf_format import soft_moe_blocks
from mmsoftmoe.models.clip import build_clip, load_clip, resolve_clip_config, save_clip, write_clip_config
from mmsoftmoe.staging import atomic_folder, remove_stale_siblings
from tests.test_export import write_checkpoint

EXPORT_DIR = Path(__file__).resolve().parents[1] / "mmsoftmoe" / "export"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return write_checkpoint(tmp_path_factory.mktemp("ckpt") / "ckpt")


def listing(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_failure_while_writing_leaves_no_folder(checkpoint, tmp_path, monkeypatch):
    def half_write(model, folder, **kwargs):
        (Path(folder) / "model.safetensors").write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(timm_format, "save_for_hf", half_write)
    with pytest.raises(OSError, match="disk full"):
        export_checkpoint(checkpoint, "timm", tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_failure_after_parity_keeps_the_previous_export(checkpoint, tmp_path, monkeypatch):
    out = tmp_path / "out"
    export_checkpoint(checkpoint, "timm", out)
    before = listing(out)
    def failing_card(*args):
        raise RuntimeError("card failed")

    monkeypatch.setattr(export_core, "model_card", failing_card)
    with pytest.raises(RuntimeError, match="card failed"):
        export_checkpoint(checkpoint, "timm", out, overwrite=True)
    assert listing(out) == before
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_existing_folder_needs_overwrite(checkpoint, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="--overwrite"):
        export_checkpoint(checkpoint, "timm", out)
    assert listing(out) == {"keep.txt": b"mine"}
    report = export_checkpoint(checkpoint, "timm", out, overwrite=True)["timm"]
    assert sorted(listing(out)) == ["README.md", "config.json", "export_report.json", "model.safetensors"]
    assert report["folder"] == str(out)


def test_multi_format_refuses_before_writing_anything(checkpoint, tmp_path):
    (tmp_path / "open_clip").mkdir()
    with pytest.raises(FileExistsError, match="open_clip"):
        export_checkpoint(checkpoint, "timm,open_clip", tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["open_clip"]


def test_export_never_replaces_its_checkpoint(checkpoint):
    with pytest.raises(ValueError, match="would replace the checkpoint"):
        export_checkpoint(checkpoint, "timm", checkpoint, overwrite=True)
    with pytest.raises(ValueError, match="would replace the checkpoint"):
        export_checkpoint(checkpoint, "timm", checkpoint.parent, overwrite=True)
    assert (checkpoint / "open_clip_config.json").is_file()


def test_atomic_folder_renames_only_on_success(tmp_path):
    with atomic_folder(tmp_path / "a") as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(f".a.tmp-{socket.gethostname()}-{os.getpid()}-")
        (tmp / "f").write_text("x")
        assert not (tmp_path / "a").exists()
    assert listing(tmp_path / "a") == {"f": b"x"}


def test_checkpoint_of_another_architecture(tmp_path):
    """Mini weights under a Micro config: a ValueError naming the checkpoint and the architecture."""
    folder = tmp_path / "ckpt"
    other, _ = build_clip("SoftMoE-Mini-8-64")
    save_clip(other, resolve_clip_config("SoftMoE-Mini-8-64"), folder)
    micro, _ = build_clip("SoftMoE-Micro-4-32")
    write_clip_config(micro, resolve_clip_config("SoftMoE-Micro-4-32"), folder)
    write_manifest(folder)  # the folder verifies; its config describes another model
    with pytest.raises(ValueError, match="do not match the architecture.*softmoe_vit_micro_patch4_32_e16"):
        export_checkpoint(folder, "timm", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_missing_files(checkpoint, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        export_checkpoint(tmp_path / "nowhere", "timm", tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="open_clip_config.json"):
        export_checkpoint(tmp_path / "empty", "timm", tmp_path / "out")
    no_weights = tmp_path / "no_weights"
    no_weights.mkdir()
    (no_weights / "open_clip_config.json").write_bytes((checkpoint / "open_clip_config.json").read_bytes())
    with pytest.raises(FileNotFoundError, match="no weights"):
        export_checkpoint(no_weights, "timm", tmp_path / "out")


def test_unsupported_format_is_refused_before_loading(tmp_path):
    with pytest.raises(ValueError, match="unsupported export format 'tflite'.*'timm'"):
        export_checkpoint(tmp_path / "nowhere", "tflite", tmp_path / "out")


def test_hf_refuses_sparse_towers():
    trunk = timm.create_model("tokenschoice_vit_micro_patch4_32_e16_k1", num_classes=0)
    with pytest.raises(ValueError, match="TokensChoiceMoE.*timm, open_clip, onnx or torch_export"):
        soft_moe_blocks(trunk)


@torch.no_grad()
def test_parity_check_catches_drift_and_batch_effects():
    reference = torch.nn.Linear(4, 3)
    pixels = torch.randn(8, 4)
    assert check_parity(reference, reference, pixels, 1e-5, "same")["max_abs_diff"] == 0
    with pytest.raises(ParityError, match="drifted export differs"):
        check_parity(reference, lambda x: reference(x) + 1e-3, pixels, 1e-4, "drifted")
    # Batch-dependent outputs (e.g. routing over the whole batch) fail the batch-1 check.
    with pytest.raises(ParityError, match="batch1_vs_batch"):
        check_parity(reference, lambda x: reference(x - x.mean(0) + pixels.mean(0)), pixels, 1e-4, "batchy")


@torch.no_grad()
def test_no_proj_exports_pooled_features(checkpoint, tmp_path):
    reports = export_checkpoint(checkpoint, "timm,hf,torch_export", tmp_path, proj=False)
    assert {r["output_dim"] for r in reports.values()} == {64} and not reports["timm"]["projection"]
    config = json.loads((tmp_path / "timm" / "config.json").read_text())
    assert config["num_classes"] == 0
    # The literal call works without a head: num_classes=0 gives the pooled features.
    model = timm.create_model(config["architecture"], pretrained=True, num_classes=0,
                              pretrained_cfg_overlay=dict(file=str(tmp_path / "timm" / "model.safetensors")))
    clip, _, _ = load_clip(checkpoint)
    pixels = torch.randn(4, 3, 32, 32)
    assert torch.allclose(model.eval()(pixels), clip.visual.trunk(pixels), atol=1e-5, rtol=0)


def test_cli(checkpoint, tmp_path, capsys):
    out = tmp_path / "timm_out"
    assert mmsoftmoe_cli.main(["export", "--checkpoint", str(checkpoint), "--format", "timm", "--out", str(out)]) == 0
    assert "timm" in capsys.readouterr().out and (out / "README.md").is_file()
    assert mmsoftmoe_cli.main(["export", "--checkpoint", str(checkpoint), "--format", "timm", "--out", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        mmsoftmoe_cli.main(["export", "--checkpoint", str(checkpoint), "--format", "tflite", "--out", str(out)])
    assert exit_info.value.code == 2 and "unsupported export format 'tflite'" in capsys.readouterr().err


def test_hf_export_refuses_routing_ablations():
    trunk = timm.create_model("softmoe_vit_micro_patch4_32_e16_s4_duniform_csoft")
    with pytest.raises(ValueError, match="routing ablation"):
        soft_moe_blocks(trunk)


def _dead_pid() -> int:
    return int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True, check=True).stdout)


def test_next_export_removes_what_killed_exports_left(tmp_path, caplog):
    host, dead = socket.gethostname(), _dead_pid()
    names = {"killed": f".out.tmp-{host}-{dead}-aaaa", "running": f".out.tmp-{host}-{os.getpid()}-bbbb",
             "other_host": f".out.tmp-elsewhere-{dead}-cccc", "other_target": f".out2.tmp-{host}-{dead}-dddd"}
    for name in names.values():
        (tmp_path / name).mkdir()
        (tmp_path / name / "model.safetensors").write_bytes(b"copy")
    with caplog.at_level(logging.WARNING, logger="mmsoftmoe.export"), pytest.raises(FileNotFoundError):
        export_checkpoint(tmp_path / "no_checkpoint", "timm", tmp_path / "out")  # cleans before it opens
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == sorted(v for k, v in names.items() if k != "killed")
    assert f"removed {tmp_path / names['killed']}, left by a killed export to {tmp_path / 'out'}" in caplog.text


def test_previous_export_moved_aside_by_a_killed_export_is_put_back(tmp_path):
    aside = tmp_path / f".out.old-{socket.gethostname()}-{_dead_pid()}-aaaa"
    (aside / "out").mkdir(parents=True)
    (aside / "out" / "model.safetensors").write_bytes(b"previous export")
    assert remove_stale_siblings(tmp_path / "out") == [aside]
    assert listing(tmp_path / "out") == {"model.safetensors": b"previous export"}
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
