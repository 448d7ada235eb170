"""`mmsoftmoe plan`: the planner (`mmsoftmoe.parallel.cost_model`) applied to a run config.

Here, not in the library, because run configs belong to training/ (the library imports neither training/ nor eval/).
"""

from __future__ import annotations

import argparse
import json

from mmsoftmoe.arguments import check_arguments
from mmsoftmoe.models.clip import build_clip
from mmsoftmoe.parallel import cost_model
from mmsoftmoe.parallel.cost_model import count_model
from mmsoftmoe_training.config import load_config


def count_run_config(config: str, overrides: list[str] | None = None):
    """(run config, the planner's counts of its model on the meta device)."""
    # The planner reads no data: the built-in source keeps a cluster config's data paths from being checked here.
    cfg = load_config(config, ["data.source=shapes", *(overrides or [])])
    model, _ = build_clip(cfg.model.name, device="meta")
    return cfg, count_model(model, grad_checkpointing=cfg.model.grad_checkpointing)


def main(argv: list[str] | None = None) -> int:
    """`mmsoftmoe plan --config C --gpus N --gpu-memory GB [--scaling] [key=value ...]`."""
    parser = argparse.ArgumentParser(prog="mmsoftmoe plan", description=cost_model.__doc__.splitlines()[0])
    parser.add_argument("--config", help="run config name or path (with --scaling: the three paper configs)")
    parser.add_argument("--scaling", action="store_true", help="8..1024 GPUs for B/16, L/16, H/14")
    parser.add_argument("--png", default="runs/plan_scaling.png", help="where --scaling writes its figure")
    parser.add_argument("overrides", nargs="*", help="config overrides key=value")
    cost_model.add_arguments(parser)
    args = parser.parse_args(argv)
    check_arguments(args, cost_model.ARGUMENT_MINIMUMS)
    if args.scaling:
        counted = {}
        for name in cost_model.SCALING_CONFIGS:
            cfg, counts = count_run_config(name, args.overrides)
            counted[name] = (counts, cfg.batch_size, cfg.grad_accum_steps, cfg.precision == "bf16")
        rows = cost_model.scaling(counted, args, png=args.png)
        if args.json:
            print(json.dumps(rows, indent=2))
        return 0
    if not args.config:
        raise ValueError("mmsoftmoe plan needs --config NAME_OR_PATH (or --scaling)")
    cfg, counts = count_run_config(args.config, args.overrides)
    par = cfg.parallel
    if args.gpus % par.dp_replicate:
        raise ValueError(f"--gpus {args.gpus} does not split into parallel.dp_replicate={par.dp_replicate} "
                         f"replicas; choose a multiple of {par.dp_replicate}")
    cost_model.run(counts, args, global_batch=cfg.batch_size, grad_accum=cfg.grad_accum_steps,
             bf16=cfg.precision == "bf16", dp_replicate=par.dp_replicate if par.dp_replicate > 1 else None)
    return 0
