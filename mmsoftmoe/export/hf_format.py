"""Hugging Face transformers export: the image encoder as a remote-code model folder.

`config.json` (with `auto_map`), `model.safetensors` and the two code files of `hf_remote_code/`
(`configuration_mmsoftmoe.py`, `modeling_mmsoftmoe.py`), copied by transformers' `save_pretrained` after
`register_for_auto_class`. `AutoModel.from_pretrained(folder, trust_remote_code=True)` loads it offline.

The modeling file vendors the Soft MoE layer (about 60 lines, inference only) on top of timm's
`VisionTransformer` instead of importing mmsoftmoe: the folder then runs wherever torch, timm and transformers
are installed, and it keeps working whatever later mmsoftmoe versions change. The exporter's parity check
guards the copy against drift from `mmsoftmoe.layers.SoftMoE`. Towers with sparse (Tokens/Experts Choice)
layers are not vendored: export those as timm, open_clip, onnx or torch_export.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from PIL import Image
from torch import nn
from transformers import AutoModel, CLIPImageProcessor

from mmsoftmoe.export.base import Format
from mmsoftmoe.export.hf_remote_code.configuration_mmsoftmoe import MMSoftMoEVisionConfig
from mmsoftmoe.export.hf_remote_code.modeling_mmsoftmoe import MMSoftMoEVisionModel
from mmsoftmoe.export.source import Checkpoint
from mmsoftmoe.models.mmsoftmoe_vit import MODEL_ARGS

_MOE_ARGS = ("moe_layer", "moe_blocks", "moe_kwargs")


def soft_moe_blocks(trunk: nn.Module) -> tuple[list[int], dict]:
    """Indices of the Soft MoE blocks and the vendored layer's arguments, from each layer's `export_spec()`:
    {} keeps timm's MLP, a dict configures the vendored Soft MoE, None means no vendored code exists for it."""
    mlps = {i: trunk.blocks[i].mlp for i in getattr(trunk, "moe_block_indices", ())}
    specs = {i: getattr(m, "export_spec", lambda: None)() for i, m in mlps.items()}
    unsupported = sorted({f"{type(mlps[i]).__name__}({mlps[i].extra_repr()})" for i, spec in specs.items()
                          if spec is None})
    if unsupported:
        raise ValueError(f"hf export vendors the Soft MoE layer (soft dispatch and combine, GELU experts) only, not "
                         f"sparse layers or routing ablations; this tower uses {unsupported}: export it with "
                         "--format timm, open_clip, onnx or torch_export")
    soft = {i: spec for i, spec in specs.items() if spec}
    if not soft:
        return [], {}
    return sorted(soft), next(iter(soft.values()))


def hf_config(ckpt: Checkpoint, proj: bool) -> MMSoftMoEVisionConfig:
    """The transformers config of the encoder: timm ViT arguments + Soft MoE settings + projection."""
    if ckpt.architecture not in MODEL_ARGS:
        raise ValueError(f"hf export supports mmsoftmoe's registered towers; {ckpt.architecture!r} is not one")
    vit_kwargs = {k: v for k, v in MODEL_ARGS[ckpt.architecture].items() if k not in _MOE_ARGS}
    moe_block_indices, moe_kwargs = soft_moe_blocks(ckpt.trunk)
    return MMSoftMoEVisionConfig(
        vit_kwargs=vit_kwargs,
        moe_block_indices=moe_block_indices,
        moe_kwargs=moe_kwargs,
        projection_dim=ckpt.projection.out_features if proj else 0,
        projection_bias=proj and ckpt.projection.bias is not None,
        image_mean=list(ckpt.preprocess_cfg["mean"]),
        image_std=list(ckpt.preprocess_cfg["std"]),
    )


def hf_state_dict(ckpt: Checkpoint, proj: bool) -> dict[str, torch.Tensor]:
    state = {f"trunk.{k}": v for k, v in ckpt.trunk.state_dict().items()}
    if proj:
        state.update({f"proj.{k}": v for k, v in ckpt.projection.state_dict().items()})
    return state


def image_processor(preprocess_cfg: dict) -> CLIPImageProcessor:
    """transformers' equivalent of the checkpoint's open_clip eval transform (resize, center crop, normalise);
    pixel values agree up to 8-bit rounding of the resized image."""
    height, width = preprocess_cfg["size"] if isinstance(preprocess_cfg["size"], list | tuple) else [
        preprocess_cfg["size"]] * 2
    mode = preprocess_cfg.get("resize_mode", "shortest")
    if mode not in ("shortest", "squash"):
        raise ValueError(f"hf export: resize_mode {mode!r} has no transformers image processor; use shortest or squash")
    resize = {"shortest_edge": min(height, width)} if mode == "shortest" else {"height": height, "width": width}
    resample = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR}[preprocess_cfg.get("interpolation", "bicubic")]
    return CLIPImageProcessor(do_resize=True, size=resize, resample=resample, do_center_crop=mode == "shortest",
                              crop_size={"height": height, "width": width}, do_rescale=True,
                              image_mean=list(preprocess_cfg["mean"]), image_std=list(preprocess_cfg["std"]),
                              do_convert_rgb=True)


def write(ckpt: Checkpoint, folder: Path, proj: bool) -> dict:
    MMSoftMoEVisionConfig.register_for_auto_class()
    MMSoftMoEVisionModel.register_for_auto_class("AutoModel")
    with torch.device("meta"):  # no random init: every tensor comes from the checkpoint
        model = MMSoftMoEVisionModel(hf_config(ckpt, proj))
    model.load_state_dict(hf_state_dict(ckpt, proj), strict=True, assign=True)
    model.save_pretrained(folder)
    image_processor(ckpt.preprocess_cfg).save_pretrained(folder)  # preprocessor_config.json: AutoImageProcessor
    return {"vendored": "Soft MoE layer (modeling_mmsoftmoe.py); needs torch, timm, transformers",
            "files": sorted(p.name for p in folder.iterdir())}


def load(folder: Path) -> Callable[[torch.Tensor], torch.Tensor]:
    """`get_image_features` of `AutoModel.from_pretrained(folder, trust_remote_code=True)`."""
    return AutoModel.from_pretrained(folder, trust_remote_code=True).eval().get_image_features


SNIPPET = """\
from transformers import AutoImageProcessor, AutoModel  # needs torch, timm and transformers; not mmsoftmoe

model = AutoModel.from_pretrained("$folder", trust_remote_code=True).eval()
pixels = AutoImageProcessor.from_pretrained("$folder")(image, return_tensors="pt").pixel_values  # a PIL image
out = model(pixel_values=pixels, output_patch_tokens=True)
out.image_embeds       # (batch, $output_dim) pooled image embeddings
out.last_hidden_state  # (batch, patches, width) patch tokens after the final norm
"""

FORMAT = Format(
    name="hf",
    summary="transformers remote-code folder (config.json + auto_map, safetensors, vendored Soft MoE code)",
    write=write,
    load=load,
    snippet=SNIPPET,
)
