"""A checkpoint folder opened for export: the CLIP model, its config and trainer state.

Any folder `mmsoftmoe.checkpoint` describes: a training checkpoint (`checkpoints/step_*`; a sharded run's is read
whole from its DCP shards, with no `mmsoftmoe consolidate` first), `final/` or an open_clip folder, read by
`load_clip` (damage is a `CheckpointError` naming the file), with its `trainer_state.json` when it has one ({"step",
"config", "metrics", "samples_seen"}). The image encoder is open_clip's `TimmModel`: `visual.trunk` (the timm ViT,
pooled features) followed by `visual.head.proj` (the linear projection to the CLIP embedding).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from torch import nn

from mmsoftmoe.checkpoint import CONFIG_NAME, TRAINER_STATE_NAME, ConfigMismatchError, read_json
from mmsoftmoe.parallel.dcp import load_whole_clip


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


def open_checkpoint(folder: str | Path, verify: bool = True) -> Checkpoint:
    """Open a checkpoint folder for export, verified against its manifest first (unless `verify` is off); errors
    name the missing or damaged file or the mismatching architecture."""
    folder = Path(folder)
    try:
        model, tokenizer, config = load_whole_clip(folder, verify=verify)  # a sharded run's too
    except ConfigMismatchError as err:
        tower = config_tower(folder)
        raise ConfigMismatchError(
            f"the weights in checkpoint {folder} do not match the architecture of its {CONFIG_NAME} "
            f"(vision tower {tower}): is it a checkpoint of another model? ({str(err).splitlines()[0]})"
        ) from err
    _check_tower(folder, model)
    state_path = folder / TRAINER_STATE_NAME
    trainer_state = read_json(state_path) if state_path.is_file() else None
    return Checkpoint(folder, model, tokenizer, config, trainer_state)


def config_tower(folder: Path) -> str | None:
    """The timm name of the vision tower its `open_clip_config.json` declares."""
    return read_json(folder / CONFIG_NAME).get("model_cfg", {}).get("vision_cfg", {}).get("timm_model_name")


def _check_tower(folder: Path, model: nn.Module) -> None:
    """Export handles open_clip timm towers with a linear projection (what mmsoftmoe's configs build)."""
    visual = model.visual
    head = getattr(visual, "head", None)
    if not hasattr(visual, "trunk") or not isinstance(getattr(head, "proj", None), nn.Linear):
        raise ValueError(f"checkpoint {folder}: the image tower is not an open_clip timm tower with a linear "
                         "projection (vision_cfg.timm_model_name + timm_proj='linear'); export supports only those")
