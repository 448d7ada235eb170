"""A training checkpoint (or open_clip folder) opened for export: the CLIP model, its config and trainer state.

The checkpoint contract: a folder with `open_clip_config.json` ({"model_cfg", "preprocess_cfg"}) and weights
(`open_clip_model.safetensors` or `model.safetensors`), optionally `trainer_state.json` ({"step", "config",
"metrics", "samples_seen"}). The image encoder is open_clip's `TimmModel`: `visual.trunk` (the timm ViT, pooled
features) followed by `visual.head.proj` (the linear projection to the CLIP embedding).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from mmsoftmoe.models.clip import CONFIG_NAME, load_clip

TRAINER_STATE_NAME = "trainer_state.json"


@dataclass
class Checkpoint:
    """An opened checkpoint: the CLIP model (eval mode, float32, CPU) and what the card needs to describe it."""

    folder: Path
    model: nn.Module
    tokenizer: object
    config: dict
    trainer_state: dict | None

    @property
    def trunk(self) -> nn.Module:
        """The timm ViT of the image tower (pooled features, no classifier)."""
        return self.model.visual.trunk

    @property
    def projection(self) -> nn.Linear:
        """The linear projection from pooled features to the CLIP embedding."""
        return self.model.visual.head.proj

    @property
    def architecture(self) -> str:
        """The timm name of the image tower, e.g. `softmoe_vit_micro_patch4_32_e16`."""
        return self.trunk.pretrained_cfg["architecture"]

    @property
    def image_size(self) -> tuple[int, int]:
        return tuple(self.model.visual.image_size)

    @property
    def preprocess_cfg(self) -> dict:
        return self.config["preprocess_cfg"]

    def image_encoder(self, proj: bool = True) -> nn.Module:
        """Pixels -> CLIP image embedding (`proj`), or -> pooled trunk features."""
        return self.model.visual if proj else self.trunk


def load_checkpoint(folder: str | Path) -> Checkpoint:
    """Open a checkpoint folder; errors name the missing file or the mismatching architecture."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"checkpoint folder {folder} does not exist")
    if not (folder / CONFIG_NAME).is_file():
        raise FileNotFoundError(f"checkpoint {folder} has no {CONFIG_NAME}: not an mmsoftmoe checkpoint folder")
    tower = read_json(folder / CONFIG_NAME).get("model_cfg", {}).get("vision_cfg", {}).get("timm_model_name")
    try:
        model, tokenizer, config = load_clip(folder)
    except (ValueError, RuntimeError) as err:
        raise ValueError(
            f"the weights in checkpoint {folder} do not match the architecture of its {CONFIG_NAME} "
            f"(vision tower {tower}): is it a checkpoint of another model? ({str(err).splitlines()[0]})"
        ) from err
    _check_tower(folder, model)
    state_path = folder / TRAINER_STATE_NAME
    trainer_state = read_json(state_path) if state_path.is_file() else None
    return Checkpoint(folder, model, tokenizer, config, trainer_state)


def read_json(path: Path) -> dict:
    """A JSON file's content; a ValueError names the file when it is not valid JSON."""
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from err


def _check_tower(folder: Path, model: nn.Module) -> None:
    """Export handles open_clip timm towers with a linear projection (what mmsoftmoe's configs build)."""
    visual = model.visual
    head = getattr(visual, "head", None)
    if not hasattr(visual, "trunk") or not isinstance(getattr(head, "proj", None), nn.Linear):
        raise ValueError(f"checkpoint {folder}: the image tower is not an open_clip timm tower with a linear "
                         "projection (vision_cfg.timm_model_name + timm_proj='linear'); export supports only those")
