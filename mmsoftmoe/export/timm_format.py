"""timm export: the image tower as a timm model folder (`model.safetensors` + `config.json`).

The folder is what timm's own `save_for_hf` writes (architecture, num_classes, num_features, model_args,
pretrained_cfg), so after `import mmsoftmoe` (which registers the architectures) both
`timm.create_model("local-dir:<folder>", pretrained=True)` and
`timm.create_model(arch, pretrained=True, pretrained_cfg_overlay=dict(file=..., num_classes=n), num_classes=n)`
return the trained tower. With the projection, it becomes timm's classifier `head` (num_classes = the CLIP
embedding width); timm's ViT head always has a bias, so it is exported as zeros, as timm's own open_clip
checkpoint converter (`checkpoint_filter_fn`) does. Without it, `num_classes=0` gives the pooled features.
The preprocessing recorded in `pretrained_cfg` is the CLIP checkpoint's (mean, std, interpolation).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import timm
import torch
from timm.models import save_for_hf
from torch import nn

from mmsoftmoe.export.base import Format
from mmsoftmoe.export.source import Checkpoint

WEIGHTS_NAME = "model.safetensors"
TIMM_CONFIG_NAME = "config.json"


def timm_tower(ckpt: Checkpoint, proj: bool) -> nn.Module:
    """A copy of the trunk whose classifier head is the CLIP projection (zero bias), or no head."""
    trunk = copy.deepcopy(ckpt.trunk)
    if proj:
        trunk.reset_classifier(ckpt.projection.out_features)
        with torch.no_grad():
            trunk.head.weight.copy_(ckpt.projection.weight)
            bias = ckpt.projection.bias
            trunk.head.bias.copy_(bias if bias is not None else torch.zeros_like(trunk.head.bias))
    return trunk.eval()


def data_config(preprocess_cfg: dict) -> dict:
    """timm's data config equivalent to open_clip's preprocessing (resize + centre crop, or squash)."""
    cfg = dict(mean=tuple(preprocess_cfg["mean"]), std=tuple(preprocess_cfg["std"]),
               interpolation=preprocess_cfg["interpolation"], crop_pct=1.0)
    if preprocess_cfg.get("resize_mode") == "squash":
        cfg["crop_mode"] = "squash"
    return cfg


def write(ckpt: Checkpoint, folder: Path, proj: bool) -> dict:
    save_for_hf(timm_tower(ckpt, proj), str(folder), safe_serialization=True,
                data_config=data_config(ckpt.preprocess_cfg))
    return {"architecture": ckpt.architecture, "num_classes": ckpt.projection.out_features if proj else 0,
            "files": [WEIGHTS_NAME, TIMM_CONFIG_NAME]}


def load(folder: Path) -> nn.Module:
    """The tower as a user gets it: `timm.create_model(arch, pretrained=True, pretrained_cfg_overlay=...)`."""
    config = json.loads((Path(folder) / TIMM_CONFIG_NAME).read_text())
    num_classes = config["num_classes"]
    overlay = dict(config["pretrained_cfg"], file=str(Path(folder) / WEIGHTS_NAME))
    return timm.create_model(config["architecture"], pretrained=True, pretrained_cfg_overlay=overlay,
                             num_classes=num_classes).eval()


SNIPPET = """\
import mmsoftmoe  # registers the architecture in timm
import timm

model = timm.create_model("local-dir:$folder", pretrained=True).eval()
# or, naming the architecture (num_classes must match the export, or timm drops the head silently):
model = timm.create_model("$architecture", pretrained=True, num_classes=$num_classes,
                          pretrained_cfg_overlay=dict(file="$folder/model.safetensors", num_classes=$num_classes))
data_cfg = timm.data.resolve_data_config(model=model)  # the CLIP preprocessing (mean, std, size)
features = model(pixels)  # (batch, $output_dim)
"""

FORMAT = Format(
    name="timm",
    summary="timm model folder (model.safetensors + config.json); the projection is the classifier head",
    write=write,
    load=load,
    snippet=SNIPPET,
)
