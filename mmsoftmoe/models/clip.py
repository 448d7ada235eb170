"""CLIP models whose image tower is an mmsoftmoe ViT, built by open_clip from JSON configs shipped here.

open_clip assembles the model (`CLIP` / `CustomTextCLIP`: `encode_image`, `encode_text`, `logit_scale`,
`logit_bias`, dict output), so a model trained with mmsoftmoe is an open_clip model. The configs in
`model_configs/` (one file per model name, open_clip's format) are registered with `open_clip.add_model_config`
when `mmsoftmoe` is imported; their vision towers are timm names registered by `mmsoftmoe_vit`, since open_clip
only forwards drop-path / patch-drop settings to timm (SPEC section 4).

A Hugging Face transformers text encoder can replace open_clip's text transformer: `text_model` is a local folder
with the model and its tokenizer (`save_pretrained` output); nothing is downloaded.
"""

from __future__ import annotations

import copy
from pathlib import Path

import open_clip
import torch
from torch import nn

MODEL_CONFIG_DIR = Path(__file__).parent / "model_configs"
open_clip.add_model_config(MODEL_CONFIG_DIR)


def list_clip_models() -> list[str]:
    """Names of the CLIP configs mmsoftmoe ships."""
    return sorted(p.stem for p in MODEL_CONFIG_DIR.glob("*.json"))


def get_clip_config(model_name: str) -> dict:
    """The open_clip model config of `model_name` (a copy); a ValueError lists the known names."""
    cfg = open_clip.get_model_config(model_name)
    if cfg is None:
        raise ValueError(f"unknown CLIP model {model_name!r}; mmsoftmoe ships: {list_clip_models()} "
                         "(any other open_clip config name also works)")
    return copy.deepcopy(cfg)


def hf_text_cfg(text_model: str | Path, context_length: int, proj_type: str = "linear",
                pooler_type: str = "mean_pooler") -> dict:
    """open_clip `text_cfg` for a local Hugging Face encoder folder (model and tokenizer files)."""
    path = Path(text_model)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"text_model {str(path)!r} is not a Hugging Face model folder (no config.json); "
                                "pass a folder written by `save_pretrained`")
    return {"hf_model_name": str(path), "hf_tokenizer_name": str(path), "hf_model_pretrained": True,
            "hf_proj_type": proj_type, "hf_pooler_type": pooler_type, "context_length": context_length}


def build_clip(
    model_name: str,
    *,
    text_model: str | Path | None = None,
    output_dict: bool = True,
    device: torch.device | str = "cpu",
) -> tuple[nn.Module, object]:
    """Build a CLIP model and its tokenizer.

    Args:
        model_name: An open_clip config name, e.g. "SoftMoE-Mini-8-64" (see `list_clip_models`).
        text_model: Optional local Hugging Face encoder folder replacing the config's text transformer.
        output_dict: Forward returns a dict (`image_features`, `text_features`, `logit_scale`[, `logit_bias`]).
        device: Where to build it ("meta" builds a full-size model without memory, for inspection).

    Returns:
        (model, tokenizer); the tokenizer maps a list of strings to a LongTensor (batch, context_length).
    """
    if text_model is None:
        get_clip_config(model_name)  # clear error for unknown names
        model = open_clip.create_model(model_name, output_dict=output_dict, pretrained_text=False, device=device)
        return model, open_clip.get_tokenizer(model_name)
    cfg = get_clip_config(model_name)
    cfg["text_cfg"] = hf_text_cfg(text_model, cfg["text_cfg"].get("context_length", 77))
    cfg.pop("custom_text", None)
    with torch.device(device):
        model = open_clip.CustomTextCLIP(**cfg, output_dict=output_dict)
    return model, open_clip.HFTokenizer(str(text_model), context_length=cfg["text_cfg"]["context_length"])


def image_tower(model: nn.Module) -> nn.Module:
    """The timm trunk (the MoE ViT) inside an open_clip model's vision tower."""
    visual = model.visual
    return visual.trunk if hasattr(visual, "trunk") else visual


@torch.no_grad()
def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
