"""Faults around checkpoints: a second run on a held output folder, a stale lock, a full disk mid-save, and a kill
at every point of the save sequence; after each, the next start finds an intact checkpoint."""

from __future__ import annotations

import json
import logging
import resource
import shutil
import signal
import socket
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState

import mmsoftmoe_cli
import mmsoftmoe_training.checkpointing as ckpt
import mmsoftmoe_training.main as train_main
from mmsoftmoe.checkpoint import verify_checkpoint
from mmsoftmoe.models.clip import load_clip, resolve_clip_config
from mmsoftmoe_training.lock import LOCK_NAME, acquire_run_lock
from tests.checkpoint_fixtures import ROOT, SMOKE, SimulatedKill, run
from tests.training_fixtures import MODEL, make_model

HOLD_LOCK = "import sys, time\nfrom training.lock import acquire_run_lock\nwith acquire_run_lock(sys.argv[1]):\n" \
            "    print('held', flush=True)\n    time.sleep(120)\n"


@pytest.mark.slow
def test_a_second_run_refuses_and_a_stale_lock_is_taken_over(tmp_path, capsys, caplog):
    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(out)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        AcceleratorState._reset_state(True)
        argv = ["train", "--config", str(SMOKE), f"output_dir={out}", "eval.dataset=none"]
        assert mmsoftmoe_cli.main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"error: output_dir {out} is in use by another run, pid "
                                                   f"{holder.pid} on host {socket.gethostname()}")
        assert sorted(p.name for p in out.iterdir()) == [LOCK_NAME]  # the refused run wrote nothing
        with acquire_run_lock(out, main_process=False):  # the other processes of a run take no lock
            pass
    finally:
        holder.kill()  # SIGKILL: the holder cannot release its lock file
        holder.wait()
    assert json.loads((out / LOCK_NAME).read_text())["pid"] == holder.pid
    with caplog.at_level(logging.WARNING, logger="mmsoftmoe.train"), acquire_run_lock(out):
        assert json.loads((out / LOCK_NAME).read_text())["pid"] != holder.pid
    assert f"taking over a stale lock left by pid {holder.pid}" in caplog.text
    assert (out / LOCK_NAME).read_text() == ""  # released on exit


