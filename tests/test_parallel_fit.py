"""The documented sharded training command, run as users run it: `torchrun ... --no-python mmsoftmoe train
parallel.dp_shard=2 parallel.ep=2`, killed with SIGKILL mid-run and resumed, resumed at another process count,
consolidated and exported; each compared with the same run trained in one unsharded process.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import mmsoftmoe_training.main as train_main
from mmsoftmoe.checkpoint import CheckpointError
from mmsoftmoe.models.clip import load_clip
from mmsoftmoe_training.config import load_config
from mmsoftmoe_training.logger import read_metrics
from tests.checkpoint_fixtures import losses
from tests.test_export import load_timm
from tests.test_parallel import failure

ROOT = Path(__file__).resolve().parents[1]
MMSOFTMOE = str(Path(sys.executable).parent / "mmsoftmoe")
STEPS = 8
# The smoke run (micro Soft MoE CLIP, 16 experts), every step logged, a checkpoint every 2 steps, zero-shot
# evaluation on the built-in shapes at step 6 and at the end (a sharded run evaluates its sharded model on every
# process, each on its share of the images).
COMMON = ["--config", "smoke", f"steps={STEPS}", "batch_size=16", "log_every=1", "checkpoint_every=2",
          "keep_checkpoints=8", "data.num_workers=0", "trackers=[]", "eval.every=6"]
EP2 = ["parallel.dp_shard=2", "parallel.ep=2"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}

pytestmark = pytest.mark.slow  # multi-process training runs


def torchrun(nproc: int, *args: str) -> list[str]:
    """The README's command: torchrun starting the installed `mmsoftmoe` entry point on every process."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
            "--no-python", MMSOFTMOE, "train", *COMMON, *args]


def run(cmd: list[str]) -> None:
    proc = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, failure(proc.stderr) or proc.stderr[-4000:]


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "final" / "open_clip_model.safetensors"))


def assert_weights_close(got: dict, expected: dict, atol: float) -> None:
    assert got.keys() == expected.keys()
    worst = max((got[k] - expected[k]).abs().max().item() for k in expected)
    assert worst <= atol, f"largest weight difference {worst:.3g} > {atol}"


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """The same run in one process, unsharded (accelerate, no process group)."""
    out = tmp_path_factory.mktemp("reference")
    train_main.fit(load_config(COMMON[1], COMMON[2:] + [f"output_dir={out}"]))
    return out


