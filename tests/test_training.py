"""The training loop: a loss that falls, step-exact resume, distributed and accumulated steps equal to one big step."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from safetensors.torch import load_file

import mmsoftmoe_training.loop
import mmsoftmoe_training.main as train_main
from mmsoftmoe.layers import collect_aux_loss, routed_layers
from mmsoftmoe.models.clip import build_clip_from_config, resolve_clip_config
from mmsoftmoe_training.config import load_config
from mmsoftmoe_training.loop import build_loss, loss_terms, train_step
from mmsoftmoe_training.model import build_model
from tests.training_fixtures import global_batch, grads, make_model, shapes_image_folder, split, write_metadata

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "configs" / "smoke.yaml"


def _fit(tmp_path: Path, *overrides: str) -> dict:
    cfg = load_config(SMOKE, [f"output_dir={tmp_path}", "eval.dataset=none", "data.num_workers=0",
                              "batch_size=16", "log_every=1", *overrides])
    train_main.fit(cfg)
    return {r["step"]: r for r in train_main.MetricsLogger(Accelerator(), tmp_path).read() if "loss" in r}


@pytest.mark.slow
def test_loss_falls_and_checkpoints_are_written(tmp_path):
    records = _fit(tmp_path, "steps=24", "checkpoint_every=8", "keep_checkpoints=2", "optim.warmup_steps=3")
    first = sum(records[s]["loss"] for s in range(1, 5)) / 4
    last = sum(records[s]["loss"] for s in range(21, 25)) / 4
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in records.values())
    assert last < first - 0.3, (first, last)
    ckpts = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert ckpts == ["step_00000016", "step_00000024"]  # the last two kept, no temporary folder left
    state = json.loads((tmp_path / "checkpoints/step_00000024/trainer_state.json").read_text())
    assert state["step"] == 24 and state["samples_seen"] == 24 * 16
    assert (tmp_path / "final/open_clip_model.safetensors").is_file() and (tmp_path / "training.png").is_file()


@pytest.mark.slow
def test_resume_is_step_exact(tmp_path, monkeypatch):
    reference = _fit(tmp_path / "a", "steps=6", "checkpoint_every=3")

    calls = {"n": 0}
    real_step = train_main.optimizer_step

    def crash_at_step_5(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt("simulated kill")
        return real_step(*args, **kwargs)

    monkeypatch.setattr(train_main, "optimizer_step", crash_at_step_5)
    with pytest.raises(KeyboardInterrupt):
        _fit(tmp_path / "b", "steps=6", "checkpoint_every=3")
    monkeypatch.setattr(train_main, "optimizer_step", real_step)
    resumed = _fit(tmp_path / "b", "steps=6", "checkpoint_every=3")  # resume=auto picks step 3
    assert sorted(resumed) == list(range(1, 7))
    for step in range(4, 7):
        assert resumed[step]["loss"] == pytest.approx(reference[step]["loss"], abs=1e-6), step


@pytest.mark.slow
def test_data_workers_do_not_change_the_batches(tmp_path):
    a = _fit(tmp_path / "a", "steps=2", "data.num_workers=0")
    b = _fit(tmp_path / "b", "steps=2", "data.num_workers=2")
    for step in (1, 2):
        assert a[step]["loss"] == pytest.approx(b[step]["loss"], abs=1e-6)


def test_accumulated_step_equals_full_batch_step():
    accelerator = Accelerator(cpu=True)
    results = []
    for parts in (1, 2, 4):
        set_seed(0)
        model, tokenizer = make_model()
        batch = global_batch(tokenizer, 8)
        loss_fn = build_loss("clip", local_loss=True, gather_with_grad=True, rank=0, world_size=1)
        losses = train_step(model, split(batch, parts), loss_fn, accelerator, model.visual, 1.0)
        results.append((float(losses["contrastive_loss"]), grads(model)))
    for loss, g in results[1:]:
        assert loss == pytest.approx(results[0][0], abs=1e-5)
        assert g.keys() == results[0][1].keys()
        for name in g:
            torch.testing.assert_close(g[name], results[0][1][name], atol=1e-5, rtol=1e-4, msg=name)


def _stochastic_model(name: str, loss: str, drop_path: float):
    cfg = resolve_clip_config(name)
    cfg["vision_cfg"]["timm_drop_path"] = drop_path
    if loss == "siglip":
        cfg.update(init_logit_scale=math.log(10), init_logit_bias=-10.0)
    return build_clip_from_config(cfg)


def _whole_batch_gradient(model, micro_batches, loss_fn, aux_weight: float) -> tuple[float, dict]:
    """Reference without the cache-and-merge trick: every micro-batch forwarded with grad in one graph, in the order
    (and so with the noise) of train_step's cached passes, the whole batch's loss, one backward."""
    outs, auxes = [], []
    for b in micro_batches:
        outs.append(model(b["image"], b["text"]))
        auxes.append(collect_aux_loss(model.visual))
    merged = {k: torch.cat([o[k] for o in outs]) for k in ("image_features", "text_features")}
    merged.update({k: v for k, v in outs[0].items() if k in ("logit_scale", "logit_bias")})
    aux = None if auxes[0] is None else aux_weight * torch.stack(auxes).mean()
    losses = loss_terms(loss_fn, merged, aux)
    sum(losses.values()).backward()
    return float(sum(v.detach() for k, v in losses.items() if k != "router_aux_loss")), grads(model)


@pytest.mark.parametrize(("name", "loss", "drop_path"), [
    ("TokensChoiceK1-Micro-4-32", "siglip", 0.0),  # router noise (std 1/n) and the aux losses
    ("SoftMoE-Micro-4-32", "clip", 0.2),  # drop-path
])
@pytest.mark.parametrize("parts", [2, 4])
def test_accumulation_is_exact_with_router_noise_and_drop_path(name, loss, drop_path, parts):
    accelerator = Accelerator(cpu=True)
    loss_fn = build_loss(loss, local_loss=True, gather_with_grad=True, rank=0, world_size=1)
    runs = []
    for seed, accumulate in ((0, True), (0, False), (1, False)):
        set_seed(0)
        model, tokenizer = _stochastic_model(name, loss, drop_path)
        micro = split(global_batch(tokenizer, 8), parts)
        set_seed(seed)
        if accumulate:
            losses = train_step(model, micro, loss_fn, accelerator, model.visual, 1.0)
            runs.append((sum(float(v) for k, v in losses.items() if k != "router_aux_loss"), grads(model)))
        else:
            runs.append(_whole_batch_gradient(model, micro, loss_fn, 1.0))
    (loss_acc, g_acc), (loss_ref, g_ref), (_, g_other_noise) = runs
    assert loss_acc == pytest.approx(loss_ref, abs=1e-5)
    assert g_acc.keys() == g_ref.keys()
    for key in g_ref:
        torch.testing.assert_close(g_acc[key], g_ref[key], atol=1e-5, rtol=1e-4, msg=key)
    # The forward is stochastic: other noise gives another gradient, so the equality above is not vacuous.
    assert any(not torch.allclose(g_other_noise[k], g_ref[k], atol=1e-4) for k in g_ref)


def test_accumulation_refuses_routing_over_the_whole_batch():
    model, tokenizer = _stochastic_model("TokensChoiceK1-Micro-4-32", "clip", 0.0)
    for layer in routed_layers(model.visual).values():
        layer.routing = "batch"
    loss_fn = build_loss("clip", local_loss=True, gather_with_grad=True, rank=0, world_size=1)
    micro = split(global_batch(tokenizer, 4), 2)
    with pytest.raises(ValueError, match=r"routing='batch'.*grad_accum_steps=1"):
        train_step(model, micro, loss_fn, Accelerator(cpu=True), model.visual, 1.0)


@pytest.mark.slow
def test_two_processes_match_one_process(tmp_path):
    out = tmp_path / "two.safetensors"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    # accelerate launch --cpu starts one process (it needs MPI for more); torchrun's environment is what
    # accelerate reads to form a gloo process group on CPU, as `accelerate launch` does on GPUs.
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(ROOT / "tests" / "_two_process_step.py"), str(out), "8"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = load_file(str(out))

    accelerator = Accelerator(cpu=True)
    for kind in ("clip", "siglip"):
        set_seed(0)
        model, tokenizer = make_model(kind)
        batch = global_batch(tokenizer, 8)
        loss_fn = build_loss(kind, local_loss=True, gather_with_grad=True, rank=0, world_size=1)
        losses = train_step(model, [batch], loss_fn, accelerator, model.visual, 1.0)
        assert float(sum(losses.values())) == pytest.approx(float(two[f"{kind}/loss"]), abs=1e-5), kind
        for name, g in grads(model).items():
            torch.testing.assert_close(two[f"{kind}/grad/{name}"], g, atol=1e-5, rtol=1e-4, msg=f"{kind} {name}")


@pytest.mark.slow
def test_nonfinite_losses_are_skipped_then_stop_the_run(tmp_path, monkeypatch):
    real_step = mmsoftmoe_training.loop.train_step
    calls = {"n": 0}

    def nan_on_second_step(*args, **kwargs):
        calls["n"] += 1
        losses = real_step(*args, **kwargs)
        return {k: v * float("nan") for k, v in losses.items()} if calls["n"] == 2 else losses

    monkeypatch.setattr(mmsoftmoe_training.loop, "train_step", nan_on_second_step)
    records = _fit(tmp_path / "skip", "steps=3", "resume=none")
    assert records[2]["nonfinite_steps"] == 1 and records[3]["nonfinite_steps"] == 1

    state = json.loads((tmp_path / "skip/final/trainer_state.json").read_text())["state"]
    assert (state["nonfinite_steps"], state["nonfinite_in_a_row"]) == (1, 0)  # numbers, not tensors

    monkeypatch.setattr(mmsoftmoe_training.loop, "train_step",
                        lambda *a, **k: {k2: v * float("nan") for k2, v in real_step(*a, **k).items()})
    with pytest.raises(FloatingPointError, match="3 consecutive non-finite losses at step 3"):
        _fit(tmp_path / "stop", "steps=5", "max_nonfinite_steps=3")
    # The counters stay on the device between logging steps: the run stops at the first logging step at or after
    # the 3rd non-finite step in a row, here step 4.
    with pytest.raises(FloatingPointError, match="4 consecutive non-finite losses at step 4"):
        _fit(tmp_path / "stop_logged", "steps=8", "max_nonfinite_steps=3", "log_every=4")


@pytest.mark.slow
def test_locked_image_tower_does_not_move(tmp_path):
    cfg = load_config(SMOKE, [f"output_dir={tmp_path}", "eval.dataset=none", "data.num_workers=0", "batch_size=8",
                              "steps=2", "model.lock_image=true"])
    set_seed(cfg.seed)
    before, _, _ = build_model(cfg)
    train_main.fit(cfg)
    from mmsoftmoe.models.clip import load_clip

    after, _, _ = load_clip(tmp_path / "final")
    # open_clip's TimmModel.lock freezes the trunk; the projection head stays trainable (a LiT read-out).
    for (name, p0), p1 in zip(before.named_parameters(), after.parameters(), strict=True):
        if name.startswith("visual.trunk."):
            assert torch.equal(p0, p1), name
    assert not torch.equal(before.visual.head.proj.weight, after.visual.head.proj.weight)
    assert not torch.equal(before.token_embedding.weight, after.token_embedding.weight)


@pytest.mark.slow
def test_trains_from_an_image_folder_skipping_a_corrupt_image(tmp_path):
    folder = tmp_path / "pairs"
    rows = shapes_image_folder(folder, 15)
    (folder / "bad.jpg").write_bytes(b"not a jpeg at all")
    write_metadata(folder, [*rows, {"file_name": "bad.jpg", "text": "a broken file"}])
    records = _fit(tmp_path / "run", "steps=3", f"data.source={folder}", "data.caption_column=text",
                   "batch_size=8")
    assert len(records) == 3 and all(torch.isfinite(torch.tensor(r["loss"])) for r in records.values())
    state = json.loads((tmp_path / "run/final/trainer_state.json").read_text())
    assert state["data_skipped"] == 1  # one bad image, counted once however often it was met


@pytest.mark.slow
def test_trains_with_a_hugging_face_text_encoder(tmp_path):
    from tests.test_clip_models import _tiny_hf_encoder

    _tiny_hf_encoder(tmp_path / "bert")
    records = _fit(tmp_path / "run", "steps=16", f"model.text_model={tmp_path / 'bert'}", "batch_size=8",
                   "optim.warmup_steps=2")
    losses = [records[s]["loss"] for s in range(1, 17)]
    assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4 - 0.2, losses  # it learns through the HF tower


@pytest.mark.slow
def test_compiled_model_trains_like_the_eager_one(tmp_path):
    eager = _fit(tmp_path / "eager", "steps=3")
    compiled = _fit(tmp_path / "compiled", "steps=3", "model.compile=true")
    for step in (1, 2, 3):
        assert compiled[step]["loss"] == pytest.approx(eager[step]["loss"], abs=1e-4), step


@pytest.mark.slow
def test_siglip_needs_a_model_with_a_bias(tmp_path):
    with pytest.raises(ValueError, match="loss=siglip needs a model with a logit bias"):
        _fit(tmp_path, "steps=1", "loss=siglip")
