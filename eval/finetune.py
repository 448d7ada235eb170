"""Full fine-tuning of an image tower with a new linear head, the timm / MAE recipe run by accelerate.

Follows MAE's fine-tuning recipe (He et al. 2022, App. A.2, ``main_finetune.py``) with timm's parts: AdamW with
layer-wise lr decay (``create_optimizer_v2(layer_decay=...)``, layers from the model's ``group_matcher``), label
smoothing, mixup / cutmix (``Mixup``, soft targets), stochastic depth, an optional EMA of the weights (``ModelEmaV3``)
and a per-step linear warmup then cosine decay (``CosineLRScheduler``). docs/design.md (section 5) lists the
values for ViT-B.

The tower (a timm model, e.g. ``mmsoftmoe.models.clip.image_tower(clip_model)``, or a timm name for a tower trained
from scratch) is rebuilt with ``timm.create_model(architecture, num_classes=..., drop_path_rate=...)`` and given the
tower's weights: timm then sets the per-block drop-path rates as it always does (linear in depth), the caller's tower
is left untouched (a CLIP model keeps its own weights), and the saved classifier reloads from its architecture name.
Routed (MoE) towers add their auxiliary router losses (``mmsoftmoe.layers.collect_aux_loss``) to the loss.

Devices, precision and data parallelism come from the ``accelerate.Accelerator``; test accuracy goes through
``eval.features.extract_features`` (the logits are the "features"), so it is gathered like every other evaluator's.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from pathlib import Path
from typing import Any

import timm
import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from safetensors.torch import load_file, save_file
from timm.data import Mixup
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2
from timm.scheduler import CosineLRScheduler
from timm.utils import ModelEmaV3
from torch import nn
from torch.utils.data import DataLoader

from mmsoftmoe.console import progress_bar
from mmsoftmoe.layers import collect_aux_loss
from mmsoftmoe_eval.datasets import ClassificationDataset
from mmsoftmoe_eval.features import UNREADABLE_LABEL, eval_mode, extract_features
from mmsoftmoe_eval.metrics import classification_metrics

logger = logging.getLogger(__name__)

WEIGHTS_FILE = "classifier.safetensors"
CONFIG_FILE = "classifier.json"


@dataclasses.dataclass(frozen=True)
class FinetuneConfig:
    """Fine-tuning hyper-parameters; defaults follow MAE (docs/design.md, section 5; ViT-B), epochs shortened.

    Attributes:
        epochs: Passes over the train split.
        batch_size: Images per step and process.
        lr: Peak learning rate (MAE scales it as ``5e-4 * global batch / 256``).
        min_lr: Learning rate at the end of the cosine.
        weight_decay: AdamW decoupled weight decay (not applied to biases, norms, ``no_weight_decay()``).
        layer_decay: Layer-wise lr decay: block i of L gets ``lr * layer_decay ** (L + 1 - i)``; 1.0 disables it.
        warmup_epochs: Linear warmup length, in epochs (fractions allowed).
        label_smoothing: Label smoothing (inside the mixup targets when mixup is on).
        mixup: Mixup alpha; 0 disables it (small datasets).
        cutmix: CutMix alpha; 0 disables it.
        drop_path_rate: Stochastic depth of the last block (linear in depth from 0).
        ema_decay: EMA decay of the weights (e.g. 0.9999); 0 disables the EMA. With an EMA, the EMA weights are
            reported and saved.
        clip_grad: Max gradient norm; 0 disables clipping.
        seed: Seed of the head init, data order, mixup and drop path.
    """

    epochs: int = 10
    batch_size: int = 64
    lr: float = 5e-4
    min_lr: float = 1e-6
    weight_decay: float = 0.05
    layer_decay: float = 0.65
    warmup_epochs: float = 1.0
    label_smoothing: float = 0.1
    mixup: float = 0.8
    cutmix: float = 1.0
    drop_path_rate: float = 0.1
    ema_decay: float = 0.0
    clip_grad: float = 0.0
    seed: int = 0


def build_classifier(tower: nn.Module | str, num_classes: int, drop_path_rate: float = 0.0) -> tuple[nn.Module, str]:
    """A timm classifier: ``tower``'s architecture and weights (or fresh ones for a name) with a new head.

    Returns:
        The model and its timm architecture name.
    """
    if isinstance(tower, str):
        return timm.create_model(tower, num_classes=num_classes, drop_path_rate=drop_path_rate), tower
    arch = getattr(tower, "pretrained_cfg", {}).get("architecture")
    if arch is None:
        raise ValueError(f"{type(tower).__name__} is not a timm model (no pretrained_cfg['architecture']): pass a "
                         "tower made by timm.create_model, or a timm model name.")
    model = timm.create_model(arch, num_classes=num_classes, drop_path_rate=drop_path_rate)
    head = f"{model.pretrained_cfg.get('classifier', 'head')}."
    state = {k: v for k, v in tower.state_dict().items() if not k.startswith(head)}
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith(head)]
    if missing or unexpected:
        raise ValueError(f"The tower differs from timm.create_model({arch!r}): missing {missing[:5]}, unexpected "
                         f"{unexpected[:5]}; a tower built with non-default arguments cannot be fine-tuned by name.")
    return model, arch


def save_classifier(model: nn.Module, arch: str, classnames: list[str], folder: str | Path) -> Path:
    """Writes ``classifier.safetensors`` and ``classifier.json`` (architecture, num_classes, classnames)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}, folder / WEIGHTS_FILE)
    meta = {"architecture": arch, "num_classes": len(classnames), "classnames": list(classnames)}
    (folder / CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return folder


def load_classifier(folder: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """A classifier saved by ``save_classifier``, in eval mode, and its JSON metadata."""
    folder = Path(folder)
    if not (folder / CONFIG_FILE).is_file() or not (folder / WEIGHTS_FILE).is_file():
        raise FileNotFoundError(f"{folder} holds no fine-tuned classifier ({CONFIG_FILE} + {WEIGHTS_FILE}).")
    meta = json.loads((folder / CONFIG_FILE).read_text())
    model = timm.create_model(meta["architecture"], num_classes=meta["num_classes"])
    model.load_state_dict(load_file(folder / WEIGHTS_FILE))
    return model.eval(), meta


def build_finetune_optimizer(model: nn.Module, config: FinetuneConfig) -> torch.optim.Optimizer:
    """timm's AdamW with layer-wise lr decay; no weight decay on 1-d parameters and on what the model's
    ``no_weight_decay()`` names (for mmsoftmoe towers: ``pos_embed``, Soft MoE's ``phi`` and the expert biases, the
    same declaration pretraining reads through ``mmsoftmoe.models.accounting.no_weight_decay_names``)."""
    layer_decay = config.layer_decay if config.layer_decay != 1.0 else None
    return create_optimizer_v2(model, opt="adamw", lr=config.lr, weight_decay=config.weight_decay,
                               layer_decay=layer_decay)


def _loss_and_mixup(config: FinetuneConfig, num_classes: int) -> tuple[nn.Module, Mixup | None]:
    """The criterion and, when mixup or cutmix is on, the batch mixer (which then applies the label smoothing)."""
    if config.mixup > 0 or config.cutmix > 0:
        mixup = Mixup(mixup_alpha=config.mixup, cutmix_alpha=config.cutmix, label_smoothing=config.label_smoothing,
                      num_classes=num_classes)
        return SoftTargetCrossEntropy(), mixup
    if config.label_smoothing > 0:
        return LabelSmoothingCrossEntropy(smoothing=config.label_smoothing), None
    return nn.CrossEntropyLoss(), None


def _scheduler(optimizer: torch.optim.Optimizer, config: FinetuneConfig, steps_per_epoch: int) -> CosineLRScheduler:
    """Per-step linear warmup from ``min_lr`` to ``lr``, then cosine down to ``min_lr`` (timm scales each layer)."""
    warmup = round(config.warmup_epochs * steps_per_epoch)
    return CosineLRScheduler(
        optimizer, t_initial=max(1, config.epochs * steps_per_epoch - warmup), lr_min=config.min_lr,
        warmup_t=warmup, warmup_lr_init=config.min_lr, warmup_prefix=True, t_in_epochs=False,
    )


def _train_loader(dataset: ClassificationDataset, config: FinetuneConfig, num_workers: int) -> DataLoader:
    if len(dataset) < config.batch_size:
        raise ValueError(f"The train split has {len(dataset)} images, fewer than batch_size={config.batch_size}: "
                         "lower the batch size.")
    if (config.mixup > 0 or config.cutmix > 0) and config.batch_size % 2:
        raise ValueError(f"Mixup/cutmix needs an even batch size, got {config.batch_size}.")
    return DataLoader(dataset, batch_size=config.batch_size, shuffle=True, drop_last=True, num_workers=num_workers,
                      persistent_workers=num_workers > 0, generator=torch.Generator().manual_seed(config.seed))


def _drop_unreadable(images: torch.Tensor, labels: torch.Tensor, even: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Remove images the dataset could not decode (label UNREADABLE_LABEL); mixup needs an even batch."""
    keep = labels != UNREADABLE_LABEL
    if bool(keep.all()):
        return images, labels
    logger.warning("finetune: dropped %d unreadable image(s) from a batch", int((~keep).sum()))
    images, labels = images[keep], labels[keep]
    if even and len(labels) % 2:
        images, labels = images[:-1], labels[:-1]
    return images, labels


def _train_step(
    model: nn.Module,
    batch: tuple[torch.Tensor, torch.Tensor],
    criterion: nn.Module,
    mixup: Mixup | None,
    optimizer: torch.optim.Optimizer,
    accelerator: Accelerator,
    clip_grad: float,
) -> torch.Tensor:
    """One optimiser step on a batch; returns the detached loss (classification plus router auxiliary losses)."""
    images, labels = _drop_unreadable(*batch, even=mixup is not None)
    targets = labels
    if mixup is not None:
        images, targets = mixup(images, labels)
    loss = criterion(model(images), targets)
    aux_loss = collect_aux_loss(model)
    if aux_loss is not None:
        loss = loss + aux_loss
    accelerator.backward(loss)
    if clip_grad > 0:
        accelerator.clip_grad_norm_(model.parameters(), clip_grad)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach()


def _fit(
    model: nn.Module,
    loader: DataLoader,
    optimizer: torch.optim.Optimizer,
    accelerator: Accelerator,
    config: FinetuneConfig,
    num_classes: int,
    ema: ModelEmaV3 | None,
) -> float:
    """The training loop with a progress bar showing loss and throughput (images/s); returns the last loss."""
    criterion, mixup = _loss_and_mixup(config, num_classes)
    scheduler = _scheduler(optimizer, config, len(loader))
    images_per_step = config.batch_size * accelerator.num_processes
    step, loss = 0, torch.tensor(math.nan)
    model.train()
    with progress_bar(total=config.epochs * len(loader) * images_per_step, desc="finetune", unit="img",
                      show=accelerator.is_local_main_process) as progress:
        for epoch in range(config.epochs):
            for batch in loader:
                loss = _train_step(model, batch, criterion, mixup, optimizer, accelerator, config.clip_grad)
                step += 1
                scheduler.step_update(step)
                if ema is not None:
                    ema.update(accelerator.unwrap_model(model), step=step)
                progress.update(images_per_step)
                if step % 10 == 0:
                    progress.set_postfix(epoch=epoch, loss=f"{loss.item():.3f}")
    return loss.item()


def evaluate_classifier(
    model: nn.Module, dataset: ClassificationDataset, accelerator: Accelerator, batch_size: int, num_workers: int = 0
) -> dict[str, float]:
    """acc1, acc5 and mean per-class recall of a classifier on a labelled dataset (``extract_features`` of logits)."""
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=num_workers)
    with eval_mode(model):
        logits, labels = extract_features(model, loader, accelerator=accelerator, desc="finetune test")
    return classification_metrics(logits, labels)


def finetune(
    tower: nn.Module | str,
    train_set: ClassificationDataset,
    test_set: ClassificationDataset,
    *,
    config: FinetuneConfig = FinetuneConfig(),
    accelerator: Accelerator | None = None,
    num_workers: int = 0,
    out_dir: str | Path | None = None,
) -> dict[str, Any]:
    """Fine-tunes ``tower`` plus a new head on ``train_set``; reports acc1 / acc5 / mean per-class recall on test.

    Args:
        tower: A timm model (its weights are copied, not changed) or a timm name (trained from scratch).
        train_set: Yields ``(image tensor, label)`` with training augmentation; its ``classnames`` size the head.
        test_set: Yields ``(image tensor, label)`` with eval preprocessing, same classes.
        config: Hyper-parameters.
        accelerator: Supplies device, precision and data parallelism; a default ``Accelerator()`` when None.
        num_workers: DataLoader workers.
        out_dir: Where to save the classifier (``save_classifier``); None saves nothing.

    Returns:
        The test metrics of the final weights (the EMA's when ``ema_decay > 0``, then the online weights' under
        ``"online"``), plus ``"train_loss"`` (last step) and ``"architecture"``.
    """
    accelerator = accelerator or Accelerator()
    set_seed(config.seed)
    num_classes = len(train_set.classnames)
    model, arch = build_classifier(tower, num_classes, config.drop_path_rate)
    optimizer = build_finetune_optimizer(model, config)
    loader = _train_loader(train_set, config, num_workers)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    ema = ModelEmaV3(accelerator.unwrap_model(model), decay=config.ema_decay) if config.ema_decay > 0 else None
    train_loss = _fit(model, loader, optimizer, accelerator, config, num_classes, ema)
    final = ema.module if ema is not None else accelerator.unwrap_model(model)
    metrics: dict[str, Any] = evaluate_classifier(final, test_set, accelerator, config.batch_size, num_workers)
    if ema is not None:
        metrics["online"] = evaluate_classifier(accelerator.unwrap_model(model), test_set, accelerator,
                                                config.batch_size, num_workers)
    if out_dir is not None and accelerator.is_main_process:
        save_classifier(final, arch, train_set.classnames, out_dir)
    return {**metrics, "train_loss": train_loss, "architecture": arch}
