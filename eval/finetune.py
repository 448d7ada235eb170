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
A tower sharded over several processes (``mmsoftmoe.parallel``: FSDP2 and expert parallelism, as a paper-size run
holds it) is fine-tuned sharded the same way (``meshes``): no process holds the whole classifier. Each sample's
augmentation is drawn from (seed, epoch, index) and the new head from (seed, its name), so a fine-tune does not
depend on how many processes or data workers run it (mixup, cutmix and drop path still draw per process).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
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
from torch.distributed.tensor import DTensor
from torch.utils.data import DataLoader, Dataset, Sampler

from mmsoftmoe.console import progress_bar
from mmsoftmoe.data.transforms import seeded_augmentation
from mmsoftmoe.layers import collect_aux_loss
from mmsoftmoe.models.init import init_parameter_, init_rules
from mmsoftmoe.parallel import ParallelMeshes, clip_grad_norm_, full_model_state_dict, parallelize
from mmsoftmoe_eval.datasets import ClassificationDataset
from mmsoftmoe_eval.features import UNREADABLE_LABEL, eval_mode, extract_features
from mmsoftmoe_eval.metrics import classification_metrics

logger = logging.getLogger(__name__)

ClipFn = Callable[[Iterable[torch.Tensor], float], torch.Tensor]

WEIGHTS_FILE = "classifier.safetensors"
CONFIG_FILE = "classifier.json"
LOG_FILE = "train_log.jsonl"


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


def _architecture(tower: nn.Module) -> str:
    arch = getattr(tower, "pretrained_cfg", {}).get("architecture")
    if arch is None:
        raise ValueError(f"{type(tower).__name__} is not a timm model (no pretrained_cfg['architecture']): pass a "
                         "tower made by timm.create_model, or a timm model name.")
    return arch


def _head_prefix(model: nn.Module) -> str:
    return f"{model.pretrained_cfg.get('classifier', 'head')}."


@torch.no_grad()
def _copy_tower_(model: nn.Module, tower: nn.Module, arch: str) -> None:
    """Every parameter and buffer of ``model`` but its head from ``tower`` (both whole, or both sharded alike)."""
    head = _head_prefix(model)
    ours = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    theirs = {**dict(tower.named_parameters()), **dict(tower.named_buffers())}
    missing = [k for k in ours if k not in theirs and not k.startswith(head)]
    unexpected = [k for k in theirs if k not in ours and not k.startswith(head)]
    if missing or unexpected:
        raise ValueError(f"The tower differs from timm.create_model({arch!r}): missing {missing[:5]}, unexpected "
                         f"{unexpected[:5]}; a tower built with non-default arguments cannot be fine-tuned by name.")
    for name, tensor in ours.items():
        if not name.startswith(head):
            tensor.copy_(theirs[name])


def _init_head_(model: nn.Module, seed: int) -> None:
    """The new head's starting values as the tower's own initialisation draws them (timm's for a ViT: truncated
    normal 0.02, zero bias), from a generator per parameter (``mmsoftmoe.models.init``): the same values whether
    the classifier is whole or sharded."""
    head = _head_prefix(model)
    rules = init_rules(model, keep=("",))  # only the head's rules are needed: no parameter must have one
    for name, param in model.named_parameters():
        if name.startswith(head):
            if name not in rules:
                raise ValueError(f"no initialisation rule for the new head's {name} ({type(model).__name__})")
            init_parameter_(param, name, rules[name], seed)


def build_classifier(tower: nn.Module | str, num_classes: int, drop_path_rate: float = 0.0,
                     seed: int | None = None) -> tuple[nn.Module, str]:
    """A timm classifier: ``tower``'s architecture and weights (or fresh ones for a name) with a new head, drawn
    from (``seed``, its name) (None: the seed torch was last seeded with).

    Returns:
        The model and its timm architecture name.
    """
    if isinstance(tower, str):
        return timm.create_model(tower, num_classes=num_classes, drop_path_rate=drop_path_rate), tower
    arch = _architecture(tower)
    model = timm.create_model(arch, num_classes=num_classes, drop_path_rate=drop_path_rate)
    _copy_tower_(model, tower, arch)
    _init_head_(model, torch.initial_seed() if seed is None else seed)
    return model, arch


def build_sharded_classifier(tower: nn.Module, num_classes: int, drop_path_rate: float, seed: int,
                             meshes: ParallelMeshes, device: torch.device,
                             param_dtype: torch.dtype | None = None) -> tuple[nn.Module, str]:
    """``build_classifier`` for a tower sharded over ``meshes`` (``mmsoftmoe.parallel``): the classifier is built on
    the meta device and sharded the same way, then each process copies its own shards of the tower and draws its
    shard of the head, so no process holds the whole classifier (call on every process)."""
    arch = _architecture(tower)
    with torch.device("meta"):
        model = timm.create_model(arch, num_classes=num_classes, drop_path_rate=drop_path_rate)
    parallelize(model, meshes, param_dtype=param_dtype)
    model.to_empty(device=device)
    _copy_tower_(model, tower, arch)
    _init_head_(model, seed)
    return model, arch


