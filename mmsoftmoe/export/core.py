"""Export a checkpoint to one or more formats: write atomically, load back, check parity, write card and report.

Each format gets its own folder (`out` itself for one format, `out/<format>` for several). Inside the atomic
temporary folder the export is written, loaded back the way a user would load it and run on a fixed batch:
outputs must match the eager mmsoftmoe model (max abs diff within the format's tolerance) and each example's
output at batch 1 must match its output in the batch. Only then are `export_report.json` (the figures) and the
model card written and the folder renamed into place; any failure leaves nothing behind (and a killed export's
temporary folder is removed by the next export to the same target). With several formats,
every target is checked before anything is written; a failure stops the run, the formats done before it stay.
"""

from __future__ import annotations

import datetime
import json
import time
from collections.abc import Sequence
from pathlib import Path

import open_clip
import timm
import torch
from torch import nn

import mmsoftmoe
from mmsoftmoe.export.base import Encoder, Format
from mmsoftmoe.export.card import model_card
from mmsoftmoe.export.formats import FORMATS, parse_formats
from mmsoftmoe.export.source import Checkpoint, open_checkpoint
from mmsoftmoe.models.accounting import image_flops, parameter_counts
from mmsoftmoe.staging import atomic_folder, check_target, remove_stale_siblings

REPORT_NAME = "export_report.json"
CARD_NAME = "README.md"


class ParityError(RuntimeError):
    """An export whose outputs differ from the eager model's beyond the format's tolerance."""


def export_targets(out: Path, names: Sequence[str]) -> dict[str, Path]:
    """Folder per format: `out` itself for a single format, `out/<format>` for several."""
    return {names[0]: out} if len(names) == 1 else {name: out / name for name in names}


def check_targets(targets: dict[str, Path], checkpoint: Path, overwrite: bool) -> None:
    """Every target is free (or `overwrite`) and none is, or contains, the checkpoint being exported; what killed
    exports to a target left beside it is cleaned up first."""
    for target in targets.values():
        remove_stale_siblings(target)
        if target.resolve() == checkpoint.resolve() or target.resolve() in checkpoint.resolve().parents:
            raise ValueError(f"export folder {target} would replace the checkpoint {checkpoint}; choose another --out")
        check_target(target, overwrite)


@torch.no_grad()
def parity_batch(ckpt: Checkpoint, batch_size: int, seed: int = 0) -> torch.Tensor:
    """A fixed batch of normalised-pixel-like inputs (b, 3, H, W) for the parity checks."""
    if batch_size < 2:
        raise ValueError(f"batch_size must be >= 2 to check batch-1 vs batch-{batch_size} determinism, "
                         f"got {batch_size}")
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch_size, 3, *ckpt.image_size, generator=generator)


def export_checkpoint(
    checkpoint: str | Path,
    formats: str | Sequence[str],
    out: str | Path,
    *,
    overwrite: bool = False,
    proj: bool = True,
    batch_size: int = 8,
    verify: bool = True,
) -> dict[str, dict]:
    """Export `checkpoint` to each of `formats`; returns the report of each (also in its `export_report.json`).

    Args:
        checkpoint: A checkpoint or open_clip folder (`open_clip_config.json` + weights).
        formats: Format names (comma-separated string or list), or "all"; see `FORMATS`.
        out: The export folder (one format) or the parent of one folder per format.
        overwrite: Replace existing export folders (each only once its new version is complete).
        proj: Include the CLIP projection (image embeddings); False exports pooled trunk features instead
            (open_clip always exports the whole CLIP model).
        batch_size: Size of the parity batch (>= 2: batch 1 vs batch N is also checked).
        verify: Check the checkpoint against its manifest (sizes and hashes) before reading it.
    """
    names = parse_formats(formats)
    targets = export_targets(Path(out), names)
    check_targets(targets, Path(checkpoint), overwrite)
    ckpt = open_checkpoint(checkpoint, verify=verify)
    pixels = parity_batch(ckpt, batch_size)
    return {name: export_format(ckpt, FORMATS[name], target, pixels, proj=proj, overwrite=overwrite)
            for name, target in targets.items()}


def export_format(
    ckpt: Checkpoint, fmt: Format, target: Path, pixels: torch.Tensor, *, proj: bool, overwrite: bool
) -> dict:
    """Write one format into `target` atomically; returns its report."""
    proj = proj or fmt.full_model
    reference = ckpt.image_encoder(proj)
    with atomic_folder(target, overwrite) as tmp:
        start = time.perf_counter()
        details = fmt.write(ckpt, tmp, proj)
        seconds = time.perf_counter() - start
        size = folder_size(tmp)
        parity = check_parity(reference, fmt.load(tmp), pixels, fmt.tolerance, fmt.name)
        report = build_report(ckpt, fmt, target, reference, proj, details, seconds, size, parity)
        (tmp / REPORT_NAME).write_text(json.dumps(report, indent=2))
        (tmp / CARD_NAME).write_text(model_card(ckpt, fmt, report))
    return report


def folder_size(folder: Path) -> int:
    """Bytes of all files under `folder`."""
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


@torch.no_grad()
def check_parity(reference: nn.Module, encoder: Encoder, pixels: torch.Tensor, tolerance: float, name: str) -> dict:
    """Exported vs eager outputs on `pixels`, and the export at batch 1 vs in the batch; raises beyond tolerance."""
    expected = reference.eval()(pixels)
    batched = encoder(pixels)
    singles = torch.cat([encoder(pixels[i : i + 1]) for i in range(len(pixels))])
    if batched.shape != expected.shape or singles.shape != expected.shape:
        raise ParityError(f"{name} export outputs shape {tuple(batched.shape)} (batch) / {tuple(singles.shape)} "
                          f"(one by one), the eager model {tuple(expected.shape)}")
    figures = {
        "batch_size": len(pixels),
        "max_abs_diff": max_abs_diff(batched, expected),
        "batch1_max_abs_diff": max_abs_diff(singles, expected),
        "batch1_vs_batch_max_abs_diff": max_abs_diff(singles, batched),
        "tolerance": tolerance,
    }
    worst = max(v for k, v in figures.items() if k.endswith("max_abs_diff"))
    if not worst <= tolerance:
        raise ParityError(f"{name} export differs from the eager model by {worst:.3g} > {tolerance:g} "
                          f"(max abs diff, float32): {figures}")
    return figures


def build_report(
    ckpt: Checkpoint, fmt: Format, target: Path, reference: nn.Module, proj: bool, details: dict,
    seconds: float, size: int, parity: dict,
) -> dict:
    """The figures of one export (what `export_report.json` holds and the card shows)."""
    output_dim = ckpt.projection.out_features if proj else ckpt.trunk.num_features
    return {
        "format": fmt.name,
        "summary": fmt.summary,
        "folder": str(target),
        "checkpoint": str(ckpt.folder),
        "architecture": ckpt.architecture,
        "projection": proj,
        "output": f"{'CLIP image embedding' if proj else 'pooled trunk features'} (batch, {output_dim})",
        "output_dim": output_dim,
        "image_size": list(ckpt.image_size),
        "parameters": parameter_counts(reference, ckpt.trunk),
        "flops_per_image": image_flops(reference, ckpt.image_size),
        "export_seconds": round(seconds, 3),
        "size_bytes": size,
        "parity": parity,
        "details": details,
        "versions": {"mmsoftmoe": mmsoftmoe.__version__, "torch": torch.__version__, "timm": timm.__version__,
                     "open_clip": open_clip.__version__},
        "exported_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
