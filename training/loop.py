"""The training step and loop: contrastive loss (+ router auxiliary losses), accelerate for devices/precision/DDP.

Gradient accumulation follows open_clip's `accum_freq`: a contrastive loss over micro-batches is not the loss
over the whole batch (negatives would come from the micro-batch only), so the step first computes all
micro-batches' features without grad, then recomputes each micro-batch with grad and backpropagates the loss of
the *whole* batch with that micro-batch's features live. The shared `logit_scale`/`logit_bias` take their gradient
from one pass only (open_clip would count it once per pass). The live pass of a micro-batch restarts from the random
state its cached pass started from, so router noise, dropout and drop-path draw the same values in both passes: the
gradient is exactly that of the whole-batch loss under the noise the cached passes drew (for deterministic forwards:
the full-batch gradient). Layers whose routing spans the batch (`routes_across_examples`, e.g. `routing="batch"`)
would route a micro-batch differently from the full batch, so accumulation refuses them.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, fields

import open_clip
import torch
from accelerate import Accelerator
from open_clip.loss import SigLipLoss
from torch import nn

from mmsoftmoe.layers import collect_aux_loss, collect_routing_stats, routed_layers
from mmsoftmoe_training.optim import set_lr

logger = logging.getLogger("mmsoftmoe.train")


@dataclass
class TrainState:
    """Step counters. The non-finite counters are device tensors between logging steps (`record_step`) and host
    ints after `materialize` (a checkpoint records numbers)."""

    step: int = 0
    samples_seen: int = 0
    nonfinite_steps: int | torch.Tensor = 0
    nonfinite_in_a_row: int | torch.Tensor = 0
    _reported: int = field(default=0, init=False, repr=False)  # nonfinite_steps at the last check

    def __post_init__(self) -> None:
        self._reported = int(self.nonfinite_steps)

    def materialize(self) -> None:
        """Read the counters back to the host (a sync: logging steps and checkpoints only)."""
        self.nonfinite_steps, self.nonfinite_in_a_row = int(self.nonfinite_steps), int(self.nonfinite_in_a_row)

    def to_dict(self) -> dict:
        self.materialize()
        return {f.name: getattr(self, f.name) for f in fields(self) if f.init}


def build_loss(kind: str, *, local_loss: bool, gather_with_grad: bool, rank: int, world_size: int) -> nn.Module:
    """open_clip's softmax (`clip`) or sigmoid (`siglip`) loss, distributed-aware."""
    if kind == "siglip":
        return SigLipLoss(cache_labels=True, rank=rank, world_size=world_size)
    return open_clip.ClipLoss(local_loss=local_loss, gather_with_grad=gather_with_grad, cache_labels=True,
                              rank=rank, world_size=world_size)