def save_classifier(model: nn.Module | dict[str, torch.Tensor], arch: str, classnames: list[str],
                    folder: str | Path) -> Path:
    """Writes ``classifier.safetensors`` (the model's weights, or a state dict) and ``classifier.json``
    (architecture, num_classes, classnames)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = model if isinstance(model, dict) else model.state_dict()
    save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, folder / WEIGHTS_FILE)
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


class EpochShuffle(Sampler[tuple[int, int]]):
    """A new permutation of the train split each epoch, drawn from (seed, epoch), yielding ``(epoch, index)``: every
    process draws the same order (accelerate hands each its share of every batch), and ``SeededSamples`` augments
    each sample from (seed, epoch, index) alone. A fine-tune is then the same on any number of processes and data
    workers, given the same global batch (drop path and mixup aside: they draw in the training step)."""

    def __init__(self, size: int, seed: int) -> None:
        self.size, self.seed, self.epoch = size, seed, 0

    def __len__(self) -> int:
        return self.size

    def __iter__(self):
        order = np.random.default_rng([self.seed, self.epoch]).permutation(self.size)
        epoch, self.epoch = self.epoch, self.epoch + 1
        return ((epoch, int(index)) for index in order)


class SeededSamples(Dataset):
    """``dataset[index]`` for the key ``(epoch, index)``, its random transforms drawn from (seed, epoch, index)."""

    def __init__(self, dataset: ClassificationDataset, seed: int) -> None:
        self.dataset, self.seed = dataset, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, int]:
        epoch, index = key
        with seeded_augmentation(self.seed, epoch, index):
            return self.dataset[index]


def _train_loader(dataset: ClassificationDataset, config: FinetuneConfig, num_workers: int) -> DataLoader:
    if len(dataset) < config.batch_size:
        raise ValueError(f"The train split has {len(dataset)} images, fewer than batch_size={config.batch_size}: "
                         "lower the batch size.")
    if (config.mixup > 0 or config.cutmix > 0) and config.batch_size % 2:
        raise ValueError(f"Mixup/cutmix needs an even batch size, got {config.batch_size}.")
    return DataLoader(SeededSamples(dataset, config.seed), batch_size=config.batch_size,
                      sampler=EpochShuffle(len(dataset), config.seed), drop_last=True, num_workers=num_workers,
                      persistent_workers=num_workers > 0)


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
    clip_grad_norm: ClipFn | None = None,
) -> torch.Tensor:
    """One optimiser step on a batch; returns the detached loss (classification plus router auxiliary losses).
    ``clip_grad_norm``: accelerate's when None (a sharded model passes ``mmsoftmoe.parallel.clip_grad_norm_``)."""
    images, labels = _drop_unreadable(*batch, even=mixup is not None)
    targets = labels
    if mixup is not None:
        images, targets = mixup(images, labels)
    with accelerator.autocast():  # a model accelerate prepared autocasts already; a sharded one does not
        loss = criterion(model(images), targets)
        aux_loss = collect_aux_loss(model)
        if aux_loss is not None:
            loss = loss + aux_loss
    accelerator.backward(loss)
    if clip_grad > 0:
        (clip_grad_norm or accelerator.clip_grad_norm_)(model.parameters(), clip_grad)
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
    clip_grad_norm: ClipFn | None = None,
) -> list[dict[str, float]]:
    """The training loop with a progress bar showing loss and throughput (images/s); returns one record per step:
    epoch, peak learning rate (the head's: layer decay scales the blocks' down) and the loss averaged over the
    processes."""
    criterion, mixup = _loss_and_mixup(config, num_classes)
    scheduler = _scheduler(optimizer, config, len(loader))
    images_per_step = config.batch_size * accelerator.num_processes
    step, losses, records = 0, [], []
    model.train()
    with progress_bar(total=config.epochs * len(loader) * images_per_step, desc="finetune", unit="img",
                      show=accelerator.is_local_main_process) as progress:
        for epoch in range(config.epochs):
            for batch in loader:
                records.append({"step": step + 1, "epoch": epoch, "lr": max(g["lr"] for g in optimizer.param_groups)})
                loss = _train_step(model, batch, criterion, mixup, optimizer, accelerator, config.clip_grad,
                                   clip_grad_norm)
                losses.append(loss.float())
                step += 1
                scheduler.step_update(step)
                if ema is not None:
                    ema.update(accelerator.unwrap_model(model), step=step)
                progress.update(images_per_step)
                if step % 10 == 0:
                    progress.set_postfix(epoch=epoch, loss=f"{loss.item():.3f}")
    if not losses:
        return []
    means = accelerator.reduce(torch.stack(losses), reduction="mean").tolist()  # one collective, at the end
    return [{**record, "loss": loss} for record, loss in zip(records, means, strict=True)]


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
    meshes: ParallelMeshes | None = None,
) -> dict[str, Any]:
    """Fine-tunes ``tower`` plus a new head on ``train_set``; reports acc1 / acc5 / mean per-class recall on test.

    Args:
        tower: A timm model (its weights are copied, not changed) or a timm name (trained from scratch).
        train_set: Yields ``(image tensor, label)`` with training augmentation; its ``classnames`` size the head.
        test_set: Yields ``(image tensor, label)`` with eval preprocessing, same classes.
        config: Hyper-parameters.
        accelerator: Supplies device, precision and data parallelism; a default ``Accelerator()`` when None.
        num_workers: DataLoader workers.
        out_dir: Where to save the classifier (``save_classifier``) and ``train_log.jsonl`` (per step: epoch, lr,
            loss); None saves nothing.
        meshes: The meshes ``tower`` is sharded over (``mmsoftmoe.parallel``), for a tower too big for one device:
            the classifier is sharded the same way (FSDP2, experts split over ``ep``) and trained on every process
            (call on every process); its saved weights are gathered into the main process's host memory.

    Returns:
        The test metrics of the final weights (the EMA's when ``ema_decay > 0``, then the online weights' under
        ``"online"``), plus ``"train_loss"`` (last step, averaged over the processes) and ``"architecture"``.
    """
    accelerator = accelerator or Accelerator()
    set_seed(config.seed)
    num_classes = len(train_set.classnames)
    if meshes is not None:
        _check_sharded(tower, config, accelerator)
    elif not isinstance(tower, str) and any(isinstance(p, DTensor) for p in tower.parameters()):
        raise ValueError("the tower is sharded (DTensor parameters): pass the meshes it is sharded over (meshes=)")
    loader = _train_loader(train_set, config, num_workers)
    if meshes is None:
        model, arch = build_classifier(tower, num_classes, config.drop_path_rate, seed=config.seed)
        optimizer = build_finetune_optimizer(model, config)
        model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
        clip_grad_norm = None
    else:
        param_dtype = torch.bfloat16 if accelerator.mixed_precision == "bf16" else None
        model, arch = build_sharded_classifier(tower, num_classes, config.drop_path_rate, config.seed, meshes,
                                               accelerator.device, param_dtype)
        optimizer = build_finetune_optimizer(model, config)
        loader, clip_grad_norm = accelerator.prepare_data_loader(loader), clip_grad_norm_
    ema = ModelEmaV3(accelerator.unwrap_model(model), decay=config.ema_decay) if config.ema_decay > 0 else None
    log = _fit(model, loader, optimizer, accelerator, config, num_classes, ema, clip_grad_norm)
    final = ema.module if ema is not None else accelerator.unwrap_model(model)
    metrics: dict[str, Any] = evaluate_classifier(final, test_set, accelerator, config.batch_size, num_workers)
    if ema is not None:
        metrics["online"] = evaluate_classifier(accelerator.unwrap_model(model), test_set, accelerator,
                                                config.batch_size, num_workers)
    if out_dir is not None:
        state = full_model_state_dict(final) if meshes is not None else final  # collective: every process
        if accelerator.is_main_process:
            save_classifier(state, arch, train_set.classnames, out_dir)
            (Path(out_dir) / LOG_FILE).write_text("".join(json.dumps(record) + "\n" for record in log))
    return {**metrics, "train_loss": log[-1]["loss"] if log else math.nan, "architecture": arch}


def _check_sharded(tower: nn.Module | str, config: FinetuneConfig, accelerator: Accelerator) -> None:
    """What a sharded fine-tune cannot do, named (before anything is built)."""
    if isinstance(tower, str):
        raise ValueError("a sharded fine-tune starts from a sharded tower (meshes given): pass the tower, not a name")
    if config.ema_decay > 0:
        raise ValueError(f"ema_decay={config.ema_decay}: the weight EMA (timm's ModelEmaV3) keeps a whole copy of the "
                         "model, which a sharded fine-tune does not hold; use --ft-ema-decay 0")
    if accelerator.mixed_precision == "fp16":
        raise ValueError("--precision fp16 needs a gradient scaler, which a sharded fine-tune does not have; use bf16 "
                         "(or no)")
