"""The model card (README.md) of an export folder: architecture, parameters and FLOPs, training, evaluation,
how to load it, and the export's own figures (parity, time, size). Definitions of the counts: `stats.py`."""

from __future__ import annotations

import json
from string import Template

from mmsoftmoe.export.base import Format
from mmsoftmoe.export.source import Checkpoint
from mmsoftmoe.layers import routed_layers

PARAMETER_DEFINITIONS = (
    "Soft MoE has no per-image sparsity: every expert processes its slots of every image, so all parameters are "
    "used for every image. Its saving is compute: each MoE layer's experts process n x p slots instead of the m "
    "tokens a dense MLP processes. *FLOP-equivalent active parameters* counts each MoE layer's expert "
    "parameters times the rows each expert processes per image over the tokens per image (p / m for Soft MoE, "
    "buffer capacity / m for sparse routing): a dense ViT with that many parameters spends "
    "about the same matmul FLOPs per image. FLOPs are counted with `torch.utils.flop_counter.FlopCounterMode` over "
    "one forward pass at batch 1 (2 FLOPs per multiply-add: matmuls, convolutions, attention)."
)


def cell(value: object) -> str:
    """`value` as one Markdown table cell: on one line, its pipes escaped (a line break ends the row)."""
    return " ".join(str(value).split()).replace("|", "\\|")


def table(rows: list[tuple[str, object]], header: tuple[str, str] = ("", "")) -> str:
    lines = [f"| {header[0]} | {header[1]} |", "|---|---|"]
    return "\n".join(lines + [f"| {cell(k)} | {cell(v)} |" for k, v in rows])


def architecture_section(ckpt: Checkpoint, report: dict) -> str:
    trunk = ckpt.trunk
    blocks = f"{getattr(trunk, 'moe_layer', 'none')} / {list(getattr(trunk, 'moe_block_indices', ()))}"
    moe = [layer for layer in routed_layers(trunk).values() if hasattr(layer, "experts")]
    rows = [
        ("image tower (timm name)", f"`{ckpt.architecture}`"),
        ("image size / patch size", f"{'x'.join(map(str, ckpt.image_size))} / {trunk.patch_embed.patch_size[0]}"),
        ("width / depth / heads", f"{trunk.embed_dim} / {len(trunk.blocks)} / {trunk.blocks[0].attn.num_heads}"),
        ("tokens per image", trunk.patch_embed.num_patches + trunk.num_prefix_tokens),
        ("MoE layer / blocks", blocks),
        ("pooling", trunk.global_pool or "none"),
        ("output", report["output"]),
    ]
    if moe:
        rows.insert(5, ("MoE layer settings", f"`{moe[0].extra_repr()}`"))
    if report["projection"]:
        rows.insert(-1, ("projection", f"linear {trunk.num_features} -> {ckpt.projection.out_features}"))
    text = "## Architecture\n\n" + table(rows)
    if report["format"] == "open_clip":
        text_cfg = ckpt.config["model_cfg"]["text_cfg"]
        text += "\n\nThe folder holds the whole CLIP model; text tower config: `" + json.dumps(text_cfg) + "`."
    return text


def compute_section(report: dict) -> str:
    params = report["parameters"]
    fmt = lambda n: "n/a (sparse routing)" if n is None else f"{n:,}"
    rows = [
        ("total parameters", fmt(params["total"])),
        ("of which expert parameters", fmt(params["expert"])),
        ("parameters used per image", fmt(params["used_per_image"])),
        ("FLOP-equivalent active parameters", fmt(params["flop_equivalent_active"])),
        ("FLOPs per image (counted)", f"{report['flops_per_image']:,} ({report['flops_per_image'] / 1e9:.4g} GFLOPs)"),
    ]
    return "## Parameters and compute (image encoder)\n\n" + table(rows) + "\n\n" + PARAMETER_DEFINITIONS


def training_section(state: dict | None) -> str:
    if state is None:
        return "## Training\n\nThe checkpoint has no `trainer_state.json`: training data and steps are not recorded."
    rows = [("steps", state.get("step", "not recorded")), ("samples seen", state.get("samples_seen", "not recorded"))]
    config = json.dumps(state.get("config", {}), indent=2, sort_keys=True)
    return f"## Training\n\n{table(rows)}\n\nTraining config (data, schedule, ...):\n\n```json\n{config}\n```"


def evaluation_section(state: dict | None) -> str:
    metrics = (state or {}).get("metrics") or {}
    if not metrics:
        return "## Evaluation\n\nNo evaluation figures recorded in the checkpoint."
    value = lambda v: f"{v:.4g}" if isinstance(v, float) else v
    return "## Evaluation\n\n" + table([(k, value(v)) for k, v in sorted(metrics.items())], ("metric", "value"))


def loading_section(fmt: Format, report: dict) -> str:
    details = report["details"]
    snippet = Template(fmt.snippet).substitute(
        folder=report["folder"], architecture=report["architecture"], output_dim=report["output_dim"],
        num_classes=details.get("num_classes", report["output_dim"]))
    return f"## How to load\n\n{fmt.summary}.\n\n```python\n{snippet}```"


def preprocessing_section(ckpt: Checkpoint) -> str:
    cfg = ckpt.preprocess_cfg
    rows = [(k, cfg[k]) for k in ("size", "mean", "std", "interpolation", "resize_mode") if k in cfg]
    return "## Preprocessing\n\nInputs are RGB images preprocessed as in training (open_clip):\n\n" + table(rows)


def export_section(report: dict) -> str:
    parity, n = report["parity"], report["parity"]["batch_size"]
    rows = [
        (f"max abs diff vs eager, batch of {n}", f"{parity['max_abs_diff']:.3g}"),
        ("max abs diff vs eager, one image at a time", f"{parity['batch1_max_abs_diff']:.3g}"),
        (f"max abs diff, batch 1 vs batch {n}", f"{parity['batch1_vs_batch_max_abs_diff']:.3g}"),
        ("tolerance (float32)", f"{parity['tolerance']:g}"),
        ("export time", f"{report['export_seconds']:.2f} s"),
        ("size on disk", f"{report['size_bytes'] / 2**20:.2f} MiB"),
    ] + [(k, v) for k, v in report["details"].items()]
    return ("## Export check\n\nWritten by `mmsoftmoe export`, loaded back and compared with the eager mmsoftmoe "
            f"model on a fixed random batch (figures also in `export_report.json`):\n\n{table(rows)}")


def model_card(ckpt: Checkpoint, fmt: Format, report: dict) -> str:
    """The README.md of an export folder."""
    title = (f"# {report['architecture']} image encoder ({fmt.name} export)\n\nExported by mmsoftmoe "
             f"{report['versions']['mmsoftmoe']} from `{report['checkpoint']}` on {report['exported_at']}.")
    sections = [title, architecture_section(ckpt, report), compute_section(report),
                training_section(ckpt.trainer_state), evaluation_section(ckpt.trainer_state),
                loading_section(fmt, report), preprocessing_section(ckpt), export_section(report)]
    return "\n\n".join(sections) + "\n"
