"""The `mmsoftmoe` command: `mmsoftmoe {train,eval,export,demo,consolidate} ...`, and its one error contract.

It lives outside the library so that `mmsoftmoe/` imports neither `training/` nor `eval/`; each subcommand's
module is imported only when that subcommand runs. Every documented entry point goes through this command
(`torchrun --no-python mmsoftmoe train ...` for several processes), so nothing depends on the top-level names
`training` and `eval` resolving to ours.

Errors a user can cause (a bad config value, a missing or damaged file, a bad argument) print one line,
`error: <what is wrong and the fix>`, and exit with status 2; other errors keep their traceback (status 1).
Set `MMSOFTMOE_TRACEBACK=1` to see the traceback of a user error too.
"""

from __future__ import annotations

import importlib
import json
import os
import sys

COMMANDS = {
    "train": ("training.main", "contrastive pretraining (accelerate; one CPU to many nodes)"),
    "eval": ("eval.main", "zero-shot, retrieval, few-shot, linear probe and fine-tuning evaluation"),
    "export": ("mmsoftmoe.export", "export the image encoder (timm, open_clip, hf, onnx, torchscript)"),
    "demo": ("training.demo", "pretrain on built-in data, evaluate, export, print a results table"),
    "consolidate": ("mmsoftmoe.parallel.checkpoint", "a sharded (FSDP2/EP) checkpoint -> the single-file model"),
    "plan": ("mmsoftmoe_cli", "per-GPU memory and step time of DDP / FSDP2 / FSDP2+EP layouts; the fastest that fits"),
}

# What a user can cause: bad values and arguments, missing or unreadable files, training that diverged.
USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError, PermissionError,
               FloatingPointError)


def _usage(argv: list[str]) -> int:
    width = max(map(len, COMMANDS)) + 2
    lines = [f"  {name:<{width}}{help_}" for name, (_, help_) in COMMANDS.items()]
    print(f"usage: mmsoftmoe {{{','.join(COMMANDS)}}} [args]\n\ncommands:\n" + "\n".join(lines)
          + "\n\n`mmsoftmoe COMMAND --help` describes a command.")
    bad = bool(argv) and argv[0] not in ("-h", "--help")
    if bad:
        print(f"\nerror: unknown command {argv[0]!r}; valid commands: {sorted(COMMANDS)}", file=sys.stderr)
    return 2 if bad or not argv else 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
        return _usage(argv)
    # torch's CPU allocator backs large tensors with transparent huge pages only if this is set before torch
    # loads; measured on the S/16 Soft MoE layer it removes ~97% of page faults per step (SPEC section 6).
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
    module = importlib.import_module(COMMANDS[argv[0]][0])
    try:
        return (plan_main if argv[0] == "plan" else module.main)(argv[1:]) or 0
    except USER_ERRORS as err:
        if os.environ.get("MMSOFTMOE_TRACEBACK"):
            raise
        print(f"error: {err}", file=sys.stderr)
        return 2


def count_run_config(config: str, overrides: list[str] | None = None):
    """(run config, the planner's counts of its model on the meta device). Here, not in the library, because
    run configs belong to training/ (the library imports neither training/ nor eval/)."""
    from mmsoftmoe.models.clip import build_clip
    from mmsoftmoe.parallel.plan import count_model
    from training.config import load_config

    # The planner reads no data: the built-in source keeps a cluster config's data paths from being checked here.
    cfg = load_config(config, ["data.source=shapes", *(overrides or [])])
    model, _ = build_clip(cfg.model.name, device="meta")
    return cfg, count_model(model, grad_checkpointing=cfg.model.grad_checkpointing)


def plan_main(argv: list[str]) -> int:
    """`mmsoftmoe plan --config C --gpus N --gpu-memory GB [--scaling] [key=value ...]`."""
    import argparse

    from mmsoftmoe.parallel import plan

    parser = argparse.ArgumentParser(prog="mmsoftmoe plan", description=plan.__doc__.splitlines()[0])
    parser.add_argument("--config", help="run config name or path (with --scaling: the three paper configs)")
    parser.add_argument("--scaling", action="store_true", help="8..1024 GPUs for B/16, L/16, H/14")
    parser.add_argument("--png", default="runs/plan_scaling.png", help="where --scaling writes its figure")
    parser.add_argument("overrides", nargs="*", help="config overrides key=value")
    plan.add_arguments(parser)
    args = parser.parse_args(argv)
    if args.scaling:
        counted = {}
        for name in plan.SCALING_CONFIGS:
            cfg, counts = count_run_config(name, args.overrides)
            counted[name] = (counts, cfg.batch_size, cfg.grad_accum_steps, cfg.precision == "bf16")
        rows = plan.scaling(counted, args, png=args.png)
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
    plan.run(counts, args, global_batch=cfg.batch_size, grad_accum=cfg.grad_accum_steps,
             bf16=cfg.precision == "bf16", dp_replicate=par.dp_replicate)
    return 0


if __name__ == "__main__":
    sys.exit(main())
