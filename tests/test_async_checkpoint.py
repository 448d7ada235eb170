"""`checkpoint_async=true`: a sharded run's checkpoints staged to host memory and written in the background, still
atomic and verified. Run in one process with `parallel.dp_shard=1` (a sharded run with a process group of one), as
the trainer runs it, against the same run saving synchronously."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

import mmsoftmoe_training.main as train_main
from mmsoftmoe.checkpoint import verify_checkpoint
from mmsoftmoe.parallel import consolidate
from mmsoftmoe_training.checkpointing import find_resume_checkpoint, list_checkpoints
from tests.checkpoint_fixtures import SimulatedKill, run

SHARDED = ["parallel.dp_shard=1", "steps=6", "checkpoint_every=2", "keep_checkpoints=8"]
pytestmark = pytest.mark.slow  # full (short) training runs


def consolidated(checkpoint, out) -> dict[str, torch.Tensor]:
    return load_file(str(consolidate(checkpoint, out) / "open_clip_model.safetensors"))


def test_background_saves_hold_what_blocking_saves_hold(tmp_path, monkeypatch):
    events = []
    for name in ("start_checkpoint", "finish_checkpoint"):
        real = getattr(train_main, name)

        def recorded(*args, _real=real, _name=name, **kwargs):
            result = _real(*args, **kwargs)
            events.append((_name, (result.target if _name == "start_checkpoint" else result).name))
            return result

        monkeypatch.setattr(train_main, name, recorded)
    background = run(tmp_path / "async", *SHARDED, "checkpoint_async=true")
    blocking = run(tmp_path / "sync", *SHARDED)
    assert background == pytest.approx(blocking, abs=0)  # saving in the background changes no step
    # Each background save finished (published) before the next began; the last step saves synchronously.
    assert events == [("start_checkpoint", "step_00000002"), ("finish_checkpoint", "step_00000002"),
                      ("start_checkpoint", "step_00000004"), ("finish_checkpoint", "step_00000004")]
    assert [p.name for p in list_checkpoints(tmp_path / "async")] == ["step_00000002", "step_00000004",
                                                                       "step_00000006"]
    for step in (2, 4):
        folder = tmp_path / "async" / "checkpoints" / f"step_{step:08d}"
        verify_checkpoint(folder, hashes=True)
        got = consolidated(folder, tmp_path / f"a{step}")
        expected = consolidated(tmp_path / "sync" / "checkpoints" / f"step_{step:08d}", tmp_path / f"s{step}")
        assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in got), step


def test_a_run_killed_before_a_background_save_is_published_resumes_from_the_previous_one(tmp_path, monkeypatch):
    real_finish = train_main.finish_checkpoint

    def killed_after_the_step_4_write(pending):
        if pending.target.name == "step_00000004":
            pending.future.result()  # the shards are on disk: only the publication is missing
            raise SimulatedKill("killed before publishing step 4")
        return real_finish(pending)

    out = tmp_path / "run"
    with monkeypatch.context() as patch:
        patch.setattr(train_main, "finish_checkpoint", killed_after_the_step_4_write)
        with pytest.raises(SimulatedKill):
            run(out, *SHARDED, "checkpoint_async=true")
    assert [p.name for p in list_checkpoints(out)] == ["step_00000002"]
    assert (out / "checkpoints" / ".tmp_step_00000004").is_dir()  # written, never published
    assert find_resume_checkpoint("auto", out).name == "step_00000002"

    resumed = run(out, *SHARDED, "checkpoint_async=true")  # resume=auto: the unpublished save is removed
    reference = run(tmp_path / "reference", *SHARDED)
    assert resumed == pytest.approx(reference, abs=1e-6) and sorted(resumed) == list(range(1, 7))
    assert not (out / "checkpoints" / ".tmp_step_00000004").exists()


def test_background_saves_need_a_sharded_run(tmp_path):
    with pytest.raises(ValueError, match="checkpoint_async=true .* only sharded runs"):
        run(tmp_path / "ddp", "checkpoint_async=true")
