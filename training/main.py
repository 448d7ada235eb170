"""`mmsoftmoe train --config NAME|FILE [key=value ...]`: contrastive pretraining with accelerate.

The same command runs on one CPU, one GPU, or many processes: `torchrun --nproc_per_node N --no-python mmsoftmoe
train ...` (CPU processes use gloo) or `accelerate launch --multi_gpu --no_python mmsoftmoe train ...`.
`fit(cfg)` composes the `build_*` helpers and runs the loop; the step itself is `training.loop.optimizer_step`.

Two ways of spreading a run over processes, chosen by `parallel.*`: accelerate's DDP (the default: every process
holds the whole model), or, with `parallel.dp_shard` set, `mmsoftmoe.parallel` (FSDP2 for the dense parameters,
the experts split over `parallel.ep` processes). A sharded run builds its model on the meta device and fills its
shards from one full build on rank 0, saves DCP checkpoints (resumable at another process count or layout),
clips by the global norm over both parameter kinds, and evaluates and writes `final/` from a whole copy gathered
on rank 0 (`build_sharded_model`, `gather_plain_model`).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import logging
import os
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path

import open_clip
import torch
import torch.distributed as dist
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs, broadcast_object_list, set_seed
from tqdm.auto import tqdm

from mmsoftmoe_eval.runner import run_evaluation
from mmsoftmoe.data import SKIP_LOG_NAME, count_skipped, transforms_from_preprocess_cfg
from mmsoftmoe.layers import set_record_stats
from mmsoftmoe.models.accounting import count_parameters, parameter_counts
from mmsoftmoe.models.clip import build_clip_from_config, preprocess_config, resolve_clip_config
from mmsoftmoe.models.pretrained import warm_start_
from mmsoftmoe.models.upcycle import upcycle_
from mmsoftmoe.parallel import (
    build_meshes,
    check_layout,
    clip_grad_norm_,
    expert_layers,
    full_model_state_dict,
    materialize_from_rank0,
    parallelize,
)
from mmsoftmoe_training.checkpoint import choose_resume_checkpoint, restore_training_state, save_checkpoint, save_final_model
from mmsoftmoe_training.checkpoint import read_start_weights
from mmsoftmoe_training.config import TrainConfig, config_help, config_yaml, get_value, load_config, to_dict, valid_keys
from mmsoftmoe_training.data import build_pair_dataset, build_train_loader
from mmsoftmoe_training.lock import acquire_run_lock
from mmsoftmoe_training.logger import MetricsLogger, plot_training
from mmsoftmoe_training.loop import TrainState, build_loss, optimizer_step, record_step, step_metrics
from mmsoftmoe_training.optim import build_optimizer, lr_multiplier

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
    """accelerate's Accelerator for this run; refuses to start as several independent copies of one run.

    Without an accelerator device accelerate must be told to use the CPU, or under `torchrun` it sees one process
    and every rank trains alone (SPEC section 7).
    """
    trackers = check_trackers([t for t in cfg.trackers if t])
    timeout = InitProcessGroupKwargs(timeout=timedelta(seconds=cfg.parallel.nccl_timeout_s))
    accelerator = Accelerator(cpu=not torch.accelerator.is_available(), mixed_precision=cfg.precision,
                              log_with=trackers or None, project_dir=cfg.output_dir, kwargs_handlers=[timeout])
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched != accelerator.num_processes:
        raise RuntimeError(f"WORLD_SIZE={launched} processes were launched, but accelerate sees "
                           f"{accelerator.num_processes}: every process would train alone. Launch with torchrun or "
                           "`accelerate launch` and do not set CUDA_VISIBLE_DEVICES to fewer devices than processes")
    if trackers:
        accelerator.init_trackers("mmsoftmoe", config=_flat_config(cfg))
    return accelerator


def _flat_config(cfg: TrainConfig) -> dict:
    flat = {key: get_value(cfg, key) for key in valid_keys()}
    return {k: v if isinstance(v, int | float | str | bool) else str(v) for k, v in flat.items()}


@contextlib.contextmanager
def run_folder(cfg: TrainConfig, accelerator: Accelerator) -> Iterator[Path]:
    """Create `output_dir` and write the resolved `config.yaml`; while open, the main process also logs to
    `train.log` and the other processes log warnings only (one copy of each line)."""
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
    finally:
        ours.removeHandler(handler)
        handler.close()


def build_model(cfg: TrainConfig, device: str = "cpu"):
    """(model, tokenizer, complete open_clip model config), towers locked and checkpointing set as configured.

    On `device="meta"` only the structure is built (no weights are allocated, upcycled or loaded).
    """
    model_cfg = resolve_clip_config(cfg.model.name, cfg.model.text_model)
    if cfg.loss == "siglip" and model_cfg.get("init_logit_bias") is None:
        raise ValueError(f"loss=siglip needs a model with a logit bias, and {cfg.model.name} has none; use a "
                         "*-Sigmoid model config (init_logit_bias=-10, init_logit_scale=log 10) or loss=clip")
    model, tokenizer = build_clip_from_config(model_cfg, device=device)
    open_clip.set_model_preprocess_cfg(model, preprocess_config(model))
    if device != "meta":
        load_start_weights(cfg, model)
    if cfg.model.lock_image:
        model.lock_image_tower()
    if cfg.model.lock_text:
        model.lock_text_tower()
    model.set_grad_checkpointing(cfg.model.grad_checkpointing)
    return model, tokenizer, model_cfg


def load_start_weights(cfg: TrainConfig, model: torch.nn.Module) -> None:
    """Upcycle the image tower from a dense checkpoint and/or warm-start from pretrained weights, as configured."""
    if cfg.model.upcycle_from:
        report = upcycle_(model.visual.trunk, read_start_weights(cfg.model.upcycle_from, cfg.verify_checkpoints))
        logger.info("upcycled the image tower from %s: %d tensors copied, %d expert tensors from dense MLPs, %d "
                    "fresh (routers), %d unused", cfg.model.upcycle_from, len(report.copied), len(report.upcycled),
                    len(report.fresh), len(report.unused))
    if cfg.model.pretrained:
        report = warm_start_(model, read_start_weights(cfg.model.pretrained, cfg.verify_checkpoints),
                             cfg.model.pretrained_towers)
        logger.info("warm start (%s) from %s: %d tensors loaded; missing %s; unexpected %s",
                    cfg.model.pretrained_towers, cfg.model.pretrained, len(report.loaded),
                    report.missing or "none", report.unexpected or "none")


def build_sharded_model(cfg: TrainConfig, accelerator: Accelerator):
    """(model, tokenizer, model config) of a sharded run: built on the meta device, experts split over
    `parallel.ep` processes and everything FSDP2-sharded (`mmsoftmoe.parallel.parallelize`), then each process's
    shards filled from the model rank 0 builds as an unsharded run would (so the run starts from the same weights,
    and only rank 0's host memory ever holds the whole model)."""
    par, world = cfg.parallel, accelerator.num_processes
    dp_shard = par.shard_size(world)
    model, tokenizer, model_cfg = build_model(cfg, device="meta")
    check_layout(world_size=world, dp_replicate=par.dp_replicate, dp_shard=dp_shard, ep=par.ep,
                 num_experts=tuple(layer.num_experts for layer in expert_layers(model).values()))
    meshes = build_meshes(device_type=accelerator.device.type, dp_replicate=par.dp_replicate, dp_shard=dp_shard,
                          ep=par.ep)
    parallelize(model, meshes)
    full = build_model(cfg)[0] if accelerator.is_main_process else None
    materialize_from_rank0(model, full, accelerator.device)
    logger.info("sharded: dp_replicate=%d x dp_shard=%d processes; experts split over ep=%d, each split FSDP2-sharded "
                "over dp_shard / ep = %d", par.dp_replicate, dp_shard, par.ep, dp_shard // par.ep)
    return model, tokenizer, model_cfg


def gather_plain_model(model: torch.nn.Module, model_cfg: dict, accelerator: Accelerator) -> torch.nn.Module | None:
    """A whole, unsharded copy of a sharded model on rank 0's device (None on the other ranks); call on every
    process."""
    state = full_model_state_dict(model)
    if not accelerator.is_main_process:
        return None
    plain, _ = build_clip_from_config(model_cfg)
    plain.load_state_dict(state)
    open_clip.set_model_preprocess_cfg(plain, preprocess_config(model))
    return plain.to(accelerator.device).eval()


def restore(cfg: TrainConfig, accelerator: Accelerator, model: torch.nn.Module,
            optimizer: torch.optim.Optimizer) -> tuple[TrainState, dict[str, float]]:
    """The state to start from: fresh, or the checkpoint `cfg.resume` names (model and optimizer restored)."""
    resume_from = choose_resume_checkpoint(accelerator, cfg.resume, cfg.output_dir, verify=cfg.verify_checkpoints)
    if resume_from is None:
        return TrainState(), {}
    saved = restore_training_state(accelerator, resume_from, cfg.model.name, model=model,
                                   sharded_optimizer=optimizer if cfg.parallel.sharded else None)
    state = TrainState(**saved["state"])
    logger.info("resumed from %s at step %d", resume_from, state.step)
    trained = saved.get("config", {}).get("steps")
    if trained is not None and state.step >= trained and cfg.steps > state.step:
        logger.info("extending a finished run: it trained %d of %d steps and now runs to %d (the learning-rate "
                    "schedule is recomputed for the new total)", state.step, trained, cfg.steps)
    return state, saved.get("metrics", {})


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
        data = "streaming (size unknown)"
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


def fit(cfg: TrainConfig, desc: str = "train") -> dict:
    """Train as configured; returns the final metrics (also in `output_dir/final/trainer_state.json`).

    `desc` labels the progress bar (the demo names its phase there).
    """
    accelerator = build_accelerator(cfg)
    with (acquire_run_lock(cfg.output_dir, accelerator.is_main_process), run_folder(cfg, accelerator) as out,
          process_group(cfg, accelerator)):
        return _fit(cfg, accelerator, out, desc)


@contextlib.contextmanager
def process_group(cfg: TrainConfig, accelerator: Accelerator) -> Iterator[None]:
    """A sharded run needs a process group; one process started without a launcher gets a group of one, for the
    run's duration."""
    if not cfg.parallel.sharded or dist.is_initialized():
        yield
        return
    dist.init_process_group(dist.get_default_backend_for_device(accelerator.device), store=dist.HashStore(),
                            rank=0, world_size=1, timeout=timedelta(seconds=cfg.parallel.nccl_timeout_s))
    try:
        yield
    finally:
        if dist.is_initialized():  # accelerate's end_training may have ended it already
            dist.destroy_process_group()


def _fit(cfg: TrainConfig, accelerator: Accelerator, out: Path, desc: str) -> dict:
    set_seed(cfg.seed)
    sharded = cfg.parallel.sharded
    model, tokenizer, model_cfg = build_sharded_model(cfg, accelerator) if sharded else build_model(cfg)
    unwrapped = model
    optimizer = build_optimizer(model, lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay,
                                betas=tuple(cfg.optim.betas), eps=cfg.optim.eps)
    if not sharded:  # a sharded model is already placed and distributed; its optimizer steps its shards
        model, optimizer = accelerator.prepare(model, optimizer)
    if cfg.model.compile:
        model = torch.compile(model)
    state, last_eval = restore(cfg, accelerator, unwrapped, optimizer)
    metrics_log = MetricsLogger(accelerator, out)
    metrics_log.truncate_after(state.step)
    if state.step == 0 and accelerator.is_main_process:  # a fresh start counts its own bad samples only
        (out / SKIP_LOG_NAME).unlink(missing_ok=True)
    accelerator.wait_for_everyone()  # before any data worker appends to the skip log

    preprocess = preprocess_config(unwrapped)
    _, eval_tf = transforms_from_preprocess_cfg(preprocess)
    dataset = build_pair_dataset(cfg.data, preprocess, tokenizer, accelerator.process_index,
                                 accelerator.num_processes, skip_log=out / SKIP_LOG_NAME)
    micro_batch = cfg.batch_size // (accelerator.num_processes * cfg.grad_accum_steps)
    loader = build_train_loader(dataset, global_batch=cfg.batch_size, grad_accum_steps=cfg.grad_accum_steps,
                                rank=accelerator.process_index, world_size=accelerator.num_processes,
                                seed=cfg.seed, start_step=state.step, total_steps=cfg.steps,
                                num_workers=cfg.data.num_workers, pin_memory=accelerator.device.type == "cuda",
                                allow_repeats=cfg.data.allow_repeats_in_batch)
    loss_fn = build_loss(cfg.loss, local_loss=cfg.local_loss, gather_with_grad=cfg.gather_with_grad,
                         rank=accelerator.process_index, world_size=accelerator.num_processes)
    log_summary(cfg, accelerator, unwrapped, dataset, state)

    def whole_model() -> torch.nn.Module | None:
        """The model to evaluate and save: itself, or a sharded one's whole copy on rank 0 (None elsewhere)."""
        return gather_plain_model(unwrapped, model_cfg, accelerator) if sharded else unwrapped

    def run_eval(final: bool, whole: Callable[[], torch.nn.Module | None] = whole_model) -> dict[str, float]:
        if cfg.eval.dataset is None:
            return {}
        tasks = ("zeroshot", "fewshot") if final and cfg.eval.fewshot else ("zeroshot",)
        evaluated, results = whole(), {}
        if evaluated is not None:  # sharded: rank 0 evaluates the gathered copy; the others wait for its results
            results = run_evaluation(evaluated, tokenizer, dataset=cfg.eval.dataset, tasks=tasks, preprocess=eval_tf,
                                     batch_size=micro_batch, accelerator=None if sharded else accelerator,
                                     shots=(10,))[cfg.eval.dataset]
            results = flat_metrics({k: v for k, v in results.items() if k in tasks})
        return broadcast_object_list([results])[0] if sharded else results

    def trainer_state() -> dict:
        """What `trainer_state.json` records, in every checkpoint and in `final/`."""
        return {"state": state.to_dict(), "step": state.step, "samples_seen": state.samples_seen,
                "config": to_dict(cfg), "metrics": last_eval, "data_skipped": count_skipped(out / SKIP_LOG_NAME)}

    def checkpoint() -> None:
        save_checkpoint(accelerator, unwrapped if sharded else model, out, step=state.step,
                        trainer_state=trainer_state(), model_cfg=model_cfg, keep=cfg.keep_checkpoints,
                        sharded_optimizer=optimizer if sharded else None)

    progress = tqdm(total=cfg.steps, initial=state.step, desc=desc, disable=not accelerator.is_local_main_process,
                    dynamic_ncols=True)
    interval_start, interval_samples = time.perf_counter(), 0
    while state.step < cfg.steps:
        micro = [_to_device(next(loader), accelerator.device) for _ in range(cfg.grad_accum_steps)]
        logging_step = (state.step + 1) % cfg.log_every == 0 or state.step + 1 == cfg.steps
        set_record_stats(unwrapped, logging_step)  # routing statistics cost time: only on logged steps
        lr = cfg.optim.lr * lr_multiplier(
            state.step, schedule=cfg.optim.schedule, total_steps=cfg.steps, warmup_steps=cfg.optim.warmup_steps,
            cooldown_steps=cfg.optim.cooldown_steps, min_lr_ratio=cfg.optim.min_lr_ratio)
        result = optimizer_step(model, optimizer, micro, loss_fn=loss_fn, accelerator=accelerator,
                                routed_model=unwrapped.visual, aux_weight=cfg.aux_loss_weight, lr=lr,
                                grad_clip=cfg.optim.grad_clip, clip_grad_norm=clip_grad_norm_ if sharded else None)
        record_step(state, result, samples=cfg.batch_size, max_nonfinite=cfg.max_nonfinite_steps, check=logging_step)
        interval_samples += cfg.batch_size
        progress.update(1)

        record = {}
        if logging_step:
            record = step_metrics(accelerator, result, unwrapped, optimizer,
                                  interval_samples / (time.perf_counter() - interval_start))
            record["nonfinite_steps"] = state.nonfinite_steps
            progress.set_postfix(loss=f"{record['loss']:.4f}", samples_s=f"{record['samples_per_s']:.1f}")
            logger.info("step %d/%d: loss %.4f, lr %.3g, %.1f samples/s", state.step, cfg.steps, record["loss"],
                        record["lr"], record["samples_per_s"])
            interval_start, interval_samples = time.perf_counter(), 0
        if cfg.eval.every and state.step % cfg.eval.every == 0 and state.step < cfg.steps:
            last_eval = run_eval(final=False)
            record.update(last_eval)
        if record:
            metrics_log.log(state.step, record)
        if state.step % cfg.checkpoint_every == 0 and state.step < cfg.steps:
            checkpoint()
    progress.close()

    whole = whole_model()  # gathered once (sharded): evaluated, then saved as final/
    last_eval = run_eval(final=True, whole=lambda: whole)
    metrics_log.log(state.step, dict(last_eval))
    checkpoint()
    if accelerator.is_main_process:
        save_final_model(whole, model_cfg, out, trainer_state())
        plot_training(metrics_log.read(), out / "training.png")
        logger.info("finished at step %d: %s", state.step, json.dumps(last_eval))
    accelerator.end_training()
    return last_eval


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
