"""A non-logging training step reads nothing back from the device; a non-finite step is skipped on the device.

Host syncs are counted two ways while real `optimizer_step`s of the micro CLIP run: the Python entry points
(`.item()`, `bool()`, `float()`, `int()`, `.tolist()`, `.nonzero()`, ...) and, below Python, every dispatched op that
reads a value back (`aten._local_scalar_dense`, behind `.item()` and friends) or whose output shape depends on data
(`nonzero`, `masked_select`, boolean indexing, ...; torch tags them `dynamic_output_shape` and
`data_dependent_output`; indexing with integer tensors has a static shape and is not counted). The counter is
checked to count the syncs it is shown, so a zero is not vacuous.
"""

import contextlib
import math

import pytest
import torch
from accelerate import Accelerator
from torch.utils._python_dispatch import TorchDispatchMode

from mmsoftmoe.layers import set_record_stats
from mmsoftmoe_training.loop import TrainState, build_loss, optimizer_step, record_step, step_metrics
from mmsoftmoe_training.optim import build_optimizer
from tests.training_fixtures import global_batch, make_model, split

PY_SYNCS = ("item", "tolist", "numpy", "nonzero", "__bool__", "__float__", "__int__", "__index__")
SYNC_TAGS = (torch.Tag.dynamic_output_shape, torch.Tag.data_dependent_output)


class _SyncOps(TorchDispatchMode):
    def __init__(self, seen: list[str]) -> None:
        super().__init__()
        self.seen = seen

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default or (
                any(t in func.tags for t in SYNC_TAGS) and not _integer_indexing(func, args)):
            self.seen.append(str(func))
        return func(*args, **(kwargs or {}))


def _integer_indexing(func, args) -> bool:
    """`x[long_index]` (open_clip's text pooling gathers the EOT token so) has a static shape; `x[bool_mask]` is a
    nonzero in disguise. `aten.index` is tagged for both."""
    return func is torch.ops.aten.index.Tensor and all(
        i is None or not (i.dtype == torch.bool or i.dtype == torch.uint8) for i in args[1])


@contextlib.contextmanager
def count_host_syncs(monkeypatch):
    """Yields the list of host reads made inside the block (Python calls and dispatched ops)."""
    seen: list[str] = []
    with monkeypatch.context() as patch:
        for name in PY_SYNCS:
            original = getattr(torch.Tensor, name)

            def counted(*args, _original=original, _name=name, **kwargs):
                seen.append(_name)
                return _original(*args, **kwargs)

            patch.setattr(torch.Tensor, name, counted)
        original_nonzero = torch.nonzero
        patch.setattr(torch, "nonzero", lambda *a, **k: seen.append("torch.nonzero") or original_nonzero(*a, **k))
        with _SyncOps(seen):
            yield seen


def _setup(grad_clip: float | None = 1.0):
    torch.manual_seed(0)
    accelerator = Accelerator(cpu=True)
    model, tokenizer = make_model()
    optimizer = build_optimizer(model, lr=1e-3, weight_decay=0.1, betas=(0.9, 0.98), eps=1e-6)
    model, optimizer = accelerator.prepare(model, optimizer)
    loss_fn = build_loss("clip", local_loss=True, gather_with_grad=True, rank=0, world_size=1)
    batches = split(global_batch(tokenizer, 16), 2)

    def step(batch: dict, lr: float = 1e-3):
        return optimizer_step(model, optimizer, [batch], loss_fn=loss_fn, accelerator=accelerator,
                              routed_model=model.visual, aux_weight=1.0, lr=lr, grad_clip=grad_clip)

    return accelerator, model, optimizer, step, batches


def test_counter_sees_host_syncs(monkeypatch):
    x = torch.tensor([1.0, 0.0])
    with count_host_syncs(monkeypatch) as seen:
        float(x.sum()), x.sum().item(), bool(x.all()), x[x > 0], x.tolist()
    assert {"__float__", "item", "__bool__", "tolist"} <= set(seen)
    assert sum("_local_scalar_dense" in s for s in seen) >= 3 and "aten.index.Tensor" in seen  # x[mask]


