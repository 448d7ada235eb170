"""Every code block in README.md runs, as written or as a declared cheap twin, in a fresh folder.

A bash line runs as written unless `TWINS` names it: then it runs with arguments appended (a smoke size of the same
command) or, where it needs hardware CI lacks, as a named replacement. A README line missing from both fails here,
so the README cannot drift from what the commands do. Lines run in README order in one folder: the demo's run folder
is what the eval and export lines read.
"""

import contextlib
import json
import os
import re
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import open_clip
import pytest
import torch
import yaml
from safetensors.torch import load_file

from mmsoftmoe.models.clip import load_clip
from mmsoftmoe_eval.datasets import build_dataset
from mmsoftmoe_eval.zero_shot import zero_shot_metrics

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
       "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}
SMOKE = "smoke=true data.num_workers=0 trackers=[]"


def readme_blocks(language: str) -> list[str]:
    text = (ROOT / "README.md").read_text()
    return [body for lang, body in re.findall(r"^```(\w*)\n(.*?)^```", text, re.M | re.S) if lang == language]


def bash_lines() -> list[str]:
    lines = [line.split("  #")[0].strip() for block in readme_blocks("bash") for line in block.splitlines()]
    return [line for line in lines if line and not line.startswith("#")]


def _demo_table(cwd: Path, out: str) -> None:
    table = (cwd / "runs/demo/results.md").read_text()

    def value(row: str) -> str:
        return next(line for line in table.splitlines() if row in line).rstrip(" |").rsplit("|", 1)[1].strip()

    assert value("| shapes   | zero-shot top-1") == f"{shapes_zero_shot(cwd / 'runs/demo/final')['acc1']:.3f}"
    for row in ("10-shot ridge top-1", "image->text / text->image R@1"):
        float(value(row).split("/")[0].split("±")[0])  # a number, not only a label
    for fmt in ("onnx", "torch_export"):
        report = json.loads((cwd / "runs/demo/export" / fmt / "export_report.json").read_text())
        assert value(f"{fmt}: max abs diff vs eager") == f"{report['parity']['max_abs_diff']:.2g}"
    for fmt in ("timm", "open_clip", "hf", "onnx", "torch_export"):
        assert (cwd / "runs/demo/export" / fmt / "export_report.json").is_file()
    assert (cwd / "runs/demo/training.png").is_file()


def _final(run: str) -> Callable[[Path, str], None]:
    def check(cwd: Path, out: str) -> None:
        assert (cwd / "runs" / run / "final" / "open_clip_model.safetensors").is_file()
    return check


def _help_config(cwd: Path, out: str) -> None:
    assert "optim.lr" in out and "global batch per optimizer step" in out


def _print_config(cwd: Path, out: str) -> None:
    assert yaml.safe_load(out)["model"]["name"] == "SoftMoE-Micro-4-32"


def shapes_zero_shot(checkpoint: Path) -> dict[str, float]:
    """Zero-shot metrics on the shapes test split, from features computed here by a plain forward of `checkpoint`
    (open_clip's own eval transform and zero-shot classifier)."""
    model, tokenizer, config = load_clip(checkpoint)
    cfg = config["preprocess_cfg"]
    dataset = build_dataset("shapes", "test", open_clip.image_transform(cfg["size"], is_train=False, mean=cfg["mean"],
                                                                        std=cfg["std"]))
    images, labels = zip(*(dataset[i] for i in range(len(dataset))), strict=True)
    with torch.inference_mode():
        features = torch.cat([model.encode_image(torch.stack(images[i:i + 100])) for i in range(0, len(images), 100)])
        classifier = open_clip.build_zero_shot_classifier(model, tokenizer, dataset.classnames, dataset.templates,
                                                          device="cpu", use_tqdm=False)
    return zero_shot_metrics(features, torch.as_tensor(labels), classifier)


