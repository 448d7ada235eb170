"""open_clip export: the whole CLIP model as an open_clip `local-dir:` folder.

`open_clip_config.json` ({"model_cfg", "preprocess_cfg"}) and `open_clip_model.safetensors`, written by
`mmsoftmoe.models.clip.save_clip`: after `import mmsoftmoe` (which registers the timm towers),
`open_clip.create_model_and_transforms("local-dir:<folder>")` and `open_clip.get_tokenizer("local-dir:<folder>")`
load it, and so does `mmsoftmoe.models.clip.load_clip` (and therefore `mmsoftmoe eval`).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import open_clip
import torch

from mmsoftmoe.checkpoint import MANIFEST_NAME
from mmsoftmoe.export.base import Format
from mmsoftmoe.export.source import Checkpoint
from mmsoftmoe.models.clip import CONFIG_NAME, WEIGHTS_NAMES, save_clip


def write(ckpt: Checkpoint, folder: Path, proj: bool) -> dict:
    save_clip(ckpt.model, ckpt.config["model_cfg"], folder)
    return {"files": [CONFIG_NAME, WEIGHTS_NAMES[0], MANIFEST_NAME]}


def load(folder: Path) -> Callable[[torch.Tensor], torch.Tensor]:
    """`encode_image` of the model `open_clip.create_model_and_transforms("local-dir:...")` returns."""
    model, _, _ = open_clip.create_model_and_transforms(f"local-dir:{folder}")
    return model.eval().encode_image


SNIPPET = """\
import mmsoftmoe  # registers the Soft MoE towers in timm
import open_clip

model, _, preprocess = open_clip.create_model_and_transforms("local-dir:$folder")
tokenizer = open_clip.get_tokenizer("local-dir:$folder")
image_features = model.eval().encode_image(preprocess(image)[None])  # (1, $output_dim)
text_features = model.encode_text(tokenizer(["a photo of a cat"]))
# or: model, tokenizer, config = mmsoftmoe.models.clip.load_clip("$folder")
"""

FORMAT = Format(
    name="open_clip",
    summary="the whole CLIP model as an open_clip local-dir folder (open_clip_config.json + safetensors)",
    write=write,
    load=load,
    snippet=SNIPPET,
    full_model=True,
)
