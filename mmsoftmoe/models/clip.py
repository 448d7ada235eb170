"""CLIP models whose image tower is an mmsoftmoe ViT, built by open_clip from JSON configs shipped here.

open_clip assembles the model (`CLIP` / `CustomTextCLIP`: `encode_image`, `encode_text`, `logit_scale`,
`logit_bias`, dict output), so a model trained with mmsoftmoe is an open_clip model. The configs in
`model_configs/` (one file per model name, open_clip's format) are registered with `open_clip.add_model_config`
when `mmsoftmoe` is imported; their vision towers are timm names registered by `mmsoftmoe_vit`, since open_clip
only forwards drop-path / patch-drop settings to timm (docs/design.md, section 4).

A Hugging Face transformers text encoder can replace open_clip's text transformer: `text_model` is a local folder
with the model and its tokenizer (`save_pretrained` output); nothing is downloaded.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import json
import shutil
from pathlib import Path

import open_clip
import torch
from open_clip.tokenizer import HFTokenizer
from open_clip.transform import PreprocessCfg
from safetensors.torch import save_file
from torch import nn

from mmsoftmoe.checkpoint import CONFIG_NAME, WEIGHTS_NAMES, ConfigMismatchError, read_model_folder, write_manifest
from mmsoftmoe.models.init import INIT_CONSTANTS_ATTR, init_weights_

MODEL_CONFIG_DIR = Path(__file__).parent / "model_configs"
HF_TEXT_DIR = "hf_text"  # a model folder's copy of its Hugging Face text tower's config and tokenizer files
HF_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".h5", ".msgpack", ".ckpt")  # not copied there
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


def resolve_clip_config(model_name: str, text_model: str | Path | None = None) -> dict:
    """The complete open_clip model config: the named config, with an HF text tower swapped in if given."""
    cfg = get_clip_config(model_name)
    if text_model is not None:
        cfg["text_cfg"] = hf_text_cfg(text_model, cfg["text_cfg"].get("context_length", 77))
        cfg["custom_text"] = True
    return cfg


def with_patch_dropout(model_cfg: dict, rate: float) -> dict:
    """`model_cfg` with FLIP patch dropout (open_clip's `vision_cfg.patch_dropout`, which reaches timm's
    `patch_drop_rate`): `rate` of the image patches dropped at random in training mode, none in eval mode. Soft MoE
    layers take any number of tokens (their slots mix whichever remain). Rate 0 returns `model_cfg` itself."""
    if not 0 <= rate < 1:
        raise ValueError(f"patch dropout must be in [0, 1), got {rate}")
    if rate == 0:
        return model_cfg
    cfg = copy.deepcopy(model_cfg)
    cfg["vision_cfg"]["patch_dropout"] = rate
    return cfg


def build_clip_from_config(
    model_cfg: dict, *, output_dict: bool = True, device: torch.device | str = "cpu", folder: str | Path | None = None
) -> tuple[nn.Module, object]:
    """(model, tokenizer) from a complete open_clip model config (what `open_clip_config.json` stores).

    `folder`: the model folder the config came from, where an HF text tower's files live (`portable_text_cfg`).
    """
    cfg = copy.deepcopy(model_cfg if folder is None else local_text_cfg(model_cfg, folder))
    text_cfg = cfg["text_cfg"]
    is_hf = "hf_model_name" in text_cfg
    if is_hf and torch.device(device).type == "meta":
        # The structure only (transformers refuses `from_pretrained` on the meta device): a meta build holds no
        # weights, and a sharded run fills it from rank 0's full build, pretrained encoder included.
        text_cfg["hf_model_pretrained"] = False
    model_cls = open_clip.CustomTextCLIP if (cfg.pop("custom_text", False) or is_hf) else open_clip.CLIP
    with torch.device(device):
        model = model_cls(**cfg, output_dict=output_dict)
    _record_init_constants(model, model_cls, cfg)
    if torch.device(device).type != "meta":
        # A pretrained Hugging Face text tower keeps its loaded weights; everything else draws per parameter.
        init_weights_(model, keep=("text.",) if is_hf else ())
    context_length = text_cfg.get("context_length", 77)
    if is_hf:
        return model, HFTokenizer(text_cfg["hf_tokenizer_name"], context_length=context_length)
    return model, open_clip.SimpleTokenizer(context_length=context_length)


def _record_init_constants(model: nn.Module, model_cls: type[nn.Module], cfg: dict) -> None:
    """Keep the starting logit scale / bias on the model: a meta-device build cannot hold them, and
    `mmsoftmoe.models.init` sets them again after materializing it."""
    defaults = inspect.signature(model_cls).parameters
    constants = {"logit_scale": float(cfg.get("init_logit_scale", defaults["init_logit_scale"].default))}
    if model.logit_bias is not None:
        constants["logit_bias"] = float(cfg["init_logit_bias"])
    setattr(model, INIT_CONSTANTS_ATTR, constants)


def build_clip(
    model_name: str,
    *,
    text_model: str | Path | None = None,
    output_dict: bool = True,
    device: torch.device | str = "cpu",
) -> tuple[nn.Module, object]:
    """Build a CLIP model and its tokenizer (random weights: each parameter drawn from its own generator, seeded by
    its name and the seed torch was last seeded with, `mmsoftmoe.models.init.init_weights_`).

    Args:
        model_name: An open_clip config name, e.g. "SoftMoE-Mini-8-64" (see `list_clip_models`).
        text_model: Optional local Hugging Face encoder folder replacing the config's text transformer.
        output_dict: Forward returns a dict (`image_features`, `text_features`, `logit_scale`[, `logit_bias`]).
        device: Where to build it ("meta" builds a full-size model without memory, for inspection).

    Returns:
        (model, tokenizer); the tokenizer maps a list of strings to a LongTensor (batch, context_length).
    """
    return build_clip_from_config(resolve_clip_config(model_name, text_model), output_dict=output_dict,
                                  device=device)


def preprocess_config(model: nn.Module) -> dict:
    """open_clip's complete preprocessing config of `model` (size, mean, std, interpolation, resize mode)."""
    cfg = dataclasses.asdict(PreprocessCfg())
    cfg.update(open_clip.get_model_preprocess_cfg(model))
    return cfg


