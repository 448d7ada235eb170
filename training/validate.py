"""Held-out validation on image-text pairs (open_clip's `--val-data`): the contrastive loss and retrieval recall.

The numbers open_clip's trainer reports (`open_clip_train.train.evaluate`): the run's contrastive loss on each
validation batch, averaged over samples (`clip_val_loss`; like open_clip's, it depends on the batch size, since
a batch's other pairs are its negatives), and retrieval among all validation pairs from the similarity matrix of
the whole set: the rank of each image's own caption (`image_to_text`) and of each caption's own image
(`text_to_image`), as recall@k, mean and median rank. The similarity matrix is (pairs x pairs): meant for
validation sets of thousands, not millions. The config keys are `data.val_source` and `val_every`;
`build_val_loader` reads the former.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch
from accelerate import Accelerator
from torch import nn
from torch.utils.data import DataLoader, Subset

from mmsoftmoe.data import collate, load_pairs, transforms_from_preprocess_cfg
from mmsoftmoe_training.config import DataConfig
from mmsoftmoe_training.loop import loss_terms

RECALL_KS = (1, 5, 10)


def build_val_loader(data: DataConfig, preprocess_cfg: dict, tokenizer: Callable, *, batch_size: int, rank: int,
                     world_size: int) -> DataLoader:
    """This process's batches of `data.val_source` (read like `data.source`, map-style, evaluation transform).

    Each process takes an equal contiguous share (the last `len % world_size` pairs are left out), so the
    distributed loss sees equal batches on every process; `batch_size` is per process.
    """
    if data.val_source is None:
        raise ValueError("validation needs held-out pairs: set data.val_source")
    _, eval_tf = transforms_from_preprocess_cfg(preprocess_cfg)
    pairs = load_pairs(data.val_source, data.format, image_column=data.image_column,
                       caption_column=data.caption_column, csv_separator=data.csv_separator, cache_dir=data.cache_dir,
                       transform=eval_tf, tokenizer=tokenizer, max_pixels=data.max_image_pixels)
    share = len(pairs) // world_size
    if share == 0:
        raise ValueError(f"data.val_source holds {len(pairs)} pairs, fewer than the {world_size} processes")
    return DataLoader(Subset(pairs, range(rank * share, (rank + 1) * share)), batch_size=batch_size,
                      collate_fn=collate)


def validation_metrics(model: nn.Module, loader: Iterable[dict], loss_fn: nn.Module,
                       accelerator: Accelerator | None = None, ks: Sequence[int] = RECALL_KS) -> dict[str, float]:
    """Validation loss and retrieval metrics of `model` on the pairs `loader` yields.

    Args:
        model: An open_clip CLIP model (dict output); evaluated in eval mode, its mode restored after.
        loader: Batches `{"image": [b, 3, H, W], "text": [b, ctx]}` (`mmsoftmoe.data.collate`); with several
            processes, each process's own share (e.g. `accelerator.prepare_data_loader`), equal batch sizes.
        loss_fn: The run's loss (`mmsoftmoe_training.loop.build_loss`); its `*_loss` terms are summed.
        accelerator: Gathers loss sums and features over processes; None: one process, the model's device.
        ks: Recall cut-offs.

    Returns:
        `val/contrastive_loss`, `val/{image_to_text,text_to_image}_recall@k`, `..._mean_rank`, `..._median_rank`
        and `val/num_samples`, the same on every process.
    """
    device = accelerator.device if accelerator is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        loss_sum, count, image_features, text_features, logit_scale = _forward_all(model, loader, loss_fn, device)
    finally:
        model.train(was_training)
    if not image_features:
        raise ValueError("validation: the loader yielded no batches; check data.val_source")
    images, texts = torch.cat(image_features), torch.cat(text_features)
    totals = torch.tensor([loss_sum, count], dtype=torch.float64, device=device)
    if accelerator is not None:
        totals = accelerator.reduce(totals, reduction="sum")
        images, texts = accelerator.gather_for_metrics(images), accelerator.gather_for_metrics(texts)
    metrics = {"val/contrastive_loss": (totals[0] / totals[1]).item(), "val/num_samples": float(len(images))}
    metrics.update(retrieval_ranks(images, texts, logit_scale, ks))
    return metrics


def _forward_all(model: nn.Module, loader: Iterable[dict], loss_fn: nn.Module, device: torch.device):
    """(sum over batches of loss x batch size, samples, image features, text features, logit scale)."""
    loss_sum, count, images, texts, scale = 0.0, 0, [], [], None
    with torch.inference_mode():
        for batch in loader:
            out = model(batch["image"].to(device), batch["text"].to(device))
            terms = loss_terms(loss_fn, out, aux_loss=None)
            size = len(batch["image"])
            loss_sum += float(sum(v for k, v in terms.items() if k.endswith("_loss"))) * size
            count += size
            images.append(out["image_features"].float())
            texts.append(out["text_features"].float())
            scale = out["logit_scale"].float().mean()
    return loss_sum, count, images, texts, scale


def retrieval_ranks(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor,
                    ks: Sequence[int] = RECALL_KS) -> dict[str, float]:
    """Recall@k, mean and median rank (1 = first) of each pair's partner among all pairs, both directions
    (open_clip's `get_clip_metrics`, `val/` names)."""
    logits_it = logit_scale * image_features @ text_features.t()  # [images, texts]
    truth = torch.arange(len(image_features), device=logits_it.device)
    metrics = {}
    for name, logits in (("image_to_text", logits_it), ("text_to_image", logits_it.t())):
        # rank = how many candidates score higher than the true partner (0 = first); ties count in its favour
        rank_0 = (logits > logits[truth, truth].unsqueeze(1)).sum(dim=1).double()
        metrics[f"val/{name}_mean_rank"] = (rank_0.mean() + 1).item()
        metrics[f"val/{name}_median_rank"] = (rank_0.quantile(0.5).floor() + 1).item()  # numpy's median, floored
        metrics.update({f"val/{name}_recall@{k}": (rank_0 < k).double().mean().item() for k in ks})
    return metrics
