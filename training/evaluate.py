"""Evaluation during and after training, through the shared evaluators of `eval/` (one feature loop)."""

from __future__ import annotations

import torch
from accelerate import Accelerator
from torch import nn

from eval import build_dataset, evaluate_fewshot, evaluate_zero_shot, extract_features, make_loader
from eval.features import eval_mode
from training.config import EvalConfig


def _subset(dataset, max_samples: int):
    if len(dataset) <= max_samples:
        return dataset
    return torch.utils.data.Subset(dataset, range(max_samples))


def zero_shot(model: nn.Module, tokenizer, transform, cfg: EvalConfig, accelerator: Accelerator,
              batch_size: int) -> dict[str, float]:
    """Zero-shot top-1/top-5/mean per-class recall on the run's held-out classification split."""
    dataset = build_dataset(cfg.dataset, cfg.split, transform)
    loader = make_loader(_subset(dataset, cfg.max_samples), batch_size, device=accelerator.device)
    metrics = evaluate_zero_shot(model, tokenizer, loader, dataset.classnames, dataset.templates,
                                 accelerator=accelerator)
    return {f"zeroshot/{k}": v for k, v in metrics.items()}


def fewshot(model: nn.Module, transform, cfg: EvalConfig, accelerator: Accelerator,
            batch_size: int) -> dict[str, float]:
    """The paper's 10-shot ridge probe (big_vision `fewshot_lsr`) on frozen image features."""
    feats = {}
    with eval_mode(model):
        for split in ("train", cfg.split):
            dataset = _subset(build_dataset(cfg.dataset, split, transform), 4 * cfg.max_samples)
            loader = make_loader(dataset, batch_size, device=accelerator.device)
            feats[split] = extract_features(model.encode_image, loader, accelerator=accelerator,
                                            desc=f"few-shot {split}")
    result = evaluate_fewshot(*feats["train"], *feats[cfg.split], shots=(10,), num_seeds=3)
    return {"fewshot/10shot_acc1": result["10shot"]["acc1"], "fewshot/10shot_acc1_std": result["10shot"]["acc1_std"]}
