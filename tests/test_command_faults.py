"""Damaged inputs to the commands around the training loop, run as users run them (`mmsoftmoe ...` in-process):
every reader of a checkpoint verifies it against its manifest before reading a byte of weights, and refuses with
one `error:` line naming the file; nothing is written where the output would go."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file

import mmsoftmoe_cli
from mmsoftmoe.checkpoint import MANIFEST_NAME, SHARDED_DIR, read_clip_weights, write_manifest
from mmsoftmoe.models.clip import build_clip, resolve_clip_config, save_clip, write_clip_config
from mmsoftmoe.models.upcycle import upcycle_
from mmsoftmoe.parallel.dcp import save_sharded

MODEL = "SoftMoE-Micro-4-32"
SMOKE_RUN = ["eval.dataset=none", "data.num_workers=0", "batch_size=8", "trackers=[]", "steps=1"]


def cli(capsys, *argv: str) -> tuple[int, list[str]]:
    """`mmsoftmoe ARGV` in this process: (exit status, the lines it printed to stderr that start with `error:`)."""
    rc = mmsoftmoe_cli.main(list(argv))
    return rc, [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]


def overwrite_in_place(path: Path, offset: int = 0) -> None:
    """Same length, other bytes: 0x7f in every byte of a float32 is 3.4e38, the value the issue saw."""
    size = path.stat().st_size
    count = min(4096, size - offset)
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(b"\x7f" * count)
    assert path.stat().st_size == size


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.fixture(scope="module")
def sharded(tmp_path_factory) -> tuple[Path, dict[str, torch.Tensor]]:
    """A training checkpoint folder holding a DCP state (written by one process, as the trainer lays it out) and
    the model's weights for reference."""
    folder = tmp_path_factory.mktemp("ckpt") / "step_00000002"
    model, _ = build_clip(MODEL)
    save_sharded(folder / SHARDED_DIR, model)
    write_clip_config(model, resolve_clip_config(MODEL), folder)
    write_manifest(folder)
    return folder, {k: v.clone() for k, v in model.state_dict().items()}


@pytest.fixture()
def damaged(sharded, tmp_path) -> Path:
    folder = tmp_path / sharded[0].name
    shutil.copytree(sharded[0], folder)
    return folder


def distcp(folder: Path) -> Path:
    return next((folder / SHARDED_DIR).glob("*.distcp"))


def test_consolidate_writes_a_verifiable_model_equal_to_the_saved_one(sharded, tmp_path, capsys):
    rc, errors = cli(capsys, "consolidate", str(sharded[0]), str(tmp_path / "model"))
    assert (rc, errors) == (0, [])
    weights = load_file(str(tmp_path / "model" / "open_clip_model.safetensors"))
    assert weights.keys() == sharded[1].keys()
    assert all(torch.equal(weights[k], v) for k, v in sharded[1].items())
    assert (tmp_path / "model" / MANIFEST_NAME).is_file()  # what eval and export verify
    rc, errors = cli(capsys, "consolidate", str(sharded[0]), str(tmp_path / "model"))
    assert rc == 2 and errors == [f"error: export folder {tmp_path / 'model'} already exists; pass --overwrite "
                                  "(overwrite=True) to replace it"]
    assert cli(capsys, "consolidate", str(sharded[0]), str(tmp_path / "model"), "--overwrite") == (0, [])


