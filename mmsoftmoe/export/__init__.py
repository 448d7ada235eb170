"""Export a trained mmsoftmoe CLIP checkpoint's image encoder for use outside mmsoftmoe.

`mmsoftmoe export --checkpoint CKPT --format timm,onnx --out DIR` (or `export_checkpoint(...)`) writes one folder
per format: `timm` (timm model folder), `open_clip` (the whole CLIP as a `local-dir:` folder), `hf` (transformers
remote-code folder), `onnx` (onnxruntime) and `torch_export` (`model.pt2`; alias `torchscript`). Every folder is
written atomically, loaded back and checked against the eager model, and gets a model card (README.md) and
`export_report.json`. This package imports neither `training/` nor `eval/`.
"""

from mmsoftmoe.export.base import Format
from mmsoftmoe.export.cli import main
from mmsoftmoe.export.core import ParityError, check_parity, export_checkpoint
from mmsoftmoe.export.formats import FORMATS, parse_formats
from mmsoftmoe.export.source import Checkpoint, open_checkpoint

__all__ = [
    "FORMATS",
    "Checkpoint",
    "Format",
    "ParityError",
    "check_parity",
    "export_checkpoint",
    "main",
    "open_checkpoint",
    "parse_formats",
]
