"""The `mmsoftmoe` command: `mmsoftmoe {train,eval,export,demo,consolidate,plan,shards} ...`, and its one error
contract.

It lives outside the library so that `mmsoftmoe/` imports neither `training/` nor `eval/`; each subcommand's
module is imported only when that subcommand runs. Every documented entry point goes through this command
(`torchrun --no-python mmsoftmoe train ...` for several processes), so nothing depends on the top-level names
`training` and `eval` resolving to ours.

Errors a user can cause (a bad config value, a missing or damaged file, a bad argument) print one line,
`error: <what is wrong and the fix>`, and exit with status 2; other errors keep their traceback (status 1).
Set `MMSOFTMOE_TRACEBACK=1` to see the traceback of a user error too. In a run of several processes (torchrun
sets `RANK`) only rank 0 prints the `error:` line; the other ranks exit with status 2 quietly, so an error every
rank raises (a bad value, a full disk) is printed once.
"""

from __future__ import annotations

import importlib
import os
import sys
import warnings

COMMANDS = {
    "train": ("mmsoftmoe_training.main", "contrastive pretraining (accelerate; one CPU to many nodes)"),
    "eval": ("mmsoftmoe_eval.main", "zero-shot, retrieval, few-shot, linear probe and fine-tuning evaluation"),
    "export": ("mmsoftmoe.export", "export the image encoder (timm, open_clip, hf, onnx, torch_export)"),
    "demo": ("mmsoftmoe_training.demo", "pretrain on built-in data, evaluate, export, print a results table"),
    "consolidate": ("mmsoftmoe.parallel.dcp", "a sharded (FSDP2/EP) checkpoint -> the single-file model"),
    "shards": ("mmsoftmoe.data.shard_writer", "image folder / CSV / parquet pairs -> WebDataset shards"),
    "plan": ("mmsoftmoe_training.plan",
             "per-GPU memory and step time of DDP / FSDP2 / FSDP2+EP layouts; the fastest that fits"),
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
    # loads; measured on the S/16 Soft MoE layer it removes ~97% of page faults per step (docs/design.md, section 6).
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
    if int(os.environ.get("RANK", "0")) != 0:  # torchrun: library warnings once, from rank 0, not once per process
        warnings.simplefilter("ignore")
    module = importlib.import_module(COMMANDS[argv[0]][0])
    from mmsoftmoe.console import quiet_third_party_bars

    quiet_third_party_bars()
    try:
        return module.main(argv[1:]) or 0
    except USER_ERRORS as err:
        if os.environ.get("MMSOFTMOE_TRACEBACK"):
            raise
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
