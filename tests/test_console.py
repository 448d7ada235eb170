"""What a cluster user reads: no carriage-return progress frames in redirected output, `TQDM_DISABLE` honoured,
warnings every process would repeat shown once, and a quiet export unless `--verbose`."""

import os
import pty
import subprocess
import sys
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent
MMSOFTMOE = str(BIN / "mmsoftmoe")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
ENV.pop("TQDM_DISABLE", None)
SMOKE = ["--config", "smoke", "smoke=true", "data.num_samples=200", "data.num_workers=0", "trackers=[]"]
PROBE = "from mmsoftmoe.console import progress_enabled; print(progress_enabled())"


def _probe(stderr_to_terminal: bool, **env: str) -> str:
    """What `progress_enabled()` says in a fresh process whose stderr is a terminal (a pty) or a pipe."""
    master, slave = pty.openpty()
    try:
        proc = subprocess.run([sys.executable, "-c", PROBE], env={**ENV, **env}, stdout=subprocess.PIPE,
                              stderr=slave if stderr_to_terminal else subprocess.PIPE, text=True, timeout=120)
    finally:
        os.close(master)
        os.close(slave)
    return proc.stdout.strip()


def test_bars_only_on_a_terminal_and_not_with_tqdm_disable():
    assert _probe(stderr_to_terminal=True) == "True"
    assert _probe(stderr_to_terminal=True, TQDM_DISABLE="1") == "False"
    assert _probe(stderr_to_terminal=False) == "False"


@pytest.fixture(scope="module")
def redirected_run(tmp_path_factory) -> tuple[Path, bytes]:
    """A smoke run (training and its final zero-shot evaluation) with stdout and stderr going to one file."""
    out = tmp_path_factory.mktemp("run")
    log = out / "slurm.out"
    with log.open("wb") as handle:
        proc = subprocess.run([MMSOFTMOE, "train", *SMOKE, f"output_dir={out / 'run'}"], cwd=out, env=ENV,
                              stdout=handle, stderr=subprocess.STDOUT, timeout=600)
    assert proc.returncode == 0, log.read_text()[-3000:]
    return out / "run", log.read_bytes()


def test_redirected_run_has_no_carriage_return_frames_but_the_step_lines(redirected_run):
    _, output = redirected_run
    assert b"\r" not in output
    assert b"step 4/4: loss" in output and b"finished at step 4" in output


def _export(checkpoint: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = [MMSOFTMOE, "export", "--checkpoint", str(checkpoint), "--format", "hf,onnx", "--out", str(out), *extra]
    return subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=600)


def test_export_is_quiet_unless_verbose(redirected_run, tmp_path):
    run, _ = redirected_run
    quiet = _export(run / "final", tmp_path / "quiet")
    loud = _export(run / "final", tmp_path / "loud", "--verbose")
    assert quiet.returncode == loud.returncode == 0, quiet.stderr + loud.stderr
    assert quiet.stdout.splitlines()[0].startswith("format") and len(quiet.stdout.splitlines()) == 3
    assert quiet.stderr == ""
    assert "[torch.onnx]" in loud.stdout  # the exporter's chatter the quiet export left out
    assert "Loading weights" not in loud.stderr + quiet.stderr  # no bars into a pipe, asked or not


@pytest.mark.slow
def test_torchrun_shows_each_library_warning_once(tmp_path):
    """open_clip's loss gathers with a deprecated collective, which warns in every process; only rank 0 shows it."""
    cmd = [str(BIN / "torchrun"), "--standalone", "--nproc_per_node", "2", "--no-python", MMSOFTMOE, "train", *SMOKE,
           f"output_dir={tmp_path / 'run'}", "eval.dataset=none"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    warned = [line for line in proc.stderr.splitlines() if "FutureWarning" in line]
    assert warned and len(warned) == len(set(warned))
    assert "\r" not in proc.stderr
