"""Shared builders for the training tests (a tiny model and a fixed global batch)."""

import json
import math
from pathlib import Path

import torch

from mmsoftmoe.data import PairDataset, ShapesCaptions, collate, transforms_from_preprocess_cfg
from mmsoftmoe.models.clip import build_clip_from_config, preprocess_config, resolve_clip_config

MODEL = "SoftMoE-Micro-4-32"


def make_model(loss: str = "clip"):
    cfg = resolve_clip_config(MODEL)
    if loss == "siglip":
        cfg.update(init_logit_scale=math.log(10), init_logit_bias=-10.0)
    return build_clip_from_config(cfg)


def global_batch(tokenizer, size: int) -> dict:
    model, _ = make_model()
    _, eval_tf = transforms_from_preprocess_cfg(preprocess_config(model))
    data = PairDataset(ShapesCaptions(size, image_size=32, seed=3), transform=eval_tf, tokenizer=tokenizer)
    return collate([data[i] for i in range(size)])


def rank_slice(batch: dict, rank: int, world: int) -> dict:
    per = batch["image"].shape[0] // world
    return {k: v[rank * per:(rank + 1) * per] for k, v in batch.items()}


def split(batch: dict, parts: int) -> list[dict]:
    return [rank_slice(batch, j, parts) for j in range(parts)]


def grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def shapes_image_folder(folder: Path, count: int) -> list[dict]:
    """`count` generated 32 px shapes saved as PNGs in a new `folder`; their metadata rows (file_name, text)."""
    folder.mkdir()
    rows = []
    for i, sample in enumerate(ShapesCaptions(count, image_size=32, seed=5)):
        sample["image"].save(folder / f"{i}.png")
        rows.append({"file_name": f"{i}.png", "text": sample["caption"]})
    return rows


def write_metadata(folder: Path, rows: list[dict]) -> None:
    """The image folder's `metadata.jsonl` (what `datasets`' imagefolder reads captions from)."""
    (folder / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