def _eval(cwd: Path, out: str) -> None:
    results = json.loads((cwd / "eval_results/results.json").read_text())
    assert {"shapes", "digits"} <= set(results)
    assert results["shapes"]["zeroshot"] == pytest.approx(shapes_zero_shot(cwd / "runs/demo/final"), abs=1e-6)


def _export(cwd: Path, out: str) -> None:
    for fmt in ("timm", "open_clip", "hf", "onnx", "torch_export"):
        report = json.loads((cwd / "exports/demo" / fmt / "export_report.json").read_text())
        assert report["parity"]["max_abs_diff"] < 1e-4, fmt


def _sharded_smoke(cwd: Path, out: str) -> None:
    step = cwd / "runs/smoke/checkpoints/step_00000020"
    assert (step / "sharded" / ".metadata").is_file() and (step / "rng_state_1.pt").is_file()
    assert (cwd / "runs/smoke/final/open_clip_model.safetensors").is_file()


def _consolidated(cwd: Path, out: str) -> None:
    got = load_file(str(cwd / "runs/smoke_step20/open_clip_model.safetensors"))
    final = load_file(str(cwd / "runs/smoke/final/open_clip_model.safetensors"))  # the same step's weights
    assert got.keys() == final.keys() and all(torch.equal(got[k], final[k]) for k in final)


def _sharded_eval(cwd: Path, out: str) -> None:
    results = json.loads((cwd / "runs/smoke_eval/results.json").read_text())["shapes"]
    assert results["num_samples"] == {"zeroshot": 500, "finetune": 500}
    assert 0 <= results["finetune"]["acc1"] <= 1 and (cwd / "runs/smoke_eval/finetune/shapes/train_log.jsonl").is_file()
    assert out.count("| shapes / zeroshot | acc1 |") == 1  # two processes evaluated; the main one printed


def _plan(cwd: Path, out: str) -> None:
    assert "13.452B parameters" in out and "fastest layout that fits: fsdp2+ep" in out
    assert re.search(r"^ddp .* no$", out, re.M)  # L/16 does not fit 80 GB under DDP


