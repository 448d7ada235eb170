"""The training step and loop: contrastive loss (+ router auxiliary losses), accelerate for devices/precision/DDP.

Gradient accumulation follows open_clip's `accum_freq`: a contrastive loss over micro-batches is not the loss
over the whole batch (negatives would come from the micro-batch only), so the step first computes all
micro-batches' features without grad, then recomputes each micro-batch with grad and backpropagates the loss of
the *whole* batch with that micro-batch's features live. The gradient equals the full-batch gradient; the shared
`logit_scale`/`logit_bias` take their gradient from one pass only (open_clip would count it once per pass).
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import open_clip
import torch
from accelerate import Accelerator
from open_clip.loss import SigLipLoss
from torch import nn

from mmsoftmoe.layers import collect_aux_loss


@dataclass
class TrainState:
    step: int = 0
    samples_seen: int = 0
    nonfinite_steps: int = 0
    nonfinite_in_a_row: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


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

    with torch.no_grad(), accelerator.autocast():
        cached = [model(b["image"], b["text"]) for b in micro_batches]
    n = len(micro_batches)
    aux_total, contrastive = None, {}
    for j, batch in enumerate(micro_batches):
        last = j == n - 1
        sync = contextlib.nullcontext() if last else accelerator.no_sync(model)
        with sync:
            with accelerator.autocast():
                live = model(batch["image"], batch["text"])
                aux = _aux(routed_model, aux_weight / n)
                losses = loss_terms(loss_fn, _merge(cached, live, j, last), aux)
            accelerator.backward(sum(losses.values()))
        if aux is not None:
            aux_total = aux.detach() if aux_total is None else aux_total + aux.detach()
        contrastive = {k: v.detach() for k, v in losses.items() if k != "router_aux_loss"}
    return contrastive if aux_total is None else {**contrastive, "router_aux_loss": aux_total}


def all_finite(accelerator: Accelerator, total: torch.Tensor) -> bool:
    """Whether the loss is finite on every process (all must skip a step together)."""
    flag = torch.isfinite(total).to(torch.int32).reshape(1)
    return bool(accelerator.gather(flag).min().item())
