"""ONNX export: the image encoder (pixels -> embedding), dynamic batch size, fixed image size.

Exporter: `torch.onnx.export(..., dynamo=True)` from a `torch.export` program (docs/design.md, section 6: torch >= 2.9
defaults to it; the TorchScript exporter is deprecated). `torch.export` traces the batch size as a symbol, so
Soft MoE's per-example reshapes and transposes, which use it, stay dynamic in the graph; the export fails
rather than silently baking in the example's batch size. Large weights go to `model.onnx.data` beside the graph
(ONNX's 2 GiB protobuf limit); onnxruntime finds it by itself.
"""

from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mmsoftmoe.export.base import Format, export_program
from mmsoftmoe.export.source import Checkpoint

MODEL_NAME = "model.onnx"
INPUT_NAME = "pixel_values"
OUTPUT_NAME = "image_embeds"
BATCH_DIM = "batch"  # the name of the symbolic batch dimension of the input and output


def require_extras() -> None:
    """onnxscript (the exporter) and onnxruntime (the parity check) come with the `export` extra."""
    missing = [m for m in ("onnxscript", "onnxruntime") if importlib.util.find_spec(m) is None]
    if missing:
        raise ImportError(f"the onnx format needs {missing}: pip install 'mmsoftmoe[export]'")


def rename_symbolic_dim(graph: Any, old: str, new: str) -> None:
    """Give a symbolic dimension a readable name (the exporter calls the batch `s77` or so) on every value."""
    ir = importlib.import_module("onnx_ir")
    values = [*graph.inputs, *graph.outputs, *(v for node in graph for v in node.outputs)]
    for value in values:
        if value.shape is not None and any(isinstance(d, ir.SymbolicDim) and d.value == old for d in value.shape):
            value.shape = ir.Shape([new if isinstance(d, ir.SymbolicDim) and d.value == old else d
                                    for d in value.shape])


def write(ckpt: Checkpoint, folder: Path, proj: bool) -> dict:
    require_extras()
    program = export_program(ckpt.image_encoder(proj), ckpt.image_size)
    onnx_program = torch.onnx.export(program, dynamo=True, input_names=[INPUT_NAME], output_names=[OUTPUT_NAME])
    graph = onnx_program.model.graph
    rename_symbolic_dim(graph, graph.inputs[0].shape[0].value, BATCH_DIM)
    onnx_program.save(str(folder / MODEL_NAME))
    return {"exporter": "torch.onnx.export(dynamo=True) of a torch.export program",
            "opset": onnx_program.model.opset_imports[""], "input": f"{INPUT_NAME} (batch, 3, "
            f"{ckpt.image_size[0]}, {ckpt.image_size[1]}) float32", "output": OUTPUT_NAME,
            "files": sorted(p.name for p in folder.iterdir())}


class OnnxEncoder:
    """An onnxruntime CPU session of the exported encoder, called like the torch encoder (tensor in and out)."""

    def __init__(self, path: str | Path, threads: int = 0) -> None:
        require_extras()
        ort = importlib.import_module("onnxruntime")
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads  # 0: onnxruntime's default (all cores)
        options.inter_op_num_threads = 1  # sequential graph execution: all parallelism is intra-op
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        pixels = np.ascontiguousarray(pixels.detach().cpu().numpy(), dtype=np.float32)
        return torch.from_numpy(self.session.run([OUTPUT_NAME], {INPUT_NAME: pixels})[0])


def load(folder: Path, threads: int = 0) -> OnnxEncoder:
    return OnnxEncoder(Path(folder) / MODEL_NAME, threads)


SNIPPET = """\
import onnxruntime as ort  # no torch needed

session = ort.InferenceSession("$folder/model.onnx", providers=["CPUExecutionProvider"])
(embeds,) = session.run(["image_embeds"], {"pixel_values": pixels})  # float32 (batch, 3, H, W) -> (batch, $output_dim)
"""

FORMAT = Format(
    name="onnx",
    summary="ONNX image encoder (dynamo exporter), dynamic batch size, runs in onnxruntime CPU",
    write=write,
    load=load,
    snippet=SNIPPET,
    tolerance=1e-4,
)