def portable_text_cfg(model_cfg: dict, folder: str | Path) -> dict:
    """`model_cfg` with a local Hugging Face text tower made part of `folder`: its config and tokenizer files are
    copied to `folder/hf_text/` and named relatively, so the folder loads offline wherever it is moved (the
    encoder's weights are in the CLIP weights). Configs without a local HF tower come back unchanged."""
    source = model_cfg.get("text_cfg", {}).get("hf_model_name")
    if source is None or source == HF_TEXT_DIR or not Path(source).is_dir():
        return model_cfg
    target = Path(folder) / HF_TEXT_DIR
    target.mkdir(parents=True, exist_ok=True)
    for path in Path(source).iterdir():
        if path.is_file() and path.suffix not in HF_WEIGHT_SUFFIXES:
            shutil.copy2(path, target / path.name)
    cfg = copy.deepcopy(model_cfg)
    cfg["text_cfg"].update(hf_model_name=HF_TEXT_DIR, hf_tokenizer_name=HF_TEXT_DIR, hf_model_pretrained=False)
    return cfg


def local_text_cfg(model_cfg: dict, folder: str | Path) -> dict:
    """`model_cfg` with the relative HF text tower name of `portable_text_cfg` resolved against `folder`."""
    if model_cfg.get("text_cfg", {}).get("hf_model_name") != HF_TEXT_DIR:
        return model_cfg
    cfg = copy.deepcopy(model_cfg)
    local = str(Path(folder) / HF_TEXT_DIR)
    cfg["text_cfg"].update(hf_model_name=local, hf_tokenizer_name=local)
    return cfg


def write_clip_config(model: nn.Module, model_cfg: dict, folder: str | Path) -> Path:
    """Write `open_clip_config.json` ({"model_cfg", "preprocess_cfg"}) into `folder` (an HF text tower's files
    with it, see `portable_text_cfg`)."""
    path = Path(folder) / CONFIG_NAME
    config = {"model_cfg": portable_text_cfg(model_cfg, folder), "preprocess_cfg": preprocess_config(model)}
    path.write_text(json.dumps(config, indent=2))
    return path


def save_clip(model: nn.Module, model_cfg: dict, folder: str | Path) -> Path:
    """Write an open_clip `local-dir:` folder: `open_clip_config.json`, `open_clip_model.safetensors` and, last,
    the `manifest.json` that lets every reader verify it (listing any file already in `folder` too)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    write_clip_config(model, model_cfg, folder)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(folder / WEIGHTS_NAMES[0]))
    write_manifest(folder)
    return folder


def load_clip(folder: str | Path, *, device: torch.device | str = "cpu", verify: bool = True,
              skip_hint: str = "--no-verify") -> tuple[nn.Module, object, dict]:
    """Load the CLIP model a folder exposes (`mmsoftmoe.checkpoint`): an open_clip folder (`final/`, an export) or
    a training checkpoint folder (`checkpoints/step_*`). A missing, damaged or mismatching file is a user error
    naming it: `CheckpointError` for damage (checked against the folder's manifest when it has one),
    `ConfigMismatchError` for weights of another architecture. The folder is verified against its manifest first
    (`mmsoftmoe.checkpoint.verify_before_reading`) unless `verify` is off; `skip_hint` names that switch.

    Returns:
        (model in eval mode, tokenizer, the `open_clip_config.json` content).
    """
    config, state = read_model_folder(folder, verify=verify, skip_hint=skip_hint)
    config_path = Path(folder) / CONFIG_NAME
    model, tokenizer = build_clip_from_config(config["model_cfg"], folder=folder)
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as err:  # a tensor whose shape differs from the config's
        detail = next((line.strip() for line in str(err).splitlines() if "size mismatch" in line), str(err))
        raise ConfigMismatchError(f"checkpoint {folder} does not match its config {config_path}: {detail}") from err
    if missing or unexpected:
        raise ConfigMismatchError(f"checkpoint {folder} does not match its config {config_path}: "
                         f"missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}")
    open_clip.set_model_preprocess_cfg(model, config.get("preprocess_cfg") or preprocess_config(model))
    return model.to(device).eval(), tokenizer, config


def image_tower(model: nn.Module) -> nn.Module:
    """The timm trunk (the MoE ViT) inside an open_clip model's vision tower."""
    visual = model.visual
    return visual.trunk if hasattr(visual, "trunk") else visual
