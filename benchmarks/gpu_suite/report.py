"""The device suite's report: figures derived from the parts' raw seconds, FLOPs and batches (samples/s, TFLOP/s,
MFU, time ratios, compile speed-ups, the sweep's loss), the targets, and the markdown summary."""

from __future__ import annotations

from benchmarks.gpu_suite.parts import MODES, Sizes
from benchmarks.layer_bench import LUCIDRAINS

TOWER_TARGET, MFU_DENSE_TARGET, MFU_SOFT_TARGET, SWEEP_TARGET = 1.15, 0.40, 0.35, 0.10


# Derived figures.
def derive_timing(t: dict, peak_tflops: float | None) -> None:
    """samples/s, TFLOP/s and MFU of one timing ({"seconds", "flops", "batch"}), in place."""
    t["samples_per_s"] = t["batch"] / t["seconds"]
    t["tflops_per_s"] = t["flops"] / t["seconds"] / 1e12
    t["mfu"] = None if peak_tflops is None else t["tflops_per_s"] / peak_tflops


def timings(node) -> list[dict]:
    """Every timing dict anywhere under `node`."""
    if not isinstance(node, dict):
        return []
    if {"seconds", "flops", "batch"} <= node.keys():
        return [node]
    return [t for v in node.values() for t in timings(v)]


def mode_rows(node: dict, key: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], dict]]:
    """(key, {mode: row}) of every measured row group (the dicts whose keys are modes)."""
    if node and set(node) <= set(MODES):
        return [(key, node)]
    return [r for k, v in node.items() if isinstance(v, dict) for r in mode_rows(v, (*key, k))]


def time_ratio(a: dict | None, b: dict | None, what: str) -> float | None:
    """Time per sample of row a's `what` over row b's (None if either is missing)."""
    if a is None or b is None or what not in a or what not in b:
        return None
    return (a[what]["seconds"] / a[what]["batch"]) / (b[what]["seconds"] / b[what]["batch"])


def compile_speedups(rows: dict) -> dict:
    """Eager time over compiled time, per row and timing."""
    out = {}
    for key, modes in mode_rows(rows):
        if set(MODES) <= modes.keys():
            eager, compiled = modes["eager"], modes["compiled"]
            out["/".join(key)] = {w: time_ratio(eager, compiled, w) for w in compiled if w in eager
                                  and isinstance(compiled[w], dict) and "seconds" in compiled[w]}
    return out


def tower_ratios(rows: dict) -> dict:
    """Each family's training and inference time per image over its dense twin's, per size and mode."""
    return {size: {family: {mode: {w: time_ratio(row, families.get("dense", {}).get(mode), w)
                                   for w in ("train", "infer") if w in row}
                            for mode, row in modes.items()}
                   for family, modes in families.items()}
            for size, families in rows.items()}


def layer_ratios(rows: dict) -> dict:
    """Soft MoE's forward+backward time over the dense MLP's and soft-moe-pytorch's, per setting and mode."""
    out = {}
    for setting, layers in rows.items():
        ours = layers.get("soft_moe", {})
        out[setting] = {f"soft_moe/{other}": {mode: time_ratio(row, layers[other].get(mode), "fwd_bwd")
                                              for mode, row in ours.items()}
                        for other in layers if other != "soft_moe"}
    return out


def clip_ratios(rows: dict) -> dict:
    """mmsoftmoe's step time over open_clip's, per role and mode."""
    return {role: {mode: time_ratio(row, kinds.get("open_clip", {}).get(mode), "step")
                   for mode, row in kinds.get("mmsoftmoe", {}).items()}
            for role, kinds in rows.items() if "open_clip" in kinds}


def sweep_figures(rows: dict, experts: tuple[int, ...]) -> dict:
    """Images/s per expert count, and the loss 1 - last/first from the fewest to the most experts, per mode."""
    out = {}
    first, last = f"e{experts[0]}", f"e{experts[-1]}"
    for mode in MODES:
        for what in ("train", "fwd_bwd"):
            ips = {k: row[mode][what]["samples_per_s"] for k, row in sorted(rows.items(), key=lambda kv: int(kv[0][1:]))
                   if what in row.get(mode, {})}
            if first in ips and last in ips:
                out.setdefault(mode, {})[what] = {"images_per_s": ips, "loss": 1 - ips[last] / ips[first]}
    return out


def target(description: str, per_mode: dict[str, float | None], threshold: float, at_most: bool) -> dict:
    """A target: the best value over modes (lowest for an upper bound), and whether it meets the threshold."""
    values = {m: v for m, v in per_mode.items() if v is not None}
    if not values:
        return {"description": description, "threshold": threshold, "at_most": at_most, "per_mode": per_mode,
                "value": None, "mode": None, "met": None}
    mode = (min if at_most else max)(values, key=values.get)
    value = values[mode]
    return {"description": description, "threshold": threshold, "at_most": at_most, "per_mode": per_mode,
            "value": value, "mode": mode, "met": value <= threshold if at_most else value >= threshold}