def descendants(pid: int) -> list[int]:
    """Every process below `pid`, from /proc."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # the process ended meanwhile
            continue
        parents[int(stat.parent.name)] = int(fields[1])
    found, frontier = [], [pid]
    while frontier:
        children = [child for child, parent in parents.items() if parent in frontier]
        found += children
        frontier = children
    return found


@pytest.fixture(scope="module")
def killed_and_resumed(tmp_path_factory) -> tuple[Path, Path]:
    """A 2-process FSDP2 + ep=2 run killed with SIGKILL (every process) once its step-4 checkpoint is published,
    a copy of what it left, then the same command again (resume=auto)."""
    out = tmp_path_factory.mktemp("ep2")
    proc = subprocess.Popen(torchrun(2, *EP2, f"output_dir={out}"), cwd=ROOT, env=ENV, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    published = out / "checkpoints" / "step_00000004" / "manifest.json"
    deadline = time.monotonic() + 240
    while not published.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    for pid in [proc.pid, *descendants(proc.pid)]:  # torchrun starts its workers in sessions of their own
        os.kill(pid, signal.SIGKILL)
    stderr = proc.communicate()[1]
    assert proc.returncode == -signal.SIGKILL, f"the run ended before it was killed: {stderr[-3000:]}"
    assert not (out / "final").exists()
    left = tmp_path_factory.mktemp("left") / "run"
    shutil.copytree(out, left)
    run(torchrun(2, *EP2, f"output_dir={out}"))
    return out, left


def test_killed_expert_parallel_run_resumes_on_the_uninterrupted_trajectory(reference, killed_and_resumed):
    resumed, _ = killed_and_resumed
    expected, got = losses(reference), losses(resumed)
    assert sorted(got) == list(range(1, STEPS + 1)), "metrics.jsonl must hold each step once after the resume"
    for step in expected:
        assert got[step] == pytest.approx(expected[step], abs=1e-5), step
    assert_weights_close(final_weights(resumed), final_weights(reference), atol=1e-5)
    # The zero-shot evaluations (in-run at step 6 after the resume, and final), run sharded on both processes,
    # equal the unsharded run's, within one of 500 images.
    sharded_eval, reference_eval = ([(r["step"], {k: v for k, v in r.items() if k.startswith("zeroshot/")})
                                     for r in read_metrics(d) if "zeroshot/acc1" in r] for d in (resumed, reference))
    assert [step for step, _ in reference_eval] == [6, STEPS] and len(reference_eval[0][1]) == 3
    assert [step for step, _ in sharded_eval] == [6, STEPS]
    for (_, got), (_, expected) in zip(sharded_eval, reference_eval, strict=True):
        assert got == pytest.approx(expected, abs=1 / 500 + 1e-6)
    # Routing statistics are over both processes' examples: those of the one process that sees the whole batch.
    expected_stats = {r["step"]: r for r in read_metrics(reference) if "loss" in r}
    for record in (r for r in read_metrics(resumed) if "loss" in r):
        stats = {k: v for k, v in record.items() if k.startswith("router/")}
        assert len(stats) >= 6, record
        for key, value in stats.items():
            assert value == pytest.approx(expected_stats[record["step"]][key], abs=1e-5), (record["step"], key)
    checkpoint = resumed / "checkpoints" / f"step_{STEPS:08d}"
    assert sorted(p.name for p in checkpoint.glob("rng_state_*.pt")) == ["rng_state_0.pt", "rng_state_1.pt"]
    assert (checkpoint / "sharded" / ".metadata").is_file()


def test_a_two_process_checkpoint_resumes_in_one_process(reference, killed_and_resumed):
    """The checkpoint the killed run left, resumed by one process (DCP reshards ep=2 -> one process)."""
    _, left = killed_and_resumed
    run([MMSOFTMOE, "train", *COMMON, "parallel.dp_shard=-1", f"output_dir={left}"])
    resumed_at = min(s for s, _ in losses(left).items() if s > 4)
    assert resumed_at == 5 or (left / "checkpoints" / f"step_{resumed_at - 1:08d}").is_dir()
    for step, loss in losses(reference).items():
        assert losses(left)[step] == pytest.approx(loss, abs=1e-5), step
    assert_weights_close(final_weights(left), final_weights(reference), atol=1e-5)


def test_consolidate_then_export_gives_the_unsharded_runs_encoder(reference, killed_and_resumed, tmp_path):
    resumed, _ = killed_and_resumed
    step = resumed / "checkpoints" / f"step_{STEPS:08d}"
    for cmd in ([MMSOFTMOE, "consolidate", str(step), str(tmp_path / "model")],
                [MMSOFTMOE, "export", "--checkpoint", str(tmp_path / "model"), "--format", "timm",
                 "--out", str(tmp_path / "timm")]):
        run(cmd)
    consolidated = load_file(str(tmp_path / "model" / "open_clip_model.safetensors"))
    assert_weights_close(consolidated, final_weights(resumed), atol=0.0)  # final/ is that step's weights
    encoder = load_timm(tmp_path / "timm")
    unsharded, _, _ = load_clip(reference / "final")
    pixels = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        difference = (encoder(pixels) - unsharded.eval().encode_image(pixels)).abs().max().item()
    assert difference <= 1e-5, difference


def test_a_ddp_run_refuses_a_sharded_checkpoint_with_the_way_to_resume_it(killed_and_resumed, tmp_path):
    resumed, _ = killed_and_resumed
    checkpoint = resumed / "checkpoints" / "step_00000004"
    cfg = load_config("smoke", COMMON[2:] + [f"output_dir={tmp_path}", f"resume={checkpoint}"])
    with pytest.raises(CheckpointError, match=r"sharded training state.*parallel.dp_shard=-1.*mmsoftmoe consolidate"):
        train_main.fit(cfg)


def test_dp_shard_minus_one_takes_every_process_of_a_replica():
    par = load_config("smoke", ["parallel.dp_shard=-1", "parallel.dp_replicate=2"]).parallel
    assert par.sharded and par.shard_size(8) == 4
    with pytest.raises(ValueError, match=r"6 processes do not split into 4 replicas"):
        load_config("smoke", ["parallel.dp_shard=-1", "parallel.dp_replicate=4"]).parallel.shard_size(6)
    assert load_config("smoke", ["parallel.dp_shard=3"]).parallel.shard_size(8) == 3  # check_layout rejects it later


# Fine-tuning without the step's own randomness (mixup, cutmix, drop path): then one process with a batch of 16
# and two with 8 each train on the same global batches, augmented alike (eval.finetune.SeededSamples). The probes
# and fine-tuning learn from the 500 test images (not the 2000 train ones): the comparison is the point, and a
# quarter of the work keeps the suite short.
FINETUNE = ["--train-split", "test", "--ft-epochs", "1", "--ft-mixup", "0", "--ft-cutmix", "0",
            "--ft-drop-path-rate", "0", "--ft-warmup-epochs", "0"]


def evaluate(out: Path, checkpoint: Path, nproc: int, tasks: str, *extra: str) -> tuple[dict, str]:
    """`mmsoftmoe eval` as users run it (under torchrun for nproc > 1): the shapes results and the log."""
    cmd = [MMSOFTMOE, "eval", "--checkpoint", str(checkpoint), "--dataset", "shapes", "--tasks", tasks,
           "--shots", "1,5", "--seeds", "1", "--no-cache", "--out", str(out), *extra]
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
               "--no-python", *cmd]
    proc = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, failure(proc.stderr) or proc.stderr[-4000:]
    return json.loads((out / "results.json").read_text())["shapes"], proc.stderr


def flat(metrics: dict, prefix: str = "") -> dict[str, float]:
    out = {}
    for key, value in metrics.items():
        if isinstance(value, dict):
            out |= flat(value, f"{prefix}{key}/")
        elif isinstance(value, int | float):
            out[f"{prefix}{key}"] = value
    return out


def train_log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "finetune" / "shapes" / "train_log.jsonl").read_text().splitlines()]


def test_eval_under_torchrun_runs_the_sharded_checkpoint_on_every_process(killed_and_resumed, tmp_path):
    """`torchrun --nproc_per_node 2 mmsoftmoe eval` on a checkpoint of the ep=2 run: the model sharded over both
    processes (ep=2, from the run), each on its share of the data; equal to one process evaluating the whole model
    (`final/`, the same weights), fine-tuning included (the classifier sharded the same way)."""
    resumed, _ = killed_and_resumed
    step = resumed / "checkpoints" / f"step_{STEPS:08d}"
    tasks = "zeroshot,retrieval,fewshot,finetune"
    sharded, log = evaluate(tmp_path / "sharded", step, 2, tasks, *FINETUNE, "--ft-batch-size", "8")
    assert "sharded over 2 processes (FSDP2), experts split over ep=2" in log
    whole, _ = evaluate(tmp_path / "whole", resumed / "final", 1, tasks, *FINETUNE, "--ft-batch-size", "16")
    for task in ("zeroshot", "retrieval", "fewshot"):
        assert flat(sharded[task]) == pytest.approx(flat(whole[task]), abs=1e-6), task
    assert sharded["num_samples"] == whole["num_samples"] == dict.fromkeys(tasks.split(","), 500)
    got, expected = train_log(tmp_path / "sharded"), train_log(tmp_path / "whole")
    assert len(got) == len(expected) == 500 // 16  # one epoch of global batches of 16
    assert [r["lr"] for r in got] == pytest.approx([r["lr"] for r in expected], rel=1e-9)
    assert [r["loss"] for r in got] == pytest.approx([r["loss"] for r in expected], abs=1e-4)
    ft = {k: sharded["finetune"][k] for k in ("acc1", "acc5", "mean_per_class_recall")}
    assert ft == pytest.approx({k: whole["finetune"][k] for k in ft}, abs=1 / 500 + 1e-6)
    classifier = {run: load_file(str(tmp_path / run / "finetune/shapes/classifier.safetensors"))
                  for run in ("sharded", "whole")}
    assert_weights_close(classifier["sharded"], classifier["whole"], atol=1e-4)
    # The single-file model under torchrun: every process holds it whole (DDP fine-tuning), each evaluates its share.
    replicated, log = evaluate(tmp_path / "replicated", resumed / "final", 2, "zeroshot,finetune", *FINETUNE,
                               "--ft-batch-size", "8")
    assert "sharded over" not in log and replicated["zeroshot"] == pytest.approx(whole["zeroshot"], abs=1e-6)
    assert [r["loss"] for r in train_log(tmp_path / "replicated")] == pytest.approx([r["loss"] for r in expected],
                                                                                    abs=1e-4)


def test_eval_under_torchrun_refuses_a_damaged_shard_once(killed_and_resumed, tmp_path):
    """The main process verifies the checkpoint; every process stops, and one `error:` line names the shard."""
    resumed, _ = killed_and_resumed
    damaged = tmp_path / "step"
    shutil.copytree(resumed / "checkpoints" / f"step_{STEPS:08d}", damaged)
    shard = sorted((damaged / "sharded").glob("*.distcp"))[-1]
    data = bytearray(shard.read_bytes())
    data[-64:] = b"\x7f" * 64  # same size, other bytes
    shard.write_bytes(bytes(data))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "--no-python",
           MMSOFTMOE, "eval", "--checkpoint", str(damaged), "--dataset", "shapes", "--tasks", "zeroshot",
           "--out", str(tmp_path / "out")]
    proc = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode != 0 and errors == [f"error: {shard} is damaged: its content differs from manifest.json "
                                               "(xxh3_128)"], proc.stderr[-3000:]
    assert not (tmp_path / "out").exists()
