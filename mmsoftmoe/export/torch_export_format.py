"""torch.export export: the image encoder as an `ExportedProgram` archive (`model.pt2`).

Chosen over TorchScript, which torch 2.x has deprecated: `torch.jit.script` rejects the Soft MoE layer (typed
dict statistics, autocast context managers) and `torch.jit.trace` gives no guarantee that shapes stay symbolic,
whereas `torch.export` traces the model whole, with the batch size symbolic and the image size fixed.
`torch.export.load("model.pt2").module()` runs it with torch alone, without mmsoftmoe, timm or the model code.
`--format torchscript` is accepted as an alias of this format.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from mmsoftmoe.export.base import Format, export_program
from mmsoftmoe.export.source import Checkpoint

PROGRAM_NAME = "model.pt2"


def write(ckpt: Checkpoint, folder: Path, proj: bool) -> dict:
    program = export_program(ckpt.image_encoder(proj), ckpt.image_size)
    torch.export.save(program, folder / PROGRAM_NAME)
    return {"exporter": f"torch.export.export (torch {torch.__version__}), torch.export.save",
            "files": [PROGRAM_NAME]}


def load(folder: Path) -> nn.Module:
    return torch.export.load(Path(folder) / PROGRAM_NAME).module()


SNIPPET = """\
import torch  # no mmsoftmoe or timm needed

encoder = torch.export.load("$folder/model.pt2").module()
with torch.no_grad():
    embeds = encoder(pixels)  # (batch, 3, H, W) -> (batch, $output_dim); any batch size
"""

FORMAT = Format(
    name="torch_export",
    summary="torch.export program (model.pt2), dynamic batch size; needs only torch to run",
    write=write,
    load=load,
    snippet=SNIPPET,
)