def targets(sizes: Sizes, derived: dict, rows: dict) -> dict:
    size = sizes.towers[-1][0]
    tower = derived.get("towers", {}).get(size, {}).get("soft_moe", {})
    clip = rows.get("clip", {})

    def mfu(role: str) -> dict:
        return {m: r["step"].get("mfu") for m, r in clip.get(role, {}).get("mmsoftmoe", {}).items()}

    sweep = derived.get("sweep", {})
    return {
        "soft_moe_train_time_per_image_vs_dense": target(
            f"Soft MoE {size} training time per image / its dense twin's <= {TOWER_TARGET}",
            {m: r.get("train") for m, r in tower.items()}, TOWER_TARGET, at_most=True),
        "clip_step_mfu_dense": target(f"CLIP training step MFU, dense ({sizes.clip_configs['dense']}) >= "
                                      f"{MFU_DENSE_TARGET:.0%}", mfu("dense"), MFU_DENSE_TARGET, at_most=False),
        "clip_step_mfu_soft_moe": target(f"CLIP training step MFU, Soft MoE ({sizes.clip_configs['soft_moe']}) >= "
                                         f"{MFU_SOFT_TARGET:.0%}", mfu("soft_moe"), MFU_SOFT_TARGET, at_most=False),
        "expert_sweep_loss": target(
            f"training throughput lost from {sizes.sweep_experts[0]} to {sizes.sweep_experts[-1]} experts "
            f"<= {SWEEP_TARGET:.0%}", {m: f.get("train", {}).get("loss") for m, f in sweep.items()},
            SWEEP_TARGET, at_most=True),
    }


def derive(report: dict, sizes: Sizes) -> None:
    """Every derived figure of the report, in place, from the parts' raw measurements."""
    parts = report["parts"]
    gemm = parts.get("peak", {}).get("rows", {}).get("gemm", {}).get("bf16")
    peak = gemm["tflops"] if gemm else None
    report["peak_tflops"] = peak
    for data in parts.values():
        for t in timings(data["rows"]):
            derive_timing(t, peak)
    rows = {name: data["rows"] for name, data in parts.items()}
    derived = {
        "towers": tower_ratios(rows.get("towers", {})),
        "clip_vs_open_clip": clip_ratios(rows.get("clip", {})),
        "layer": layer_ratios(rows.get("layer", {})),
        "sweep": sweep_figures(rows.get("sweep", {}), sizes.sweep_experts),
        "compile_speedup": {name: compile_speedups(r) for name, r in rows.items() if name != "peak"},
    }
    report["derived"] = derived
    report["targets"] = targets(sizes, derived, rows)


# Report.
def fmt(value, spec: str = ".2f", scale: float = 1.0) -> str:
    return "-" if value is None else format(value * scale, spec)


def table(header: list[str], lines: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(x) + " |"
                                                                              for x in lines]


def compiled_speedup(report: dict, part: str, key: str, mode: str, what: str) -> float | None:
    """A compiled row's speed-up over its eager twin (None on eager rows)."""
    return report["derived"]["compile_speedup"][part].get(key, {}).get(what) if mode == "compiled" else None


def targets_section(report: dict) -> list[str]:
    meta = report["meta"]
    out = [f"# gpu_suite ({meta['sizes']}): {meta['device_name'] or '?'}, {meta['date']}", "",
           f"torch {meta['torch']}, CUDA {meta.get('cuda')}, commit {meta['commit']}; bf16 GEMM peak "
           f"{fmt(report['peak_tflops'], '.1f')} TFLOP/s (measured in this run); {meta['elapsed_s']:.0f} s of the "
           f"{meta['budget_s']:.0f} s budget. MFU: achieved (counted) FLOP/s over that peak.", "", "## Targets", ""]
    return out + table(["target", "value", "mode", "met"], [
        [t["description"], fmt(t["value"], ".3f"), t["mode"] or "-",
         {True: "yes", False: "NO", None: "unmeasured"}[t["met"]]] for t in report["targets"].values()])


def towers_section(report: dict) -> list[str]:
    ratios, lines = report["derived"]["towers"], []
    for size, families in report["parts"].get("towers", {}).get("rows", {}).items():
        for family, modes in families.items():
            for mode, r in modes.items():
                ratio = ratios[size][family][mode]
                lines.append([size, family, mode, fmt(r["train"]["samples_per_s"], ".0f"),
                              fmt(r["train"]["mfu"], ".1f", 100), fmt(ratio.get("train"), ".3f"),
                              fmt(r.get("infer", {}).get("samples_per_s"), ".0f"), fmt(ratio.get("infer"), ".3f"),
                              fmt(r["peak_bytes"], ".2f", 2**-30), fmt(r["params"], ".1f", 1e-6),
                              fmt(compiled_speedup(report, "towers", f"{size}/{family}", mode, "train")),
                              fmt(r["train"]["first_call_s"], ".1f")])
    return ["", "## Towers: training step (forward, backward, AdamW), bf16 autocast", ""] + table(
        ["tower", "family", "mode", "train img/s", "MFU %", "time/img vs dense", "infer img/s", "infer vs dense",
         "peak GiB", "params M", "compile speed-up", "first call s"], lines)


