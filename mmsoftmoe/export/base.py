"""What every export format provides, and the `torch.export` step that the ONNX and `.pt2` formats share."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from mmsoftmoe.export.source import Checkpoint

Encoder = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Format:
    """One export format.

    Attributes:
        name: The `--format` value.
        summary: One line on what the folder holds.
        write: `(checkpoint, folder, proj) -> details`: writes the export into an existing empty folder and returns
            format-specific facts for the report (exporter, files, ...).
        load: `folder -> encoder`: loads the export the way a user would; the encoder maps pixels (b, 3, H, W)
            to the exported output (the CLIP image embedding, or the pooled features without projection).
        snippet: Python code loading the export, a `string.Template` over `$folder`, `$architecture`,
            `$num_classes` (of the timm head: 0 without projection) and `$output_dim`.
        tolerance: Largest max-abs difference to the eager model accepted by the parity check (float32).
        full_model: The export always holds the whole CLIP model (the projection included).
    """

    name: str
    summary: str
    write: Callable[[Checkpoint, Path, bool], dict]
    load: Callable[[Path], Encoder]
    snippet: str
    tolerance: float = 1e-5
    full_model: bool = False


def export_program(encoder: nn.Module, image_size: tuple[int, int]) -> torch.export.ExportedProgram:
    """`torch.export` of `encoder` with a symbolic batch size and a fixed image size."""
    # Batch 2 in the example: torch.export specialises dimensions of size 0 or 1.
    example = torch.zeros(2, 3, *image_size)
    batch = torch.export.Dim("batch", min=1)
    # Under no_grad, the layers' `@torch.no_grad()` routing statistics trace as plain ops instead of grad-mode
    # regions (which `torch.export.load` rejects); those statistics feed no output and are removed below, so
    # torch's warning that they are tensor attributes assigned during export does not concern the program.
    with torch.no_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The tensor attributes .* were assigned during export")
        program = torch.export.export(encoder.eval(), (example,), dynamic_shapes=({0: batch},), strict=False)
    program.graph_module.graph.eliminate_dead_code()
    program.graph_module.recompile()
    return program