TRAIN_TWIN = f"{SMOKE} eval.dataset=none"
# The GPU-cluster lines run at smoke size on 2 CPU processes with ep=2 (one process for `accelerate launch --cpu`).
CLUSTER_TWIN = f"{TRAIN_TWIN} parallel.ep=2"
SLURM_ENV = "SLURM_NNODES=1 SRUN= MASTER_ADDR=127.0.0.1 MASTER_PORT=29531 GPUS_PER_NODE=2"
# README line -> (how it runs here, why, what it must have produced)
TWINS: dict[str, tuple[str, str, Callable | None]] = {
    "make demo": ("skip", "runs `mmsoftmoe demo` after the install (checked against the Makefile below)", None),
    "make test": ("skip", "this suite is `make test`", None),
    "mmsoftmoe demo": ("append", SMOKE, _demo_table),
    "mmsoftmoe train --config demo optim.lr=1e-3 steps=300": ("append", f"{TRAIN_TWIN} steps=2 output_dir=runs/t1",
                                                               _final("t1")),
    "mmsoftmoe train --config demo smoke=true": ("append", f"{TRAIN_TWIN} output_dir=runs/t2", _final("t2")),
    "torchrun --nproc_per_node 2 --no-python mmsoftmoe train --config smoke": (
        "append", f"{TRAIN_TWIN} output_dir=runs/t3", _final("t3")),
    "accelerate launch --multi_gpu --num_processes 8 --no_python mmsoftmoe train --config softmoe_b16_sigmoid_256": (
        "replace", "accelerate launch --cpu --num_processes 1 --no_python mmsoftmoe train --config "
                   f"softmoe_b16_sigmoid_256 {TRAIN_TWIN} output_dir=runs/t4", _final("t4")),
    "mmsoftmoe train --config smoke model.name=Dense-Micro-4-32 output_dir=runs/dense": (
        "append", TRAIN_TWIN, _final("dense")),
    "mmsoftmoe train --config smoke model.upcycle_from=runs/dense/final/open_clip_model.safetensors "
    "output_dir=runs/up": ("append", TRAIN_TWIN, _final("up")),
    "mmsoftmoe train --config lit_locked_image model.pretrained=runs/up/final": (
        "append", f"{TRAIN_TWIN} output_dir=runs/lit", _final("lit")),
    "mmsoftmoe eval --checkpoint runs/demo/final --dataset shapes digits --tasks zeroshot,retrieval,fewshot,linprobe": (
        "append", "", _eval),
    "mmsoftmoe export --checkpoint runs/demo/final --format all --out exports/demo": ("append", "", _export),
    "torchrun --nproc_per_node 2 --no-python mmsoftmoe train --config smoke parallel.dp_shard=2 parallel.ep=2": (
        "append", "data.num_workers=0 trackers=[] eval.dataset=none", _sharded_smoke),  # 20 steps, as written
    "torchrun --nproc_per_node 8 --no-python mmsoftmoe train --config softmoe_l16_sigmoid": (
        "replace", "torchrun --nproc_per_node 2 --no-python mmsoftmoe train --config softmoe_l16_sigmoid "
                   f"{CLUSTER_TWIN} output_dir=runs/l16", _final("l16")),
    "accelerate launch --config_file configs/accelerate/one_node_8gpu.yaml --no_python mmsoftmoe train --config "
    "softmoe_l16_sigmoid": (
        "replace", f"accelerate launch --config_file {ROOT}/configs/accelerate/one_node_8gpu.yaml --cpu "
                   "--num_processes 1 --mixed_precision no --no_python mmsoftmoe train --config softmoe_l16_sigmoid "
                   f"{TRAIN_TWIN} output_dir=runs/l16acc", _final("l16acc")),
    "sbatch --nodes 4 scripts/slurm_train.sbatch --config softmoe_h14_sigmoid": (
        "replace", f"{SLURM_ENV} bash {ROOT}/scripts/slurm_train.sbatch --config softmoe_h14_sigmoid {CLUSTER_TWIN} "
                   "output_dir=runs/h14", _final("h14")),
}
OWN_DATA = "mmsoftmoe train --config softmoe_b16_sigmoid_256 data.streaming=true data.resampled=true data.source="
LAION = '"s3://bucket/laion/{00000..41455}.tar"'
MIX = '"s3://bucket/laion/{00000..41455}.tar::s3://bucket/cc12m/{0000..1242}.tar" data.source_weights=[1,4]'
SMALL = {"{00000..41455}": "{00000..00002}", "{0000..1242}": "{0000..0001}"}  # the loopback bucket's shard ranges


def _small(command: str) -> str:
    for big, small in SMALL.items():
        command = command.replace(big, small)
    return f"{command} {TRAIN_TWIN} data.num_workers=1 steps=2"


def _shards(cwd: Path, out: str) -> None:
    summary = json.loads((cwd / "my_shards/summary.json").read_text())
    assert summary["samples"] == 24 and len(summary["shards"]) == 1 and not summary["skipped"]


@contextlib.contextmanager
def _pairs_folder(cwd: Path) -> Iterator[dict]:
    from tests.training_fixtures import shapes_image_folder, write_metadata

    write_metadata(cwd / "my_pairs", shapes_image_folder(cwd / "my_pairs", 24))
    yield {}