def clip_section(report: dict) -> list[str]:
    vs_open_clip = report["derived"]["clip_vs_open_clip"]
    lines = [[r["model"], kind, mode, fmt(r["step"]["samples_per_s"], ".1f"), fmt(r["step"]["mfu"], ".1f", 100),
              fmt(vs_open_clip.get(role, {}).get(mode) if kind == "mmsoftmoe" else None, ".3f"),
              fmt(r["peak_bytes"], ".2f", 2**-30),
              fmt(compiled_speedup(report, "clip", f"{role}/{kind}", mode, "step")),
              fmt(r["step"]["first_call_s"], ".1f")]
             for role, kinds in report["parts"].get("clip", {}).get("rows", {}).items()
             for kind, modes in kinds.items() for mode, r in modes.items()]
    return ["", "## CLIP training step (image + text towers, loss, AdamW), samples/s per GPU", ""] + table(
        ["model", "step", "mode", "samples/s", "MFU %", "time vs open_clip", "peak GiB", "compile speed-up",
         "first call s"], lines)


def sweep_section(report: dict) -> list[str]:
    sweep = report["parts"].get("sweep", {})
    lines = [[k.removeprefix("e"), mode, fmt(r["train"]["samples_per_s"], ".0f"), fmt(r["train"]["mfu"], ".1f", 100),
              fmt(r["fwd_bwd"]["samples_per_s"], ".0f"), fmt(r["params"], ".1f", 1e-6),
              fmt(r["peak_bytes"], ".2f", 2**-30)]
             for k, modes in sorted(sweep.get("rows", {}).items(), key=lambda kv: int(kv[0][1:]))
             for mode, r in modes.items()]
    losses = [f"{mode}: " + ", ".join(f"{what} {f[what]['loss']:.1%}" for what in ("train", "fwd_bwd") if what in f)
              for mode, f in report["derived"]["sweep"].items()]
    return (["", f"## Expert sweep: {sweep.get('tower', '-')}, one slot per expert", ""]
            + table(["experts", "mode", "train img/s", "MFU %", "fwd+bwd img/s", "params M", "peak GiB"], lines)
            + ["", "Loss from the fewest to the most experts: " + ("; ".join(losses) or "-")])


def layer_section(report: dict) -> list[str]:
    lines = []
    for setting, layers in report["parts"].get("layer", {}).get("rows", {}).items():
        for layer, modes in layers.items():
            for mode, r in modes.items():
                ratio = {k.split("/")[1]: v.get(mode) for k, v in report["derived"]["layer"][setting].items()}
                ours = layer == "soft_moe"
                lines.append([f"{setting} (b={r['setting']['batch']})", layer, mode,
                              fmt(r["fwd_bwd"]["seconds"], ".2f", 1e3), fmt(r["fwd_bwd"]["mfu"], ".1f", 100),
                              fmt(ratio.get("dense") if ours else None, ".3f"),
                              fmt(ratio.get(LUCIDRAINS) if ours else None, ".3f"),
                              fmt(compiled_speedup(report, "layer", f"{setting}/{layer}", mode, "fwd_bwd")),
                              fmt(r["fwd_bwd"]["first_call_s"], ".1f")])
    return ["", "## Soft MoE layer: forward + backward, bf16 autocast", ""] + table(
        ["setting", "layer", "mode", "ms", "MFU %", "time vs dense", "time vs soft-moe-pytorch", "compile speed-up",
         "first call s"], lines)


def markdown(report: dict) -> str:
    sections = (targets_section, towers_section, clip_section, sweep_section, layer_section)
    out = [line for section in sections for line in section(report)]
    out += ["", "## Notes", ""] + [f"- {n}" for n in notes(report["parts"])]
    return "\n".join(out) + "\n"


def notes(parts: dict) -> list[str]:
    """Everything not measured, and why: parts not run or killed, rows skipped or failed."""
    out = []
    for name, data in parts.items():
        for key in ("not_run", "killed", "failed"):
            if key in data:
                out.append(f"{name}: {data[key]}")
        out += [f"{name}: {n}" for n in data.get("notes", [])]
        out += [f"{name}/{row}: skipped ({why})" for row, why in data.get("skipped", {}).items()]
        out += [f"{name}/{row}: ERROR {err}" for row, err in data.get("errors", {}).items()]
    return out or ["every row measured"]