def loss_terms(loss_fn: nn.Module, out: dict, aux_loss: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """Named losses (open_clip convention: the total is the sum of the `*_loss` entries)."""
    kwargs = {"image_features": out["image_features"], "text_features": out["text_features"],
              "logit_scale": out["logit_scale"]}
    if isinstance(loss_fn, SigLipLoss):
        kwargs["logit_bias"] = out["logit_bias"]
    losses = loss_fn(**kwargs, output_dict=True)
    if aux_loss is not None:
        losses["router_aux_loss"] = aux_loss
    return losses


def _aux(routed_model: nn.Module, weight: float) -> torch.Tensor | None:
    aux = collect_aux_loss(routed_model)
    return None if aux is None else weight * aux


def _merge(cached: Sequence[dict], live: dict, j: int, last: bool) -> dict:
    """The whole batch's outputs, with micro-batch j's features (and, on the last pass, the scales) live."""
    merged = {k: torch.cat([live[k] if i == j else c[k] for i, c in enumerate(cached)])
              for k in ("image_features", "text_features")}
    for k in ("logit_scale", "logit_bias"):
        if k in live:
            merged[k] = live[k] if last else live[k].detach()
    return merged


def train_step(model: nn.Module, micro_batches: Sequence[dict], loss_fn: nn.Module, accelerator: Accelerator,
               routed_model: nn.Module, aux_weight: float) -> dict[str, torch.Tensor]:
    """Forward and backward of one optimizer step; returns the detached named losses of the whole batch."""
    if len(micro_batches) == 1:
        batch = micro_batches[0]
        with accelerator.autocast():
            losses = loss_terms(loss_fn, model(batch["image"], batch["text"]), _aux(routed_model, aux_weight))
        accelerator.backward(sum(losses.values()))
        return {k: v.detach() for k, v in losses.items()}

    _check_accumulable(routed_model, len(micro_batches))
    device = accelerator.device
    cached, rng_states = [], []
    with torch.no_grad(), accelerator.autocast():
        for b in micro_batches:
            rng_states.append(_rng_state(device))
            cached.append(model(b["image"], b["text"]))
    after_cached = _rng_state(device)
    n = len(micro_batches)
    aux_total, contrastive = None, {}
    for j, batch in enumerate(micro_batches):
        last = j == n - 1
        sync = contextlib.nullcontext() if last else accelerator.no_sync(model)
        with sync:
            with accelerator.autocast():
                _set_rng_state(rng_states[j], device)  # the noise of micro-batch j's cached pass
                live = model(batch["image"], batch["text"])
                aux = _aux(routed_model, aux_weight / n)
                losses = loss_terms(loss_fn, _merge(cached, live, j, last), aux)
            accelerator.backward(sum(losses.values()))
        if aux is not None:
            aux_total = aux.detach() if aux_total is None else aux_total + aux.detach()
        contrastive = {k: v.detach() for k, v in losses.items() if k != "router_aux_loss"}
    _set_rng_state(after_cached, device)
    return contrastive if aux_total is None else {**contrastive, "router_aux_loss": aux_total}


def _check_accumulable(routed_model: nn.Module, num_micro_batches: int) -> None:
    """Refuse gradient accumulation over layers that route across examples: it could not equal the full batch."""
    spanning = [name for name, layer in routed_layers(routed_model).items() if layer.routes_across_examples]
    if spanning:
        raise ValueError(
            f"grad_accum_steps={num_micro_batches} cannot reproduce the full batch's gradient: MoE layer(s) "
            f"{spanning[:3]} route over the whole batch (routing='batch'), so a micro-batch is routed differently "
            "from the full batch. Set grad_accum_steps=1, or use routing='example' (vmoe's per-image groups)")


def _rng_state(device: torch.device) -> list[torch.Tensor]:
    """The CPU random state and, on an accelerator, that device's (what noise, dropout and drop-path draw from)."""
    states = [torch.get_rng_state()]
    if device.type != "cpu":
        states.append(torch.get_device_module(device).get_rng_state(device))
    return states


def _set_rng_state(states: list[torch.Tensor], device: torch.device) -> None:
    torch.set_rng_state(states[0])
    if device.type != "cpu":
        torch.get_device_module(device).set_rng_state(states[1], device)


def all_finite(accelerator: Accelerator, total: torch.Tensor) -> torch.Tensor:
    """Whether the loss is finite on every process (all must skip a step together), as a 0-d bool device tensor."""
    flag = torch.isfinite(total.detach()).to(torch.int32).reshape(1)
    return accelerator.gather(flag).min().bool()


@dataclass
class StepResult:
    """What one optimizer step did: its named losses (detached), the gradient norm before clipping (None when
    clipping is off) and whether the step was applied (every loss finite everywhere). All are device tensors: read
    them on logging steps only."""

    losses: dict[str, torch.Tensor]
    grad_norm: torch.Tensor | None
    applied: torch.Tensor


def _inner(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """The torch optimizer inside accelerate's `AcceleratedOptimizer` wrapper(s)."""
    while hasattr(optimizer, "optimizer"):
        optimizer = optimizer.optimizer
    return optimizer


def step_unless_nonfinite(optimizer: torch.optim.Optimizer, applied: torch.Tensor, accelerator: Accelerator) -> None:
    """`optimizer.step()`, skipped when `applied` is False, without reading `applied` back to the host.

    Fused Adam/AdamW (`build_optimizer`) take a `found_inf` tensor, as GradScaler passes it: the kernel leaves
    parameters and moments untouched when it is 1 and the step count is restored (torch/optim/adam.py
    `_fused_adam`). Other optimizers, and fp16's GradScaler (which sets `found_inf` itself, and whose accelerate
    wrapper reads the scale back every step anyway), fall back to a host-side check.
    """
    inner = _inner(optimizer)
    if accelerator.scaler is not None or not getattr(inner, "_step_supports_amp_scaling", False):
        if bool(applied):  # a host sync: only without a fused optimizer
            optimizer.step()
        return
    inner.found_inf = (~applied).to(torch.float32)
    try:
        optimizer.step()
    finally:
        del inner.found_inf


def optimizer_step(model: nn.Module, optimizer: torch.optim.Optimizer, micro_batches: Sequence[dict], *,
                   loss_fn: nn.Module, accelerator: Accelerator, routed_model: nn.Module, aux_weight: float,
                   lr: float, grad_clip: float | None,
                   clip_grad_norm: Callable[[Iterable[torch.Tensor], float], torch.Tensor] | None = None) -> StepResult:
    """One optimizer step: learning rate, forward/backward of every micro-batch, the finiteness check on every
    process, gradient clipping, the update. The one place a step is defined (`fit` and the benchmarks call it).

    `clip_grad_norm(parameters, max_norm)`: accelerate's by default; a sharded model passes
    `mmsoftmoe.parallel.clip_grad_norm_` (the global norm over parameters on different device meshes).

    Nothing here reads a device value back to the host (with the fused AdamW of `build_optimizer`, outside fp16):
    the finiteness flag skips the update on the device, and clipping scales by min(1, clip / norm) on the device
    (a non-finite norm only occurs on a step that is skipped).
    """
    set_lr(optimizer, lr)
    losses = train_step(model, micro_batches, loss_fn, accelerator, routed_model, aux_weight)
    applied = all_finite(accelerator, sum(losses.values()))
    clip = clip_grad_norm or accelerator.clip_grad_norm_
    grad_norm = clip(model.parameters(), grad_clip) if grad_clip else None
    step_unless_nonfinite(optimizer, applied, accelerator)
    optimizer.zero_grad(set_to_none=True)
    return StepResult(losses, grad_norm, applied)


def record_step(state: TrainState, result: StepResult, *, samples: int, max_nonfinite: int, check: bool) -> None:
    """Advance the counters by one step; on `check` steps (logging steps) read them back and raise when
    `max_nonfinite` or more steps in a row were skipped.

    Between checks the non-finite counters are device tensors (no host sync per step), so a run of non-finite
    steps stops at the first logging step at or after its `max_nonfinite`-th step, with the count reached there.
    """
    state.step += 1
    state.samples_seen += samples
    skipped = (~result.applied).to(torch.int64)
    state.nonfinite_steps = skipped + state.nonfinite_steps
    state.nonfinite_in_a_row = torch.where(result.applied, 0, state.nonfinite_in_a_row + 1)
    if not check:
        return
    state.materialize()
    if state.nonfinite_steps > state._reported:
        logger.warning("step %d: %d step(s) since the last check had a non-finite loss and were skipped (this "
                       "step's losses %s)", state.step, state.nonfinite_steps - state._reported,
                       {k: float(v) for k, v in result.losses.items()})
        state._reported = state.nonfinite_steps
    if state.nonfinite_in_a_row >= max_nonfinite:
        raise FloatingPointError(
            f"{state.nonfinite_in_a_row} consecutive non-finite losses at step {state.step}; stopping. Lower "
            "optim.lr, use precision=bf16 instead of fp16, or resume from the last checkpoint with a smaller lr")


def step_metrics(accelerator: Accelerator, result: StepResult, model: nn.Module, optimizer: torch.optim.Optimizer,
                 samples_per_s: float) -> dict[str, float]:
    """The logged metrics of a step (host values: call on logging steps only)."""
    # Mean over processes: with local_loss each process holds the loss of its own rows only.
    metrics = {k: float(accelerator.reduce(v.reshape(1), reduction="mean")) for k, v in result.losses.items()}
    metrics["loss"] = sum(metrics.values())
    metrics["lr"] = optimizer.param_groups[0]["lr"]
    metrics["logit_scale"] = float(model.logit_scale.detach().exp())
    if getattr(model, "logit_bias", None) is not None:
        metrics["logit_bias"] = float(model.logit_bias.detach())
    if result.grad_norm is not None and bool(result.applied):  # a skipped step's norm is not finite
        metrics["grad_norm"] = float(result.grad_norm)
    metrics["samples_per_s"] = samples_per_s
    metrics.update(reduce_routing_stats(accelerator, collect_routing_stats(model.visual)))
    return metrics


def reduce_routing_stats(accelerator: Accelerator, stats: dict[str, float]) -> dict[str, float]:
    """Routing statistics over every process's examples, not only the main process's: means of per-example values
    (every process holds as many examples) are averaged, `*_max` statistics take the maximum. Two collectives, the
    same on every process (the layers and their statistics are the same everywhere)."""
    if accelerator.num_processes == 1 or not stats:
        return stats
    keys = list(stats)
    values = torch.tensor([stats[k] for k in keys], dtype=torch.float64, device=accelerator.device)
    means = accelerator.reduce(values, reduction="mean")
    maxima = accelerator.gather(values.unsqueeze(0)).amax(dim=0)
    return {k: float(maxima[i] if k.endswith("_max") else means[i]) for i, k in enumerate(keys)}
