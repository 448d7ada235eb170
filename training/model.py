"""The run's model from its config: the open_clip CLIP model mmsoftmoe registers, its start weights (sparse
upcycling, warm start) and the tower locking and checkpointing the config asks for."""

from __future__ import annotations

import logging

import open_clip
import torch

from mmsoftmoe.models.clip import build_clip_from_config, preprocess_config, resolve_clip_config, with_patch_dropout
from mmsoftmoe.models.pretrained import warm_start_
from mmsoftmoe.models.upcycle import upcycle_
from mmsoftmoe_training.checkpointing import read_start_weights
from mmsoftmoe_training.config import TrainConfig

logger = logging.getLogger("mmsoftmoe.train")


def build_model(cfg: TrainConfig, device: str = "cpu"):
    """(model, tokenizer, complete open_clip model config), towers locked and checkpointing set as configured.

    On `device="meta"` only the structure is built (no weights are allocated, upcycled or loaded).
    """
    model_cfg = resolve_clip_config(cfg.model.name, cfg.model.text_model)
    if cfg.loss == "siglip" and model_cfg.get("init_logit_bias") is None:
        raise ValueError(f"loss=siglip needs a model with a logit bias, and {cfg.model.name} has none; use a "
                         "*-Sigmoid model config (init_logit_bias=-10, init_logit_scale=log 10) or loss=clip")
    # patch dropout is a training setting: the config saved with the model (final/, exports) does not carry it
    model, tokenizer = build_clip_from_config(with_patch_dropout(model_cfg, cfg.model.patch_dropout), device=device)
    open_clip.set_model_preprocess_cfg(model, preprocess_config(model))
    if device != "meta":
        load_start_weights(cfg, model)
    if cfg.model.lock_image:
        model.lock_image_tower(unlocked_groups=cfg.model.lock_image_unlocked_groups)
    if cfg.model.lock_text:
        model.lock_text_tower(unlocked_layers=cfg.model.lock_text_unlocked_layers)
    model.set_grad_checkpointing(cfg.model.grad_checkpointing)
    return model, tokenizer, model_cfg


def load_start_weights(cfg: TrainConfig, model: torch.nn.Module) -> None:
    """Upcycle the image tower from a dense checkpoint and/or warm-start from pretrained weights, as configured."""
    if cfg.model.upcycle_from:
        report = upcycle_(model.visual.trunk, read_start_weights(cfg.model.upcycle_from, cfg.verify_checkpoints))
        logger.info("upcycled the image tower from %s: %d tensors copied, %d expert tensors from dense MLPs, %d "
                    "fresh (routers), %d unused", cfg.model.upcycle_from, len(report.copied), len(report.upcycled),
                    len(report.fresh), len(report.unused))
    if cfg.model.pretrained:
        report = warm_start_(model, read_start_weights(cfg.model.pretrained, cfg.verify_checkpoints),
                             cfg.model.pretrained_towers)
        logger.info("warm start (%s) from %s: %d tensors loaded; missing %s; unexpected %s",
                    cfg.model.pretrained_towers, cfg.model.pretrained, len(report.loaded),
                    report.missing or "none", report.unexpected or "none")