def test_non_logging_steps_do_not_sync_and_logging_steps_do(monkeypatch):
    accelerator, model, optimizer, step, batches = _setup()
    assert optimizer.optimizer.defaults["fused"]  # build_optimizer picks the fused kernel on CPU
    state = TrainState()
    set_record_stats(model, False)  # as fit on a non-logging step
    record_step(state, step(batches[0]), samples=8, max_nonfinite=3, check=False)  # optimizer state is created
    with count_host_syncs(monkeypatch) as seen:
        for i in range(3):
            record_step(state, step(batches[i % 2]), samples=8, max_nonfinite=3, check=False)
    assert seen == []
    assert isinstance(state.nonfinite_steps, torch.Tensor)

    set_record_stats(model, True)  # a logging step: statistics, counters and metrics come back to the host
    with count_host_syncs(monkeypatch) as seen:
        result = step(batches[0])
        record_step(state, result, samples=8, max_nonfinite=3, check=True)
        metrics = step_metrics(accelerator, result, model, optimizer, samples_per_s=1.0)
    assert seen
    assert (state.step, state.nonfinite_steps, state.nonfinite_in_a_row) == (5, 0, 0)
    assert metrics["loss"] == pytest.approx(float(sum(result.losses.values())), abs=1e-6)
    assert math.isfinite(metrics["grad_norm"]) and any(k.startswith("router/") for k in metrics)


def _reference_adamw_steps(batches: list[dict], grad_clip: float) -> dict[str, torch.Tensor]:
    """The same model and batches through torch's plain (single-tensor) AdamW: forward, backward, clip, step."""
    torch.manual_seed(0)
    model, _ = make_model()
    groups = build_optimizer(model, lr=1e-3, weight_decay=0.1, betas=(0.9, 0.98), eps=1e-6).param_groups
    optimizer = torch.optim.AdamW([{"params": g["params"], "weight_decay": g["weight_decay"]} for g in groups],
                                  lr=1e-3, betas=(0.9, 0.98), eps=1e-6, foreach=False, fused=False)
    loss_fn = build_loss("clip", local_loss=True, gather_with_grad=True, rank=0, world_size=1)
    for batch in batches:
        out = model(batch["image"], batch["text"])
        loss_fn(out["image_features"], out["text_features"], out["logit_scale"]).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        optimizer.step()
        optimizer.zero_grad()
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_nonfinite_steps_are_skipped_on_the_device(monkeypatch):
    """A NaN loss (so NaN gradients) leaves weights, moments and the step count as they were: the run equals one
    that never saw those steps, computed by torch's unfused AdamW."""
    accelerator, model, optimizer, step, batches = _setup(grad_clip=1.0)
    set_record_stats(model, False)
    state = TrainState()
    record_step(state, step(batches[0]), samples=8, max_nonfinite=3, check=False)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    nan_loss = build_loss("clip", local_loss=True, gather_with_grad=True, rank=0, world_size=1)
    real_forward = nan_loss.forward
    monkeypatch.setattr(nan_loss, "forward", lambda *a, **k: {n: v * float("nan") for n, v in
                                                               real_forward(*a, **k).items()})
    with count_host_syncs(monkeypatch) as seen:
        for _ in range(2):
            result = optimizer_step(model, optimizer, [batches[1]], loss_fn=nan_loss, accelerator=accelerator,
                                    routed_model=model.visual, aux_weight=1.0, lr=1e-3, grad_clip=1.0)
            record_step(state, result, samples=8, max_nonfinite=3, check=False)
    assert seen == []
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]), name
    assert all(float(s["step"]) == 1 for s in optimizer.optimizer.state.values())

    record_step(state, step(batches[1]), samples=8, max_nonfinite=3, check=True)
    assert (state.nonfinite_steps, state.nonfinite_in_a_row) == (2, 0)
    reference = _reference_adamw_steps(batches, grad_clip=1.0)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), reference[name], atol=1e-6, rtol=1e-5, msg=name)


def test_consecutive_nonfinite_steps_raise_at_the_check():
    state = TrainState()
    bad = type("R", (), {"applied": torch.tensor(False), "losses": {"contrastive_loss": torch.tensor(math.nan)}})
    good = type("R", (), {"applied": torch.tensor(True), "losses": {"contrastive_loss": torch.tensor(1.0)}})
    for result in (bad, good, bad, bad):
        record_step(state, result, samples=1, max_nonfinite=3, check=False)
    record_step(state, bad, samples=1, max_nonfinite=3, check=False)  # 3 in a row, not yet checked
    with pytest.raises(FloatingPointError, match="4 consecutive non-finite losses at step 6"):
        record_step(state, bad, samples=1, max_nonfinite=3, check=True)
    assert state.to_dict() == {"step": 6, "samples_seen": 6, "nonfinite_steps": 5, "nonfinite_in_a_row": 4}
