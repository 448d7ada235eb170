"""Expert parallelism and FSDP2 against one process (torchrun, gloo, CPU), and the layout checks.

Every layout trains the micro Soft MoE CLIP and its Tokens Choice twin for three AdamW steps with gradient
clipping active; the global loss, every gradient (before clipping), the clipped global norm and the trained
weights must equal those of the same steps on the whole batch in one process (`tests/_parallel_train.py`).
"""

import functools
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mmsoftmoe.models.clip import load_clip
from mmsoftmoe.parallel import check_layout
from mmsoftmoe.parallel.dcp import SHARDED_DIR, consolidate, load_sharded
from mmsoftmoe_training.config import load_config
from tests._parallel_checkpoint import MODEL
from tests._parallel_train import MAX_NORM, MODELS, make_model, make_optimizer, run_steps

ROOT = Path(__file__).resolve().parents[1]


@functools.cache
def one_process(name: str) -> dict[str, torch.Tensor]:
    model, tokenizer = make_model(name)
    return run_steps(model, tokenizer, rank=0, world=1, clip=torch.nn.utils.clip_grad_norm_)


def torchrun(tmp_path: Path, nproc: int, layouts: list[str], script: str = "_parallel_train.py",
             timeout: int = 300) -> dict[str, torch.Tensor]:
    """Run `tests/<script> OUT LAYOUT...` under torchrun; the tensors it saved to OUT."""
    out = tmp_path / f"{nproc}.safetensors"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           str(ROOT / "tests" / script), str(out), *layouts]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, failure(proc.stderr)
    return load_file(str(out))


def failure(stderr: str) -> str:
    """The error lines of every rank (torchrun's own summary only names the failing rank)."""
    return "\n".join(line for line in stderr.splitlines() if "Error" in line or "error" in line)[-4000:]


def assert_matches_one_process(sharded: dict[str, torch.Tensor], layout: str) -> None:
    for name in MODELS:
        reference = one_process(name)
        for key, expected in reference.items():
            got = sharded[f"{name}/{layout}/{key}"]
            torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5, msg=f"{name} {layout} {key}")
        assert all(reference[f"step{s}/grad_norm"] > MAX_NORM for s in range(3)), "clipping was not exercised"


@pytest.mark.slow
def test_expert_parallel_two_processes_match_one_process(tmp_path):
    """ep=2 over dp_shard=2 (dense FSDP2 over the same two ranks, experts split 8 + 8), in one pass and with the
    trainer's gradient accumulation over two micro-batches per process."""
    sharded = torchrun(tmp_path, 2, ["1,2,2", "1,2,2,2"])
    assert_matches_one_process(sharded, "1,2,2")
    assert_matches_one_process(sharded, "1,2,2,2")


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["1,4,4", "1,4,2", "2,2,2"])
def test_four_process_layouts_match_one_process(tmp_path_factory, layout):
    """ep=4; FSDP2 + ep=2 (experts further sharded by FSDP2 over efsdp=2); HSDP 2 x 2 with ep=2."""
    cached = tmp_path_factory.getbasetemp() / "four"
    if not (cached / "4.safetensors").exists():
        cached.mkdir(exist_ok=True)
        torchrun(cached, 4, ["1,4,4", "1,4,2", "2,2,2"])
    assert_matches_one_process(load_file(str(cached / "4.safetensors")), layout)


@pytest.mark.parametrize(("kwargs", "message"), [
    (dict(world_size=4, dp_replicate=1, dp_shard=2, ep=2), r"1 \* 2 = 2 does not match the 4 processes"),
    (dict(world_size=4, dp_replicate=1, dp_shard=4, ep=3), r"ep=3 must divide parallel.dp_shard=4.*\[1, 2, 4\]"),
    (dict(world_size=6, dp_replicate=1, dp_shard=6, ep=6, num_experts=(16,)),
     r"ep=6 does not divide the model's 16 experts.*\[1, 2\]"),
    (dict(world_size=2, dp_replicate=0, dp_shard=2, ep=1), r"parallel.dp_replicate must be >= 1"),
])
def test_bad_layouts_fail_with_one_clear_message(kwargs, message):
    with pytest.raises(ValueError, match=message):
        check_layout(**kwargs)


def test_good_layout_passes():
    check_layout(world_size=8, dp_replicate=2, dp_shard=4, ep=4, num_experts=(16, 16))


@pytest.mark.parametrize(("overrides", "message"), [
    (["parallel.ep=2"], r"need parallel.dp_shard > 0"),
    (["parallel.dp_shard=4", "parallel.ep=3"],
     r"parallel.ep=3 must divide parallel.dp_shard=4.*choose ep among \[1, 2, 4\]"),
    (["parallel.dp_shard=2", "precision=fp16"], r"precision=fp16 needs a gradient scaler.*use precision=bf16"),
])
def test_config_rejects_a_bad_layout_at_load(overrides, message):
    with pytest.raises(ValueError, match=message):
        load_config(None, overrides)


def test_config_default_is_ddp():
    cfg = load_config(None, [])
    assert not cfg.parallel.sharded
    assert load_config(None, ["parallel.dp_shard=4", "parallel.ep=2"]).parallel.sharded


@pytest.mark.slow
def test_checkpoint_saved_by_four_processes_resumes_on_two_and_one_and_consolidates(tmp_path):
    """Saved at FSDP2 + ep=2 on 4 processes after two steps; the third step after resuming at ep=2 on 2 processes,
    and in one unsharded process, equals the third step of the uninterrupted run; `consolidate` gives the model."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    for nproc, mode, layout in ((4, "save", "1,4,2"), (2, "resume", "1,2,2")):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
               str(ROOT / "tests" / "_parallel_checkpoint.py"), str(tmp_path), mode, layout]
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, failure(proc.stderr)
    continued = load_file(str(tmp_path / "continued.safetensors"))
    model, tokenizer = make_model(MODEL)
    optimizer = make_optimizer(model)
    load_sharded(tmp_path / "ckpt" / SHARDED_DIR, model, optimizer)
    one = run_steps(model, tokenizer, 0, 1, torch.nn.utils.clip_grad_norm_, optimizer, steps=range(2, 3))
    for resumed in (load_file(str(tmp_path / "resumed_2.safetensors")), one):
        assert resumed.keys() == continued.keys()
        for key, expected in continued.items():
            torch.testing.assert_close(resumed[key], expected, atol=1e-5, rtol=1e-5, msg=key)

    command = [str(Path(sys.executable).parent / "mmsoftmoe"), "consolidate", str(tmp_path / "ckpt"),
               str(tmp_path / "final")]
    proc = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    model, _, _ = load_clip(tmp_path / "final")
    saved = load_file(str(tmp_path / "saved.safetensors"))
    assert model.state_dict().keys() == saved.keys()
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, saved[key], atol=0, rtol=0, msg=key)
    unsharded, tokenizer = make_model(MODEL)
    run_steps(unsharded, tokenizer, 0, 1, torch.nn.utils.clip_grad_norm_, steps=range(2))
    images = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model.encode_image(images), unsharded.eval().encode_image(images),
                                   atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_consolidate_refuses_a_folder_without_a_sharded_state(tmp_path):
    with pytest.raises(FileNotFoundError, match="is not a sharded training checkpoint"):
        consolidate(tmp_path, tmp_path / "out")
    command = [str(Path(sys.executable).parent / "mmsoftmoe"), "consolidate", str(tmp_path), str(tmp_path / "out")]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"error: {tmp_path} is not a sharded training checkpoint: it needs "
                                                "open_clip_config.json and sharded/.metadata; give a folder under "
                                                "<output_dir>/checkpoints/"]
