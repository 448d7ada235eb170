"""The edges of a run, through the command users run (`mmsoftmoe train`, in-process): everything the run will use
later is checked before anything is created, a refused start leaves a fresh folder as it found it, errors reach
`train.log`, and the end of a run saves the last checkpoint and `final/` before the final evaluation can fail."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from PIL import Image

import mmsoftmoe_training.main as train_main
from mmsoftmoe.checkpoint import verify_checkpoint
from mmsoftmoe_cli import main as mmsoftmoe
from mmsoftmoe_training.logger import read_metrics

RUN = ["smoke=true", "data.num_workers=0", "batch_size=16", "trackers=[]", "checkpoint_every=2", "log_every=1"]


def train(out: Path, capsys, *overrides: str) -> tuple[int, list[str]]:
    """Exit status and the `error:` lines of `mmsoftmoe train --config smoke ...`."""
    capsys.readouterr()
    rc = mmsoftmoe(["train", "--config", "smoke", f"output_dir={out}", *RUN, *overrides])
    return rc, [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]


def class_folders(root: Path, split: str = "test") -> Path:
    """Two classes of four solid-colour images each, in ROOT/<split>/<class>/ (what `folder:ROOT` reads)."""
    for name, colour in (("red", (255, 0, 0)), ("blue", (0, 0, 255))):
        (root / split / name).mkdir(parents=True)
        for i in range(4):
            Image.new("RGB", (32, 32), colour).save(root / split / name / f"{i}.png")
    return root


@pytest.mark.parametrize("spec, problem", [
    ("imagenet", "Unknown dataset kind 'imagenet'"),
    ("folder:{tmp}/missing", "No split folder"),
    ("hf:{tmp}/missing", "No Hugging Face dataset"),
])
def test_a_bad_eval_dataset_is_refused_before_anything_is_built(tmp_path, capsys, monkeypatch, spec, problem):
    built = []
    monkeypatch.setattr(train_main, "build_strategy", lambda *a: built.append(a))
    out = tmp_path / "run"
    rc, errors = train(out, capsys, f"eval.dataset={spec.format(tmp=tmp_path)}")
    assert rc == 2 and len(errors) == 1, errors
    assert errors[0].startswith(f"error: eval.dataset={spec.format(tmp=tmp_path)!r}") and problem in errors[0]
    assert not built and not out.exists()  # nothing built, no folder created


def test_a_run_refused_at_start_leaves_a_fresh_folder_as_it_found_it(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    for out in (tmp_path / "new", empty):  # refused while building the model, after the folder was taken
        rc, errors = train(out, capsys, "eval.dataset=none", f"model.pretrained={tmp_path / 'no_such_weights'}")
        assert rc == 2 and len(errors) == 1 and "no_such_weights" in errors[0], errors
    assert not (tmp_path / "new").exists() and empty.is_dir() and not any(empty.iterdir())


@pytest.mark.slow
def test_errors_reach_train_log_of_an_existing_run(tmp_path, capsys):
    out = tmp_path / "run"
    assert train(out, capsys, "eval.dataset=none", "steps=2")[0] == 0
    rc, errors = train(out, capsys, "eval.dataset=none", "steps=4", "model.name=Dense-Micro-4-32")
    assert rc == 2 and len(errors) == 1 and "model.name" in errors[0]
    assert errors[0] in (out / "train.log").read_text()  # the same line, where a cluster user reads
    assert (out / "final").is_dir() and (out / "checkpoints/step_00000002").is_dir()  # the earlier run's, kept


@pytest.mark.slow
def test_a_failing_final_evaluation_loses_nothing(tmp_path, capsys, monkeypatch):
    data = class_folders(tmp_path / "data")
    real_step = train_main.optimizer_step
    steps = []

    def remove_the_dataset_at_the_last_step(*args, **kwargs):
        steps.append(1)
        if len(steps) == 4:
            shutil.rmtree(data)
        return real_step(*args, **kwargs)

    monkeypatch.setattr(train_main, "optimizer_step", remove_the_dataset_at_the_last_step)
    out = tmp_path / "run"
    rc, errors = train(out, capsys, f"eval.dataset=folder:{data}", "steps=4")
    assert rc == 2 and len(errors) == 1 and "No split folder" in errors[0], errors
    for folder in (out / "final", out / "checkpoints/step_00000004"):
        verify_checkpoint(folder, hashes=True)
        assert json.loads((folder / "trainer_state.json").read_text())["step"] == 4
    log = (out / "train.log").read_text()
    assert "the final evaluation failed" in log and errors[0] in log


@pytest.mark.slow
def test_the_final_metrics_are_recorded_in_final_and_no_empty_rows_are_logged(tmp_path, capsys):
    data = class_folders(tmp_path / "data")
    assert train(tmp_path / "eval", capsys, f"eval.dataset=folder:{data}", "steps=2")[0] == 0
    records = read_metrics(tmp_path / "eval")
    final = json.loads((tmp_path / "eval/final/trainer_state.json").read_text())
    verify_checkpoint(tmp_path / "eval/final", hashes=True)  # rewritten with its metrics, still verified
    assert final["metrics"] and final["metrics"] == {k: v for k, v in records[-1].items() if k != "step"}
    correct = final["metrics"]["zeroshot/acc1"] * 8  # of two classes of four images: a whole count
    assert correct == pytest.approx(round(correct), abs=1e-6)

    assert train(tmp_path / "none", capsys, "eval.dataset=none", "steps=2", "log_every=5")[0] == 0
    records = read_metrics(tmp_path / "none")
    assert [r["step"] for r in records] == [2] and "loss" in records[0]  # the last step logs; nothing empty
    assert records[0]["epoch"] == pytest.approx(2 * 16 / 20_000)  # 2 steps of 16 of the smoke config's 20k pairs
    assert "step 2/2: loss" in (tmp_path / "none/train.log").read_text() and ", epoch 0.00" in (
        tmp_path / "none/train.log").read_text()