@pytest.mark.parametrize("damage", ["distcp_overwritten", "distcp_truncated", "metadata_truncated", "no_manifest"])
def test_consolidate_refuses_a_damaged_checkpoint_naming_the_file(damaged, damage, tmp_path, capsys):
    if damage == "distcp_overwritten":
        overwrite_in_place(distcp(damaged), offset=distcp(damaged).stat().st_size // 2)
        expected = f"error: {distcp(damaged)} is damaged: its content differs from {MANIFEST_NAME} (xxh3_128)"
    elif damage == "distcp_truncated":
        size = distcp(damaged).stat().st_size
        truncate(distcp(damaged))
        expected = f"error: {distcp(damaged)} is damaged: {size // 2} bytes, {MANIFEST_NAME} says {size} "
    elif damage == "metadata_truncated":
        metadata = damaged / SHARDED_DIR / ".metadata"
        truncate(metadata)
        expected = f"error: {metadata} is damaged: "
    else:
        (damaged / MANIFEST_NAME).unlink()
        expected = f"error: {damaged / MANIFEST_NAME} is missing, so {damaged} cannot be verified"
    rc, errors = cli(capsys, "consolidate", str(damaged), str(tmp_path / "model"))
    assert rc == 2 and len(errors) == 1 and errors[0].startswith(expected), errors
    assert sorted(p.name for p in tmp_path.iterdir()) == [damaged.name]  # no output, no temporary folder


def test_no_verify_is_the_way_past_a_missing_manifest_and_dcp_damage_is_still_one_line(damaged, sharded, tmp_path,
                                                                                       capsys):
    (damaged / MANIFEST_NAME).unlink()
    assert cli(capsys, "consolidate", str(damaged), str(tmp_path / "model"), "--no-verify") == (0, [])
    consolidated = load_file(str(tmp_path / "model" / "open_clip_model.safetensors"))
    assert all(torch.equal(consolidated[k], v) for k, v in sharded[1].items())
    truncate(damaged / SHARDED_DIR / ".metadata")
    rc, errors = cli(capsys, "consolidate", str(damaged), str(tmp_path / "again"), "--no-verify")
    assert rc == 2 and len(errors) == 1
    assert errors[0].startswith(f"error: {damaged / SHARDED_DIR} cannot be read as a DCP checkpoint"), errors
    assert not (tmp_path / "again").exists()


def test_eval_reads_a_sharded_checkpoint_as_its_consolidated_model(sharded, tmp_path, capsys, fresh_accelerate_state):
    """One process reads the DCP shards whole (no `mmsoftmoe consolidate` first): the consolidated folder's
    results."""
    common = ["--dataset", "shapes", "--tasks", "zeroshot", "--no-cache"]
    assert cli(capsys, "eval", "--checkpoint", str(sharded[0]), "--out", str(tmp_path / "a"), *common) == (0, [])
    assert cli(capsys, "consolidate", str(sharded[0]), str(tmp_path / "model")) == (0, [])
    model = str(tmp_path / "model")
    assert cli(capsys, "eval", "--checkpoint", model, "--out", str(tmp_path / "b"), *common) == (0, [])
    got, expected = (json.loads((tmp_path / out / "results.json").read_text())["shapes"] for out in ("a", "b"))
    assert got["zeroshot"] == expected["zeroshot"] and got["num_samples"] == {"zeroshot": 500}


def test_export_reads_a_sharded_checkpoint_as_its_consolidated_model(sharded, tmp_path, capsys):
    """`mmsoftmoe export` of a sharded run's checkpoint, with no consolidate first: the encoder the consolidated
    folder exports, bit for bit."""
    assert cli(capsys, "consolidate", str(sharded[0]), str(tmp_path / "model")) == (0, [])
    for source, out in ((sharded[0], "direct"), (tmp_path / "model", "consolidated")):
        assert cli(capsys, "export", "--checkpoint", str(source), "--format", "timm", "--out", str(tmp_path / out)) \
            == (0, [])
    direct, consolidated = (load_file(str(tmp_path / out / "model.safetensors")) for out in ("direct", "consolidated"))
    assert direct.keys() == consolidated.keys() and all(torch.equal(direct[k], consolidated[k]) for k in direct)
    expected = {k.removeprefix("visual.trunk."): v for k, v in sharded[1].items() if k.startswith("visual.trunk.")}
    assert all(torch.equal(direct[k], v) for k, v in expected.items())  # the weights that were saved


def test_eval_refuses_a_damaged_sharded_checkpoint_naming_the_shard(damaged, tmp_path, capsys):
    overwrite_in_place(distcp(damaged))
    rc, errors = cli(capsys, "eval", "--checkpoint", str(damaged), "--dataset", "shapes", "--tasks", "zeroshot",
                     "--out", str(tmp_path / "out"))
    assert rc == 2 and errors == [f"error: {distcp(damaged)} is damaged: its content differs from {MANIFEST_NAME} "
                                  "(xxh3_128)"]
    assert not (tmp_path / "out").exists()


def test_ep_is_refused_for_a_single_file_model(model_folder, tmp_path, capsys, fresh_accelerate_state):
    rc, errors = cli(capsys, "eval", "--checkpoint", str(model_folder), "--dataset", "shapes", "--ep", "2",
                     "--out", str(tmp_path / "out"))
    assert rc == 2 and len(errors) == 1
    assert errors[0].startswith("error: --ep applies to a sharded training checkpoint"), errors


@pytest.fixture()
def model_folder(tmp_path) -> Path:
    model, _ = build_clip(MODEL)
    return save_clip(model, resolve_clip_config(MODEL), tmp_path / "model")


@pytest.mark.parametrize("command", ["eval", "export"])
def test_eval_and_export_refuse_weights_overwritten_in_place(model_folder, command, tmp_path, capsys):
    weights = model_folder / "open_clip_model.safetensors"
    overwrite_in_place(weights, offset=weights.stat().st_size - 4096)
    out = tmp_path / "out"
    argv = (["eval", "--checkpoint", str(model_folder), "--dataset", "shapes", "--tasks", "zeroshot"]
            if command == "eval" else ["export", "--checkpoint", str(model_folder), "--format", "timm"])
    rc, errors = cli(capsys, *argv, "--out", str(out))
    assert rc == 2 and errors == [f"error: {weights} is damaged: its content differs from {MANIFEST_NAME} "
                                  "(xxh3_128)"]
    assert not out.exists()


def test_eval_names_a_missing_manifest_and_no_verify_reads_the_folder(model_folder, tmp_path, capsys):
    (model_folder / MANIFEST_NAME).unlink()
    argv = ["eval", "--checkpoint", str(model_folder), "--dataset", "shapes", "--tasks", "zeroshot", "--out",
            str(tmp_path / "out"), "--no-cache"]
    rc, errors = cli(capsys, *argv)
    assert rc == 2 and len(errors) == 1 and "--no-verify" in errors[0]
    assert errors[0].startswith(f"error: {model_folder / MANIFEST_NAME} is missing")
    assert cli(capsys, *argv, "--no-verify") == (0, [])
    assert (tmp_path / "out" / "results.json").is_file()


def bad_weights(tmp_path: Path, kind: str) -> tuple[Path, str]:
    """A damaged `model.pretrained` / `model.upcycle_from` input and the start of the error that names it."""
    if kind == "text_pt":
        path = tmp_path / "notes.pt"
        path.write_text("these are notes, not weights\n")
        return path, f"error: {path} is not a weights file (expected a .safetensors file or a torch.save state dict"
    if kind == "text_safetensors":
        path = tmp_path / "notes.safetensors"
        path.write_text("these are notes, not weights\n")
        return path, f"error: {path} is damaged (not a readable safetensors file"
    if kind == "random_pt":
        path = tmp_path / "random.pt"
        path.write_bytes(torch.randint(0, 256, (4096,), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
                         .numpy().tobytes())
        return path, f"error: {path} is not a weights file (expected a .safetensors file or a torch.save state dict"
    if kind == "run_folder":
        model, _ = build_clip(MODEL)
        save_clip(model, resolve_clip_config(MODEL), tmp_path / "run" / "final")
        return tmp_path / "run", (f"error: {tmp_path / 'run'} is a run folder, not a model folder: pass "
                                  f"{tmp_path / 'run' / 'final'}")
    model, _ = build_clip(MODEL)
    folder = save_clip(model, resolve_clip_config(MODEL), tmp_path / "unverifiable")
    (folder / MANIFEST_NAME).unlink()
    return folder, (f"error: {folder / MANIFEST_NAME} is missing, so {folder} cannot be verified (a save that did "
                    "not finish, or a folder not written by mmsoftmoe); pass verify_checkpoints=false")


@pytest.mark.parametrize("key", ["model.pretrained", "model.upcycle_from"])
@pytest.mark.parametrize("kind", ["text_pt", "text_safetensors", "random_pt", "run_folder", "no_manifest"])
def test_warm_start_and_upcycling_inputs_are_refused_naming_the_file(key, kind, tmp_path, capsys,
                                                                     fresh_accelerate_state):
    path, expected = bad_weights(tmp_path, kind)
    out = tmp_path / "out"
    rc, errors = cli(capsys, "train", "--config", "smoke", f"output_dir={out}", *SMOKE_RUN, f"{key}={path}")
    assert rc == 2 and len(errors) == 1 and errors[0].startswith(expected), errors
    assert not (out / "final").exists() and not list(out.glob("checkpoints/*"))


def test_upcycle_from_accepts_a_clip_folder_like_pretrained(tmp_path):
    dense, _ = build_clip("Dense-Micro-4-32")
    folder = save_clip(dense, resolve_clip_config("Dense-Micro-4-32"), tmp_path / "dense")
    moe = timm.create_model("softmoe_vit_micro_patch4_32_e16", num_classes=0)
    report = upcycle_(moe, read_clip_weights(folder))
    trunk = dense.visual.trunk.state_dict()
    assert torch.equal(moe.blocks[3].mlp.experts.w1[5], trunk["blocks.3.mlp.fc1.weight"].t())
    assert "blocks.0.attn.qkv.weight" in report.copied
    # a file inside a verifiable folder is verified against that folder's manifest
    overwrite_in_place(folder / "open_clip_model.safetensors", offset=(folder / "open_clip_model.safetensors")
                       .stat().st_size - 4096)
    with pytest.raises(ValueError, match="open_clip_model.safetensors is damaged: its content differs"):
        read_clip_weights(folder / "open_clip_model.safetensors")


def test_an_explicit_resume_without_a_manifest_is_refused_unless_verification_is_off(tmp_path, capsys,
                                                                                       fresh_accelerate_state):
    out = tmp_path / "run"
    assert cli(capsys, "train", "--config", "smoke", f"output_dir={out}", *SMOKE_RUN, "checkpoint_every=1")[0] == 0
    step = out / "checkpoints" / "step_00000001"
    (step / MANIFEST_NAME).unlink()
    state = json.loads((step / "trainer_state.json").read_text())
    argv = ["train", "--config", "smoke", f"output_dir={out}", *SMOKE_RUN[:-1], "steps=2", f"resume={step}"]
    rc, errors = cli(capsys, *argv)
    assert rc == 2 and len(errors) == 1
    assert f"{step / MANIFEST_NAME} is missing" in errors[0] and "verify_checkpoints=false" in errors[0]
    assert not (out / "checkpoints" / "step_00000002").exists()
    assert cli(capsys, *argv, "verify_checkpoints=false")[0] == 0
    assert json.loads((out / "final" / "trainer_state.json").read_text())["state"]["step"] == state["state"]["step"] + 1


@pytest.mark.parametrize(("argv", "expected"), [
    (["plan", "--config", "smoke", "--gpu-memory", "-80"], "error: --gpu-memory must be > 0, got -80.0"),
    (["plan", "--config", "smoke", "--gpu-memory", "0"], "error: --gpu-memory must be > 0, got 0.0"),
    (["plan", "--config", "smoke", "--gpu-memory", "nan"], "error: --gpu-memory must be > 0, got nan"),
    (["plan", "--config", "smoke", "--tflops", "-1"], "error: --tflops must be > 0, got -1.0"),
    (["plan", "--config", "smoke", "--tflops", "0"], "error: --tflops must be > 0, got 0.0"),
    (["plan", "--config", "smoke", "--gpus", "0"], "error: --gpus must be >= 1, got 0"),
    (["eval", "--checkpoint", "x", "--dataset", "shapes", "--batch-size", "0"],
     "error: --batch-size must be >= 1, got 0"),
    (["eval", "--checkpoint", "x", "--dataset", "shapes", "--shots", "1,0"], "error: --shots must be >= 1, got 0"),
    (["eval", "--checkpoint", "x", "--dataset", "shapes", "--seeds", "0"], "error: --seeds must be >= 1, got 0"),
    (["eval", "--checkpoint", "x", "--dataset", "shapes", "--ep", "0"], "error: --ep must be >= 1, got 0"),
    (["export", "--checkpoint", "x", "--format", "timm", "--out", "y", "--batch-size", "1"],
     "error: --batch-size must be >= 2, got 1"),
    (["train", "--config", "smoke", "parallel.dp_shard=2", "parallel.ep=3"],
     "error: parallel.ep=3 must divide parallel.dp_shard=2 (expert-parallel ranks are borrowed from the sharded "
     "data-parallel ranks); choose ep among [1, 2]"),
])
def test_each_bad_argument_is_refused_naming_its_flag(argv, expected, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # nothing may be written: the folder stays empty
    assert cli(capsys, *argv) == (2, [expected])
    assert list(tmp_path.iterdir()) == []


def test_a_user_error_on_a_rank_other_than_0_exits_quietly(capsys, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    assert cli(capsys, "plan", "--config", "smoke", "--gpus", "0") == (2, [])
    monkeypatch.setenv("RANK", "0")
    assert cli(capsys, "plan", "--config", "smoke", "--gpus", "0") == (2, ["error: --gpus must be >= 1, got 0"])


@pytest.fixture()
def wds_root(tmp_path) -> Path:
    from tests.test_eval_wds import _picture, write_wds

    root = tmp_path / "wds"
    write_wds(root, "test", [(_picture(i % 2, i), i % 2) for i in range(8)], num_shards=2)
    (root / "classnames.txt").write_text("circle\nsquare\n")
    return root


def _eval_wds(capsys, model_folder: Path, root: Path, out: Path) -> tuple[int, list[str]]:
    return cli(capsys, "eval", "--checkpoint", str(model_folder), "--dataset", f"wds:{root}", "--tasks", "zeroshot",
               "--out", str(out), "--no-cache")


def test_eval_refuses_a_wds_shard_cut_at_a_sample_boundary(model_folder, wds_root, tmp_path, capsys):
    import tarfile

    shard = wds_root / "test" / "1.tar"
    with tarfile.open(shard) as tar:
        third_sample = [m for m in tar.getmembers() if m.name.endswith(".png")][2]
    with open(shard, "r+b") as f:
        f.truncate(third_sample.offset)  # whole samples before the cut: a tar reader sees a shorter shard
    rc, errors = _eval_wds(capsys, model_folder, wds_root, tmp_path / "out")
    # Two whole samples precede the cut; the last one is not counted, since its members could have continued
    # past the cut (the reader cannot tell).
    assert rc == 2 and errors == [f"error: {shard} is truncated: no end-of-archive blocks after its last complete "
                                  "sample (1 read); the file was cut (an interrupted copy or download): fetch it "
                                  "again"]
    assert not (tmp_path / "out" / "results.json").exists()


def test_eval_names_the_shard_and_sample_of_a_malformed_label(model_folder, wds_root, tmp_path, capsys):
    from mmsoftmoe.data import TarShard
    from tests.test_eval_wds import _picture

    shard = wds_root / "test" / "0.tar"
    with TarShard(shard) as tar:
        tar.write("s00000", {"png": _picture(0, 0), "cls": b"three\n"})
    rc, errors = _eval_wds(capsys, model_folder, wds_root, tmp_path / "out")
    assert rc == 2 and errors == [f"error: {shard}: sample 's00000' has .cls b'three\\n', not a class index in "
                                  "[0, 2) (classnames.txt has one line per class)"]
    assert not (tmp_path / "out" / "results.json").exists()
