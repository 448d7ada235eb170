"""The `mmsoftmoe` command as users run it: several CPU processes under torchrun, discoverable keys, shipped
configs by name from any folder, a run folder that explains itself, and one error contract for every command."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

import mmsoftmoe_cli as cli
import mmsoftmoe_training.main as train_main
from mmsoftmoe.export import FORMATS
from mmsoftmoe_training.config import config_yaml, load_config, valid_keys

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
MMSOFTMOE = str(BIN / "mmsoftmoe")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
RUN = ["eval.dataset=none", "data.num_workers=0", "batch_size=16", "log_every=1", "trackers=[]"]


def mmsoftmoe(*args: str, cwd: Path = ROOT, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([MMSOFTMOE, *args], cwd=cwd, env=ENV, capture_output=True, text=True, timeout=timeout)


def losses(run: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records if "loss" in r]
    assert len(steps) == len(set(steps)), f"metrics.jsonl holds steps twice: {steps}"
    return {r["step"]: r["loss"] for r in records if "loss" in r}


@pytest.mark.slow
def test_torchrun_two_cpu_processes_train_one_run_equal_to_one_process(tmp_path):
    """The documented command: two ranks split each global batch and all-reduce gradients, so the run equals
    one process on the whole batch; two independent copies would each log a line per step and would not share
    one process group (the summary names the world size)."""
    overrides = ["smoke=true", *RUN, "steps=3", "checkpoint_every=100"]
    cmd = [str(BIN / "torchrun"), "--standalone", "--nproc_per_node", "2", "--no-python", MMSOFTMOE, "train",
           "--config", "smoke", f"output_dir={tmp_path / 'two'}", *overrides]
    proc = subprocess.run(cmd, cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = (tmp_path / "two" / "train.log").read_text()
    assert "2 process(es) on cpu" in log and "8 per process" in log
    assert log.count("step 3/3: loss") == 1  # one rank writes the log

    train_main.fit(load_config("smoke", [f"output_dir={tmp_path / 'one'}", *overrides]))
    two, one = losses(tmp_path / "two"), losses(tmp_path / "one")
    assert sorted(two) == [1, 2, 3]
    for step in two:
        assert two[step] == pytest.approx(one[step], abs=1e-5), step
    w2 = load_file(str(tmp_path / "two" / "final" / "open_clip_model.safetensors"))
    w1 = load_file(str(tmp_path / "one" / "final" / "open_clip_model.safetensors"))
    for name in w1:
        torch.testing.assert_close(w2[name], w1[name], atol=1e-5, rtol=1e-4, msg=name)


def test_refuses_to_run_as_independent_copies(monkeypatch, tmp_path):
    class OneProcess:  # what accelerate reports when it was not told how the processes were launched
        num_processes = 1

        def __init__(self, **kwargs):
            pass

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(train_main, "Accelerator", OneProcess)
    with pytest.raises(RuntimeError, match="WORLD_SIZE=2 processes were launched, but accelerate sees 1"):
        train_main.build_accelerator(load_config("smoke", [f"output_dir={tmp_path}", "trackers=[]"]))


def test_help_config_lists_every_key_with_type_default_and_meaning(capsys):
    assert cli.main(["train", "--help-config"]) == 0  # as a process: tests/test_readme.py runs the README line
    lines = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()}
    assert set(lines) == set(valid_keys())
    defaults = load_config(None)
    for key, line in lines.items():
        value = defaults
        for part in key.split("."):
            value = getattr(value, part)
        assert repr(value) in line, line
        assert len(line.split(repr(value), 1)[1].strip()) > 5, f"{key} has no meaning"


def test_print_config_reads_back_to_the_same_config_from_any_folder(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert cli.main(["train", "--config", "demo", "--print-config", "steps=7", "smoke=true"]) == 0
    stdout = capsys.readouterr().out
    printed = tmp_path / "printed.yaml"
    printed.write_text(stdout)
    assert load_config(printed) == load_config("demo", ["steps=7", "smoke=true"]) == load_config(
        ROOT / "configs" / "demo.yaml", ["steps=7", "smoke=true"])
    assert yaml.safe_load(stdout)["steps"] == 7


@pytest.mark.parametrize(("args", "message"), [
    (["train", "--config", "smoke", "checkpoint_every=0"], "checkpoint_every must be >= 1, got 0"),
    (["train", "--config", "no-such-config"], "neither a file nor a shipped config; shipped: ['demo'"),
    (["train", "--config", "smoke", "optim.lrr=1"], "unknown config key 'optim.lrr'"),
    (["train", "--config", "smoke", "data.source=/no/such/pairs"], "data.source: '/no/such/pairs' does not exist"),
    (["eval", "--checkpoint", "/no/such/ckpt", "--dataset", "digits"], "/no/such/ckpt"),
    (["export", "--checkpoint", "/no/such/ckpt", "--format", "timm", "--out", "x"], "/no/such/ckpt"),
])
def test_user_errors_print_one_error_line_and_exit_2(args, message, tmp_path, monkeypatch, capsys):
    """The dispatcher's contract, in this process (`mmsoftmoe_cli.main` is the console script's entry point);
    the test below runs one case as a real process."""
    monkeypatch.chdir(tmp_path)
    assert cli.main(list(args)) == 2
    stderr = capsys.readouterr().err
    assert "Traceback" not in stderr
    errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and message in errors[0], stderr[-2000:]


@pytest.mark.slow
def test_a_user_error_in_the_installed_command_is_one_line_and_status_2(tmp_path):
    proc = mmsoftmoe("train", "--config", "smoke", "optim.lrr=1", cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1].startswith("error: unknown config key 'optim.lrr'")
    assert "Traceback" not in proc.stderr


def test_output_dir_that_is_a_file_is_rejected_before_anything_is_built(tmp_path):
    (tmp_path / "taken").write_text("")
    with pytest.raises(ValueError, match="is a file, not a folder"):
        load_config("smoke", [f"output_dir={tmp_path / 'taken'}"])


def test_missing_tracker_package_is_an_error(tmp_path, monkeypatch):
    monkeypatch.setattr(train_main.importlib.util, "find_spec", lambda name: None)
    cfg = load_config("smoke", [f"output_dir={tmp_path}", "trackers=[wandb]"])
    with pytest.raises(ValueError, match="'wandb' needs the package 'wandb', which is not installed"):
        train_main.fit(cfg)
    with pytest.raises(ValueError, match="unknown tracker 'tensorbord'"):
        train_main.check_trackers(["tensorbord"])


@pytest.mark.slow
def test_run_folder_explains_itself_and_extending_says_so(tmp_path):
    cfg = load_config("smoke", [f"output_dir={tmp_path}", *RUN, "steps=2", "checkpoint_every=2"])
    train_main.fit(cfg)
    assert load_config(tmp_path / "config.yaml") == cfg
    assert (tmp_path / "config.yaml").read_text() == config_yaml(cfg)
    log = (tmp_path / "train.log").read_text()
    assert "SoftMoE-Micro-4-32" in log and "20000 samples, 0.0016 epochs in 2 steps" in log
    assert "batch 16 global, 16 per process" in log and "starting at step 0" in log
    assert [line.split(": loss")[0].rsplit(" ", 1)[-1] for line in log.splitlines() if ": loss " in line] == [
        "1/2", "2/2"]
    assert "Saving current state" not in log

    train_main.fit(load_config("smoke", [f"output_dir={tmp_path}", *RUN, "steps=3", "checkpoint_every=2"]))
    log = (tmp_path / "train.log").read_text()
    assert "extending a finished run: it trained 2 of 2 steps and now runs to 3" in log
    assert "resuming at step 2" in log and sorted(losses(tmp_path)) == [1, 2, 3]


def test_readme_commands_use_the_mmsoftmoe_entry_point():
    """Nothing documented depends on the top-level names `training` / `eval` resolving to ours."""
    readme = (ROOT / "README.md").read_text()
    assert "-m training." not in readme and "-m eval." not in readme
    assert shutil.which("mmsoftmoe", path=str(BIN))


def test_top_level_help_names_the_export_formats_as_export_accepts_them(capsys):
    assert cli.main(["--help"]) == 0
    export_line = next(line for line in capsys.readouterr().out.splitlines() if line.strip().startswith("export"))
    named = re.findall(r"\b(\w+)(?=[,)])", export_line.split("(", 1)[1])
    assert named == list(FORMATS)