@contextlib.contextmanager
def _loopback_s3(cwd: Path) -> Iterator[dict]:
    """s3://bucket/laion/0000{0,1,2}.tar and s3://bucket/cc12m/000{0,1}.tar on a moto server; its AWS_* settings."""
    from benchmarks.servers import s3_server, upload
    from tests.test_data_streaming import write_shards

    with s3_server() as endpoint:
        for prefix, count, pattern in (("laion", 3, "{:05d}.tar"), ("cc12m", 2, "{:04d}.tar")):
            paths = write_shards(cwd / "s3data" / prefix, count)
            upload(endpoint, "bucket", prefix, [Path(p).rename(Path(p).with_name(pattern.format(i)))
                                                for i, p in enumerate(paths)])
        yield {k: v for k, v in os.environ.items() if k.startswith("AWS_")}


# README lines that need data or a server first: the context makes it and gives the line's extra environment.
CONTEXTS = {"mmsoftmoe shards my_pairs my_shards --samples-per-shard 10000 --resize 256": _pairs_folder,
            OWN_DATA + LAION: _loopback_s3, OWN_DATA + MIX: _loopback_s3}
TWINS.update({OWN_DATA + LAION: ("replace", _small(OWN_DATA + LAION) + " output_dir=runs/laion", _final("laion")),
              OWN_DATA + MIX: ("replace", _small(OWN_DATA + MIX) + " output_dir=runs/mix", _final("mix"))})
RUN_AS_WRITTEN = {"mmsoftmoe shards my_pairs my_shards --samples-per-shard 10000 --resize 256": _shards,
                  "mmsoftmoe train --help-config": _help_config,
                  "mmsoftmoe train --config demo --print-config": _print_config,
                  "mmsoftmoe consolidate runs/smoke/checkpoints/step_00000020 runs/smoke_step20": _consolidated,
                  "torchrun --nproc_per_node 2 --no-python mmsoftmoe eval --checkpoint "
                  "runs/smoke/checkpoints/step_00000020 --dataset shapes --tasks zeroshot,finetune --ft-epochs 1 "
                  "--out runs/smoke_eval": _sharded_eval,
                  "mmsoftmoe plan --config softmoe_l16_sigmoid --gpus 64 --gpu-memory 80": _plan}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("readme")


def test_every_bash_line_is_declared():
    """A new README command must be added here: run as written (with a check) or with a declared twin."""
    assert set(bash_lines()) == set(TWINS) | set(RUN_AS_WRITTEN)
    assert "$(VENV)/bin/mmsoftmoe demo\n" in (ROOT / "Makefile").read_text()


@pytest.mark.slow
@pytest.mark.parametrize("line", bash_lines(), ids=[f"{i}:{line[:60]}" for i, line in enumerate(bash_lines())])
def test_bash_line_runs(line, workdir):
    how, extra, check = TWINS.get(line, ("as written", "", RUN_AS_WRITTEN.get(line)))
    if how == "skip":
        pytest.skip(extra)
    command = extra if how == "replace" else f"{line} {extra}".strip()
    with CONTEXTS.get(line, lambda cwd: contextlib.nullcontext({}))(workdir) as env:
        proc = subprocess.run(command, shell=True, cwd=workdir, env={**ENV, **env}, capture_output=True,
                              text=True, timeout=600)
    assert proc.returncode == 0, f"{command}\n{proc.stderr[-3000:]}"
    check(workdir, proc.stdout)


@pytest.mark.slow
@pytest.mark.parametrize("block", readme_blocks("python"))
def test_python_block_runs_as_written(block, tmp_path):
    proc = subprocess.run([sys.executable, "-c", block], cwd=tmp_path, env=ENV, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "torch.Size([2, 16, 64])" in proc.stdout and "torch.Size([1, " in proc.stdout


@pytest.mark.parametrize("block", readme_blocks("yaml"))
def test_yaml_block_is_a_valid_suite_file(block, tmp_path):
    """The suite example is read by the suite loader (its paths need not exist to be parsed)."""
    from mmsoftmoe_eval.suite import load_suite

    path = tmp_path / "suite.yaml"
    path.write_text(block)
    entries = load_suite(path, "zeroshot")
    assert [e.dataset for e in entries] == [item["dataset"] for item in yaml.safe_load(block)]
