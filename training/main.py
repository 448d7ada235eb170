"""`mmsoftmoe train --config NAME|FILE [key=value ...]`: contrastive pretraining with accelerate.

The same command runs on one CPU, one GPU, or many processes: `torchrun --nproc_per_node N --no-python mmsoftmoe
train ...` (CPU processes use gloo) or `accelerate launch --multi_gpu --no_python mmsoftmoe train ...`.

`fit(cfg)` checks everything the run will use before it creates anything, takes the run folder, and runs a
`Trainer`. The Trainer's loop is the step (`mmsoftmoe_training.loop.optimizer_step`) followed by components that
each decide their own timing: `StepLog` (progress, the log line and metrics of logging steps), `Evaluator`
(zero-shot every `eval.every` steps), `Validator` (held-out pairs every `val_every` steps) and `Checkpointer`
(every `checkpoint_every` steps). How the run is spread over
processes, replicated (accelerate's DDP) or sharded (FSDP2 + expert parallelism), is one `Strategy` object chosen
at start-up (`mmsoftmoe_training.strategy`).

The end of a run writes the last checkpoint and `final/` first, then evaluates: a failing final evaluation is
logged and raised (non-zero exit) with both intact, and `final/trainer_state.json` gets the final metrics only
once they exist.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs, set_seed

from mmsoftmoe.console import progress_bar
from mmsoftmoe.data import SKIP_LOG_NAME, count_skipped, transforms_from_preprocess_cfg
from mmsoftmoe.launch import launched_accelerator
from mmsoftmoe.layers import set_record_stats
from mmsoftmoe.models.accounting import count_parameters, parameter_counts
from mmsoftmoe.models.clip import preprocess_config
from mmsoftmoe_eval.datasets import build_dataset
from mmsoftmoe_eval.protocol import default_test_split
from mmsoftmoe_eval.runner import run_evaluation
from mmsoftmoe_training.checkpointing import (
    PendingCheckpoint,
    choose_resume_checkpoint,
    finish_checkpoint,
    record_final_metrics,
    save_checkpoint,
    save_final_model,
    start_checkpoint,
)
from mmsoftmoe_training.config import TrainConfig, config_help, config_yaml, get_value, load_config, to_dict, valid_keys
from mmsoftmoe_training.data import build_pair_dataset, build_train_loader
from mmsoftmoe_training.lock import acquire_run_lock
from mmsoftmoe_training.logger import MetricsLogger, plot_training
from mmsoftmoe_training.loop import StepResult, TrainState, build_loss, optimizer_step, record_step, step_metrics
from mmsoftmoe_training.optim import lr_multiplier
from mmsoftmoe_training.strategy import Strategy, build_strategy, process_group
from mmsoftmoe_training.validate import build_val_loader, validation_metrics

logger = logging.getLogger("mmsoftmoe.train")
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

# Trackers accelerate can log to, and the package each needs.
TRACKER_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow", "comet_ml": "comet_ml",
                    "aim": "aim", "clearml": "clearml", "dvclive": "dvclive"}


def check_trackers(trackers: list[str]) -> list[str]:
    """The configured trackers; an unknown one or one whose package is missing is an error, not a warning."""
    for name in trackers:
        if name not in TRACKER_PACKAGES:
            raise ValueError(f"trackers: unknown tracker {name!r}; choices: {sorted(TRACKER_PACKAGES)} (or [])")
        if importlib.util.find_spec(TRACKER_PACKAGES[name]) is None:
            raise ValueError(f"trackers: {name!r} needs the package {TRACKER_PACKAGES[name]!r}, which is not "
                             f"installed; pip install {TRACKER_PACKAGES[name]}, or remove it (trackers=[])")
    return trackers


def build_accelerator(cfg: TrainConfig) -> Accelerator:
    """accelerate's Accelerator for this run (`mmsoftmoe.launch`: refuses to start as several independent copies of
    one run)."""
    trackers = check_trackers([t for t in cfg.trackers if t])
    timeout = InitProcessGroupKwargs(timeout=timedelta(seconds=cfg.parallel.nccl_timeout_s))
    accelerator = launched_accelerator(mixed_precision=cfg.precision, log_with=trackers or None,
                                       project_dir=cfg.output_dir, kwargs_handlers=[timeout])
    if trackers:
        accelerator.init_trackers("mmsoftmoe", config=_flat_config(cfg))
    return accelerator


def _flat_config(cfg: TrainConfig) -> dict:
    flat = {key: get_value(cfg, key) for key in valid_keys()}
    return {k: v if isinstance(v, int | float | str | bool) else str(v) for k, v in flat.items()}


@contextlib.contextmanager
def run_folder(cfg: TrainConfig, accelerator: Accelerator) -> Iterator[Path]:
    """Create `output_dir` and write the resolved `config.yaml`; while open, the main process also logs to
    `train.log` (an error that ends the run included: on a cluster the log is what a user reads) and the other
    processes log warnings only (one copy of each line)."""
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    logging.getLogger("accelerate").setLevel(logging.WARNING)  # its per-save INFO lines drown the run's own
    ours = logging.getLogger("mmsoftmoe")
    handler = logging.FileHandler(out / "train.log") if accelerator.is_main_process else logging.NullHandler()
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    ours.addHandler(handler)
    ours.setLevel(logging.INFO if accelerator.is_main_process else logging.WARNING)
    try:
        if accelerator.is_main_process:
            (out / "config.yaml").write_text(config_yaml(cfg))
        yield out
    except (ValueError, OSError) as err:  # what a user can cause: the `error:` line the command prints
        logger.error("error: %s", err)
        raise
    except Exception:
        logger.exception("the run failed")
        raise
    finally:
        ours.removeHandler(handler)
        handler.close()


@contextlib.contextmanager
def refused_runs_leave_no_folder(output_dir: str | Path, main_process: bool) -> Iterator[Callable[[], None]]:
    """A run refused at start-up (before its first step) leaves a folder that did not exist, or was empty, as it
    found it: what it created there (config, log, lock) is removed once the lock is released. Yields `started()`,
    which the run calls when start-up is over (from then on the folder is the run's)."""
    out = Path(output_dir)
    existed = out.exists()
    fresh = not existed or (out.is_dir() and not any(out.iterdir()))
    started = False

    def mark_started() -> None:
        nonlocal started
        started = True

    try:
        yield mark_started
    except Exception:
        if fresh and not started and main_process and out.is_dir():
            for path in out.iterdir() if existed else [out]:
                if path.is_dir():
                    shutil.rmtree(path)
                else:
                    path.unlink()
        raise


def check_start(cfg: TrainConfig) -> None:
    """Resolve, before anything is created or built, every value the run only uses later: the evaluation data
    (its kind, layout and the splits the evaluations read). Trackers are checked by `build_accelerator`.

    Raises:
        ValueError: naming the key and what is wrong, as every config error does.
    """
    spec = cfg.eval.dataset
    if spec is None:
        return
    splits = {default_test_split(spec)} | ({"train"} if cfg.eval.fewshot else set())
    for split in sorted(splits):
        try:
            build_dataset(spec, split)
        except (ValueError, FileNotFoundError, NotADirectoryError, PermissionError) as err:
            raise ValueError(f"eval.dataset={spec!r}: {err} (checked before training; eval.dataset=none trains "
                             "without evaluation)") from err


def log_summary(cfg: TrainConfig, accelerator: Accelerator, model: torch.nn.Module, dataset,
                state: TrainState) -> None:
    """What the run is about to do, in one block of the log."""
    total = count_parameters(model)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    image = parameter_counts(model.visual, model.visual.trunk)
    try:
        size = len(dataset)
        data = f"{size} samples, {cfg.steps * cfg.batch_size / size:.3g} epochs in {cfg.steps} steps"
    except TypeError:
        size = cfg.data.train_num_samples  # open_clip's epoch size of a streaming source
        data = (f"streaming, {size} samples per epoch (data.train_num_samples), "
                f"{cfg.steps * cfg.batch_size / size:.3g} epochs in {cfg.steps} steps" if size
                else "streaming (size unknown; set data.train_num_samples)")
    per_process = cfg.batch_size // accelerator.num_processes
    logger.info(
        "run %s: model %s, %.2fM parameters (%.2fM trainable; image tower %.2fM, experts %.2fM, active per image "
        "%.2fM); data %s; batch %d global, %d per process in %d micro-batch(es) of %d; %d process(es) on %s; "
        "precision %s; %s",
        cfg.output_dir, cfg.model.name, total / 1e6, trainable / 1e6, image["total"] / 1e6, image["expert"] / 1e6,
        image["flop_equivalent_active"] / 1e6, data, cfg.batch_size,
        per_process, cfg.grad_accum_steps, per_process // cfg.grad_accum_steps, accelerator.num_processes,
        accelerator.device.type, cfg.precision,
        f"resuming at step {state.step}" if state.step else "starting at step 0")


def flat_metrics(results: dict, prefix: str = "") -> dict[str, float]:
    """`{"zeroshot": {"acc1": x}, "fewshot": {"10shot": {"acc1": y}}}` -> `{"zeroshot/acc1": x, ...}` (scalars only)."""
    out = {}
    for key, value in results.items():
        if isinstance(value, dict):
            out.update(flat_metrics(value, f"{prefix}{key}/"))
        elif isinstance(value, int | float):
            out[f"{prefix}{key}"] = float(value)
    return out


def _to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


class StepLog:
    """The progress bar, and on logging steps (every `log_every` steps and the last) the log line and the step's
    metrics (losses, lr, gradient norm, throughput, routing statistics)."""

    def __init__(self, cfg: TrainConfig, accelerator: Accelerator, strategy: Strategy, desc: str, start: int,
                 epoch_size: int | None) -> None:
        self.cfg, self.accelerator, self.strategy, self.epoch_size = cfg, accelerator, strategy, epoch_size
        self.progress = progress_bar(total=cfg.steps, initial=start, desc=desc, dynamic_ncols=True,
                                     show=accelerator.is_local_main_process)
        self.interval_start, self.interval_samples = time.perf_counter(), 0

    def due(self, step: int) -> bool:
        """Whether `step` (1-based) logs; routing statistics are recorded on those steps only (they cost time)."""
        return step % self.cfg.log_every == 0 or step == self.cfg.steps

    def maybe(self, state: TrainState, result: StepResult) -> dict[str, float]:
        """The step's metrics if it is a logging step, else {}."""
        self.progress.update(1)
        self.interval_samples += self.cfg.batch_size
        if not self.due(state.step):
            return {}
        s = self.strategy
        record = step_metrics(self.accelerator, result, s.module, s.optimizer,
                              self.interval_samples / (time.perf_counter() - self.interval_start))
        record["nonfinite_steps"] = state.nonfinite_steps
        epoch = ""
        if self.epoch_size:  # a map-style source's size, or a streaming one's data.train_num_samples
            record["epoch"] = state.samples_seen / self.epoch_size
            epoch = f", epoch {record['epoch']:.2f}"
        self.progress.set_postfix(loss=f"{record['loss']:.4f}", samples_s=f"{record['samples_per_s']:.1f}")
        logger.info("step %d/%d: loss %.4f, lr %.3g, %.1f samples/s%s", state.step, self.cfg.steps, record["loss"],
                    record["lr"], record["samples_per_s"], epoch)
        self.interval_start, self.interval_samples = time.perf_counter(), 0
        return record

    def close(self) -> None:
        self.progress.close()


def in_run_step(every: int, step: int, steps: int) -> bool:
    """Whether an every-`every`-steps component (0: never) runs at `step` during the run; the last step is left to
    its `final`, which the end of the run calls."""
    return bool(every) and step % every == 0 and step < steps


class Evaluator:
    """Zero-shot classification every `eval.every` steps, and at the end zero-shot plus the 10-shot probe
    (`eval.fewshot`); nothing without `eval.dataset`. `last` holds the latest results (checkpoints record them)."""

    def __init__(self, cfg: TrainConfig, strategy: Strategy, batch_size: int, last: dict[str, float]) -> None:
        self.cfg, self.strategy, self.batch_size, self.last = cfg, strategy, batch_size, last
        self.preprocess = transforms_from_preprocess_cfg(preprocess_config(strategy.module))[1]

    def maybe(self, step: int) -> dict[str, float]:
        if not in_run_step(self.cfg.eval.every, step, self.cfg.steps):
            return {}
        return self.evaluate(("zeroshot",))

    def final(self) -> dict[str, float]:
        return self.evaluate(("zeroshot", "fewshot") if self.cfg.eval.fewshot else ("zeroshot",))

    def evaluate(self, tasks: tuple[str, ...]) -> dict[str, float]:
        spec = self.cfg.eval.dataset
        if spec is None:
            return {}

        def run(model: torch.nn.Module, accelerator: Accelerator) -> dict[str, float]:
            results = run_evaluation(model, self.strategy.tokenizer, dataset=spec, tasks=tasks,
                                     preprocess=self.preprocess, batch_size=self.batch_size,
                                     accelerator=accelerator, shots=(10,))[spec]
            return flat_metrics({k: v for k, v in results.items() if k in tasks})

        self.last = self.strategy.evaluate(run)
        return self.last


class Validator:
    """open_clip's `--val-data`: the contrastive loss and retrieval recall on the held-out pairs of
    `data.val_source`, every `val_every` steps and at the end (`mmsoftmoe_training.validate`); nothing without it."""

    def __init__(self, cfg: TrainConfig, accelerator: Accelerator, strategy: Strategy, loss_fn: torch.nn.Module,
                 batch_size: int) -> None:
        self.cfg, self.accelerator, self.strategy, self.loss_fn = cfg, accelerator, strategy, loss_fn
        self.loader = None if cfg.data.val_source is None else build_val_loader(
            cfg.data, preprocess_config(strategy.module), strategy.tokenizer, batch_size=batch_size,
            rank=accelerator.process_index, world_size=accelerator.num_processes)

    def maybe(self, step: int) -> dict[str, float]:
        if not in_run_step(self.cfg.val_every, step, self.cfg.steps):
            return {}
        return self.final()

    def final(self) -> dict[str, float]:
        if self.loader is None:
            return {}
        return validation_metrics(self.strategy.module, self.loader, self.loss_fn, self.accelerator)


class Checkpointer:
    """A resumable checkpoint every `checkpoint_every` steps (the end of the run saves its own), the newest
    `keep_checkpoints` kept; what it holds is the strategy's business. With `checkpoint_async` (sharded runs) the
    save stages the state and returns; the shards are written in the background and the checkpoint is published at
    the first step after they are on disk; a second save, and the end of the run, wait for the first."""

    def __init__(self, cfg: TrainConfig, accelerator: Accelerator, strategy: Strategy, out: Path,
                 trainer_state) -> None:
        self.cfg, self.accelerator, self.strategy, self.out = cfg, accelerator, strategy, out
        self.trainer_state = trainer_state  # () -> dict, read at save time
        self.pending: PendingCheckpoint | None = None
        # The background writes' collectives get a group of their own: they must not interleave with training's.
        self.group = dist.new_group(backend="gloo") if cfg.checkpoint_async and dist.is_initialized() else None

    def maybe(self, step: int) -> None:
        if self.pending is not None and self.pending.done():
            self.wait()
        if step % self.cfg.checkpoint_every == 0 and step < self.cfg.steps:
            self.save(step, background=self.cfg.checkpoint_async)

    def save(self, step: int, background: bool = False) -> None:
        self.wait()
        common = dict(output_dir=self.out, step=step, trainer_state=self.trainer_state(),
                      model_cfg=self.strategy.model_cfg, keep=self.cfg.keep_checkpoints,
                      **self.strategy.checkpoint_args())
        if background:
            self.pending = start_checkpoint(self.accelerator, process_group=self.group, **common)
        else:
            save_checkpoint(self.accelerator, **common)

    def wait(self) -> None:
        """Finish the background save in flight, if any (publishing it)."""
        if self.pending is not None:
            pending, self.pending = self.pending, None
            finish_checkpoint(pending)


class Trainer:
    """One run: the strategy's model, the data, the step, and the components that decide their own timing."""

    def __init__(self, cfg: TrainConfig, accelerator: Accelerator, out: Path, desc: str = "train") -> None:
        set_seed(cfg.seed)
        self.cfg, self.accelerator, self.out = cfg, accelerator, out
        self.strategy = build_strategy(cfg, accelerator)
        self.state, last_eval = self.restore()
        self.metrics = MetricsLogger(accelerator, out)
        self.metrics.truncate_after(self.state.step)
        if self.state.step == 0 and accelerator.is_main_process:  # a fresh start counts its own bad samples only
            (out / SKIP_LOG_NAME).unlink(missing_ok=True)
        accelerator.wait_for_everyone()  # before any data worker appends to the skip log
        self.micro_batch = cfg.batch_size // (accelerator.num_processes * cfg.grad_accum_steps)
        self.dataset, self.loader = self.build_data()
        self.loss_fn = build_loss(cfg.loss, local_loss=cfg.local_loss, gather_with_grad=cfg.gather_with_grad,
                                  rank=accelerator.process_index, world_size=accelerator.num_processes)
        log_summary(cfg, accelerator, self.strategy.module, self.dataset, self.state)
        epoch_size = len(self.dataset) if hasattr(self.dataset, "__len__") else cfg.data.train_num_samples
        self.log = StepLog(cfg, accelerator, self.strategy, desc, self.state.step, epoch_size)
        self.evaluator = Evaluator(cfg, self.strategy, self.micro_batch, last_eval)
        self.validator = Validator(cfg, accelerator, self.strategy, self.loss_fn, self.micro_batch)
        self.checkpointer = Checkpointer(cfg, accelerator, self.strategy, out, self.trainer_state)

    def restore(self) -> tuple[TrainState, dict[str, float]]:
        """The state to start from: fresh, or the checkpoint `resume` names (model and optimizer restored)."""
        cfg = self.cfg
        resume_from = choose_resume_checkpoint(self.accelerator, cfg.resume, cfg.output_dir,
                                               verify=cfg.verify_checkpoints)
        if resume_from is None:
            return TrainState(), {}
        saved = self.strategy.restore(resume_from, cfg.model.name)
        state = TrainState(**saved["state"])
        logger.info("resumed from %s at step %d", resume_from, state.step)
        trained = saved.get("config", {}).get("steps")
        if trained is not None and state.step >= trained and cfg.steps > state.step:
            logger.info("extending a finished run: it trained %d of %d steps and now runs to %d (the learning-rate "
                        "schedule is recomputed for the new total)", state.step, trained, cfg.steps)
        return state, saved.get("metrics", {})

    def build_data(self):
        """(pair dataset, endless step-exact loader of micro-batches) for this process, from the resume step."""
        cfg, acc = self.cfg, self.accelerator
        dataset = build_pair_dataset(cfg.data, preprocess_config(self.strategy.module), self.strategy.tokenizer,
                                     acc.process_index, acc.num_processes, skip_log=self.out / SKIP_LOG_NAME)
        loader = build_train_loader(dataset, global_batch=cfg.batch_size, grad_accum_steps=cfg.grad_accum_steps,
                                    rank=acc.process_index, world_size=acc.num_processes, seed=cfg.seed,
                                    start_step=self.state.step, total_steps=cfg.steps,
                                    num_workers=cfg.data.num_workers, pin_memory=acc.device.type == "cuda",
                                    allow_repeats=cfg.data.allow_repeats_in_batch)
        return dataset, loader

    def trainer_state(self) -> dict:
        """What `trainer_state.json` records, in every checkpoint and in `final/`."""
        state = self.state
        return {"state": state.to_dict(), "step": state.step, "samples_seen": state.samples_seen,
                "config": to_dict(self.cfg), "metrics": self.evaluator.last,
                "data_skipped": count_skipped(self.out / SKIP_LOG_NAME)}

    def step(self, logging_step: bool) -> StepResult:
        """One optimizer step on the next global batch (its micro-batches)."""
        cfg, s = self.cfg, self.strategy
        micro = [_to_device(next(self.loader), self.accelerator.device) for _ in range(cfg.grad_accum_steps)]
        set_record_stats(s.module, logging_step)
        lr = cfg.optim.lr * lr_multiplier(
            self.state.step, schedule=cfg.optim.schedule, total_steps=cfg.steps,
            warmup_steps=cfg.optim.warmup_steps, cooldown_steps=cfg.optim.cooldown_steps,
            min_lr_ratio=cfg.optim.min_lr_ratio)
        result = optimizer_step(s.model, s.optimizer, micro, loss_fn=self.loss_fn, accelerator=self.accelerator,
                                routed_model=s.module.visual, aux_weight=cfg.aux_loss_weight, lr=lr,
                                grad_clip=cfg.optim.grad_clip, clip_grad_norm=s.clip_grad_norm)
        record_step(self.state, result, samples=cfg.batch_size, max_nonfinite=cfg.max_nonfinite_steps,
                    check=logging_step)
        return result

    def train(self) -> dict[str, float]:
        """Run to `steps`, then `finish`; returns the final evaluation's metrics."""
        state = self.state
        while state.step < self.cfg.steps:
            result = self.step(logging_step=self.log.due(state.step + 1))
            record = self.log.maybe(state, result)
            record.update(self.evaluator.maybe(state.step))
            record.update(self.validator.maybe(state.step))
            self.metrics.log(state.step, record)
            self.checkpointer.maybe(state.step)
        return self.finish()

    def close(self) -> None:
        """Stop the data workers now: forked while the run lock was held, they hold its file open, so the next run
        on this folder would find it taken until they exit."""
        self.loader = None

    def finish(self) -> dict[str, float]:
        """Save what the run made before anything can fail (the last checkpoint, then `final/`), then evaluate."""
        self.log.close()
        step, main_process = self.state.step, self.accelerator.is_main_process
        self.checkpointer.save(step)
        whole = self.strategy.final_model()
        if main_process:
            save_final_model(whole, self.strategy.model_cfg, self.out, self.trainer_state())
        del whole
        try:
            final = {**self.evaluator.final(), **self.validator.final()}
        except Exception as err:
            logger.error("the final evaluation failed (%s: %s); the last checkpoint (step %d) and final/ are saved: "
                         "evaluate them with `mmsoftmoe eval --checkpoint %s`", type(err).__name__, err, step,
                         self.out / "final")
            raise
        self.metrics.log(step, final)
        if main_process:
            if final:
                record_final_metrics(self.out, self.trainer_state())
            plot_training(self.metrics.read(), self.out / "training.png")
            logger.info("finished at step %d: %s", step, json.dumps(final))
        # Every process leaves together: one that tears the process group down while another still completes its
        # side of the last collective (the final gather) aborts the run ("terminate called without an active
        # exception", seen once under torchrun on 2 CPU processes).
        self.accelerator.wait_for_everyone()
        self.accelerator.end_training()
        return final


def fit(cfg: TrainConfig, desc: str = "train") -> dict:
    """Train as configured; returns the final metrics (also in `output_dir/final/trainer_state.json`).

    `desc` labels the progress bar (the demo names its phase there).
    """
    check_start(cfg)
    accelerator = build_accelerator(cfg)
    with (refused_runs_leave_no_folder(cfg.output_dir, accelerator.is_main_process) as started,
          acquire_run_lock(cfg.output_dir, accelerator.is_main_process), run_folder(cfg, accelerator) as out,
          process_group(cfg, accelerator)):
        trainer = Trainer(cfg, accelerator, out, desc)
        started()
        try:
            return trainer.train()
        finally:
            trainer.close()

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mmsoftmoe train", description=__doc__.splitlines()[0],
        epilog="Keys: `mmsoftmoe train --help-config` lists every key with its type, default and meaning.")
    parser.add_argument("--config", help="a shipped run config by name (demo, smoke, ...) or a YAML file")
    parser.add_argument("--help-config", action="store_true", help="list every config key and exit")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config as YAML and exit")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. optim.lr=1e-3 steps=100 smoke=true")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.help_config:
        print(config_help())
        return 0
    cfg = load_config(args.config, args.overrides)
    if args.print_config:
        print(config_yaml(cfg), end="")
        return 0
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
    metrics = fit(cfg)
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps({"output_dir": cfg.output_dir, **metrics}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
