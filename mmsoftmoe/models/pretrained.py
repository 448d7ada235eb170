"""Warm starts: initialise a CLIP model, or one of its towers, from a checkpoint of the same architecture.

A warm start is not a resume: only weights are read (the optimizer, schedule and data position start afresh).
Keys are matched by name; tensors of another shape are an error naming them; keys missing on either side are
reported, so a partial match (a CLIP with another text tower, say) is visible rather than silent. The weights are
read and verified by `mmsoftmoe.checkpoint.read_clip_weights` (a model folder or one weights file).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

TOWERS = ("both", "image", "text")


@dataclass
class WarmStartReport:
    loaded: list[str]
    missing: list[str]  # the model's keys of the chosen towers that the checkpoint lacks (left as initialised)
    unexpected: list[str]  # the checkpoint's keys of the chosen towers that the model lacks (ignored)


def in_tower(key: str, towers: str) -> bool:
    """Whether a CLIP state-dict key belongs to `towers` (the image tower is `visual.*`; the rest is text, and
    the logit scale and bias come only with both)."""
    if towers == "both":
        return True
    image = key.startswith("visual.")
    shared = key in ("logit_scale", "logit_bias")
    return image if towers == "image" else not image and not shared


@torch.no_grad()
def warm_start_(model: nn.Module, state: Mapping[str, torch.Tensor], towers: str = "both") -> WarmStartReport:
    """Copy `state` into `model` for the chosen towers (both, image or text).

    Raises:
        ValueError: an unknown `towers`, or tensors whose shapes differ (named, with both shapes).
    """
    if towers not in TOWERS:
        raise ValueError(f"towers={towers!r} is not valid; choices: {TOWERS}")
    own = {k: v for k, v in model.state_dict().items() if in_tower(k, towers)}
    given = {k: v for k, v in state.items() if in_tower(k, towers)}
    mismatched = [f"{k}: checkpoint {tuple(given[k].shape)} vs model {tuple(v.shape)}"
                  for k, v in own.items() if k in given and given[k].shape != v.shape]
    if mismatched:
        raise ValueError(f"the checkpoint does not fit this architecture ({len(mismatched)} tensors differ in "
                         f"shape, e.g. {'; '.join(mismatched[:3])}); use a checkpoint of the same model config")
    for key in own.keys() & given.keys():
        own[key].copy_(given[key])
    return WarmStartReport(loaded=sorted(own.keys() & given.keys()), missing=sorted(own.keys() - given.keys()),
                           unexpected=sorted(given.keys() - own.keys()))