@contextmanager
def file_size_limit(limit: int):
    """Writes beyond `limit` bytes fail with EFBIG, as on a full disk (SIGXFSZ ignored, as a writer would see it)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, handler)


def test_torch_and_safetensors_write_failures_are_recognised_as_disk_full(tmp_path):
    from safetensors.torch import save_file

    failures = []
    with file_size_limit(1 << 16):
        for write in (lambda: torch.save(torch.zeros(1 << 20), tmp_path / "t.pt"),
                      lambda: save_file({"x": torch.zeros(1 << 20)}, str(tmp_path / "t.safetensors"))):
            with pytest.raises(Exception) as info:  # noqa: B017  (whatever each writer raises)
                write()
            failures.append(info.value)
    assert all(ckpt.is_disk_full(err) for err in failures), failures
    assert not ckpt.is_disk_full(RuntimeError("size mismatch for visual.proj"))


@pytest.mark.slow
def test_full_disk_mid_save_keeps_the_previous_checkpoint_and_removes_the_temporary_folder(tmp_path, monkeypatch):
    out = tmp_path / "run"
    real_save = train_main.save_checkpoint

    def save_on_a_full_disk(*args, step: int, **kwargs):
        if step < 4:
            return real_save(*args, step=step, **kwargs)
        with file_size_limit(1 << 20):  # the model file (18 MB) does not fit
            return real_save(*args, step=step, **kwargs)

    monkeypatch.setattr(train_main, "save_checkpoint", save_on_a_full_disk)
    with pytest.raises(ckpt.DiskFullError) as info:
        run(out, "steps=6", "checkpoint_every=2")
    previous = out / "checkpoints/step_00000002"
    needed = sum(p.stat().st_size for p in previous.iterdir()) / 2**20
    assert f"no space left on the device holding {out} (needs ~{needed:.0f} MB" in str(info.value)
    assert "step_00000004 was not written" in str(info.value) and "step_00000002 is intact" in str(info.value)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step_00000002"]
    verify_checkpoint(previous, hashes=True)


class Killer:
    """Counts the save's file operations and kills the save (`SimulatedKill`) as operation `at` starts; a kill
    inside a folder deletion first deletes one file of it, as a real kill mid-`rmtree` would."""

    def __init__(self, at: int) -> None:
        self.at, self.calls = at, []

    def wrap(self, name: str, fn):
        def op(*args, **kwargs):
            self.calls.append(name)
            if len(self.calls) == self.at:
                if name == "rmtree":
                    next(p for p in Path(args[0]).rglob("*") if p.is_file()).unlink()
                raise SimulatedKill(f"killed at {name}")
            return fn(*args, **kwargs)
        return op

    def install(self, patch: pytest.MonkeyPatch, accelerator: Accelerator) -> None:
        patch.setattr(accelerator, "save_state", self.wrap("save_state", accelerator.save_state))
        for name in ("write_clip_config", "write_manifest", "fsync_dir"):
            patch.setattr(ckpt, name, self.wrap(name, getattr(ckpt, name)))
        patch.setattr(Path, "rename", self.wrap("rename", Path.rename))
        patch.setattr(shutil, "rmtree", self.wrap("rmtree", shutil.rmtree))


def _save(accelerator, model, out: Path, step: int, tag: str) -> None:
    ckpt.save_checkpoint(accelerator, model, out, step=step, trainer_state={"tag": tag},
                         model_cfg=resolve_clip_config(MODEL), keep=1)


@pytest.mark.parametrize("old_step", [2, 4], ids=["new_step", "same_step_again"])
def test_a_kill_at_any_point_of_a_save_leaves_an_intact_checkpoint(old_step, tmp_path):
    accelerator = Accelerator(cpu=True)
    model, _ = make_model()
    model, _ = accelerator.prepare(model, torch.optim.AdamW(model.parameters()))
    weights = {}
    base = tmp_path / "base"
    _save(accelerator, model, base, old_step, "old")
    weights["old"] = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    weights["new"] = model.state_dict()

    sequence, at = None, 1
    while sequence is None or at <= len(sequence):
        out = tmp_path / f"kill_{at}"
        shutil.copytree(base, out)
        killer = Killer(at)
        with pytest.MonkeyPatch.context() as patch:
            killer.install(patch, accelerator)
            try:
                _save(accelerator, model, out, 4, "new")
                sequence = killer.calls  # no kill: the whole save's operations
            except SimulatedKill:
                pass
        ckpt.remove_unfinished_saves(out)
        found = ckpt.find_resume_checkpoint("auto", out)
        assert found is not None, killer.calls
        tag = json.loads((found / "trainer_state.json").read_text())["tag"]
        done = killer.calls if sequence is not None else killer.calls[:-1]
        published = done.count("rename") >= (2 if old_step == 4 else 1)  # tmp -> step_4 (after step_4 -> aside)
        assert tag == ("new" if published else "old"), killer.calls
        loaded, _, _ = load_clip(found)
        for name, tensor in loaded.state_dict().items():
            assert torch.equal(tensor, weights[tag][name]), (killer.calls, name)
        assert not [p.name for p in (out / "checkpoints").iterdir() if p.name.startswith(".")], killer.calls
        at += 1
    assert sequence[0] == "save_state" and "write_manifest" in sequence and sequence.count("rename") >= 2


def _limit_file_size_to_1mb() -> None:
    """preexec_fn: every write beyond 1 MB fails with EFBIG (SIGXFSZ ignored), in torchrun and its workers."""
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))


@pytest.mark.slow
def test_a_full_disk_during_a_sharded_save_fails_like_an_unsharded_one(tmp_path):
    """Two FSDP2 processes whose DCP shard files (~10 MB each) do not fit: DCP's `CheckpointException` (a
    BaseException) becomes the unsharded path's DiskFullError on every rank, printed once, the temporary folder
    removed."""
    from tests.test_parallel_fit import ENV, torchrun

    out = tmp_path / "run"
    cmd = torchrun(2, "parallel.dp_shard=2", "steps=2", f"output_dir={out}", "eval.dataset=none")
    proc = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300,
                          preexec_fn=_limit_file_size_to_1mb)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode != 0 and len(errors) == 1, proc.stderr[-4000:]
    assert errors[0].startswith(f"error: no space left on the device holding {out} (needs ~"), errors
    assert "step_00000002 was not written and its temporary folder was removed" in errors[0]
    assert "CheckpointException" not in proc.stderr  # no raw DCP traceback from any rank
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == []  # no step folder, no `.tmp_` left


@pytest.mark.slow
def test_a_second_sharded_run_is_refused_once_without_a_traceback_from_another_rank(tmp_path):
    from tests.test_parallel_fit import ENV, torchrun

    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK.replace("from training.", "from mmsoftmoe_training."),
                               str(out)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        proc = subprocess.run(torchrun(2, "parallel.dp_shard=2", f"output_dir={out}"), cwd=ROOT, env=ENV,
                              capture_output=True, text=True, timeout=300)
    finally:
        holder.kill()
        holder.wait()
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode != 0 and len(errors) == 1, proc.stderr[-4000:]
    assert errors[0].startswith(f"error: output_dir {out} is in use by another run, pid {holder.pid}")
    assert not [line for line in proc.stderr.splitlines() if line.startswith("[rank")], proc.stderr[-4000:]
