"""The export formats by `--format` name, and the parsing of a `--format` value ("timm,onnx", "all")."""

from __future__ import annotations

from collections.abc import Sequence

from mmsoftmoe.export import hf_format, onnx_format, open_clip_format, timm_format, torch_export_format
from mmsoftmoe.export.base import Format

FORMATS: dict[str, Format] = {
    f.name: f
    for f in (timm_format.FORMAT, open_clip_format.FORMAT, hf_format.FORMAT, onnx_format.FORMAT,
              torch_export_format.FORMAT)
}
# TorchScript is deprecated and cannot script the Soft MoE layer; the torch.export program replaces it.
ALIASES = {"torchscript": "torch_export"}
ALL = "all"


def parse_formats(spec: str | Sequence[str]) -> list[str]:
    """Format names from a comma-separated string or a list; "all" means every format, duplicates are dropped."""
    items = [s.strip() for s in (spec.split(",") if isinstance(spec, str) else spec) if s.strip()]
    names: list[str] = []
    for item in items:
        if item == ALL:
            names.extend(FORMATS)
            continue
        name = ALIASES.get(item, item)
        if name not in FORMATS:
            raise ValueError(f"unsupported export format {item!r}; choose from {sorted(FORMATS)}, "
                             f"{sorted(ALIASES)} (alias of {sorted(ALIASES.values())}) or {ALL!r}, comma-separated")
        names.append(name)
    if not names:
        raise ValueError(f"no export format given; choose from {sorted(FORMATS)} or {ALL!r}")
    return list(dict.fromkeys(names))
