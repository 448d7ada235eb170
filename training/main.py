"""`mmsoftmoe train --config configs/<name>.yaml [key=value ...]`: contrastive pretraining with accelerate.

The same command runs on one CPU, one GPU, or under `accelerate launch` on many processes, GPUs or nodes.
`fit(cfg)` composes the `build_*` helpers and runs the loop; see `training.loop` for the step itself.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import open_clip
import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from tqdm.auto import tqdm

from eval.main import run_evaluation
from mmsoftmoe.data import transforms_from_preprocess_cfg
from mmsoftmoe.layers import collect_routing_stats, set_record_stats
from mmsoftmoe.models.clip import build_clip_from_config, preprocess_config, resolve_clip_config, save_clip
from training.checkpoint import find_resume_checkpoint, load_checkpoint, save_checkpoint
from training.config import TrainConfig, get_value, load_config, to_dict, valid_keys
from training.data import build_pair_dataset, build_train_loader
from training.logger import MetricsLogger, plot_training
from training.loop import TrainState, all_finite, build_loss, train_step
from training.optim import build_optimizer, lr_multiplier, set_lr

logger = logging.getLogger("mmsoftmoe.train")


def build_accelerator(cfg: TrainConfig) -> Accelerator:
    trackers = [t for t in cfg.trackers if t]
    accelerator = Accelerator(mixed_precision=cfg.precision, log_with=trackers or None, project_dir=cfg.output_dir)
    if trackers:
        accelerator.init_trackers("mmsoftmoe", config=_flat_config(cfg))
    return accelerator


def _flat_config(cfg: TrainConfig) -> dict:
    flat = {key: get_value(cfg, key) for key in valid_keys()}
    return {k: v if isinstance(v, int | float | str | bool) else str(v) for k, v in flat.items()}


def build_model(cfg: TrainConfig):
    """(model, tokenizer, complete open_clip model config), towers locked and checkpointing set as configured."""
    model_cfg = resolve_clip_config(cfg.model.name, cfg.model.text_model)
    if cfg.loss == "siglip" and model_cfg.get("init_logit_bias") is None:
        raise ValueError(f"loss=siglip needs a model with a logit bias, and {cfg.model.name} has none; use a "
                         "*-Sigmoid model config (init_logit_bias=-10, init_logit_scale=log 10) or loss=clip")
    model, tokenizer = build_clip_from_config(model_cfg)
    open_clip.set_model_preprocess_cfg(model, preprocess_config(model))
    if cfg.model.lock_image:
        model.lock_image_tower()
    if cfg.model.lock_text:
        model.lock_text_tower()
    model.set_grad_checkpointing(cfg.model.grad_checkpointing)
    return model, tokenizer, model_cfg


def _to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def _step_metrics(accelerator: Accelerator, losses: dict, model, optimizer, grad_norm,
                  throughput: float) -> dict[str, float]:
    # Mean over processes: with local_loss each process holds the loss of its own rows only.
    metrics = {k: float(accelerator.reduce(v.reshape(1), reduction="mean")) for k, v in losses.items()}
    metrics["loss"] = sum(metrics.values())
    metrics["lr"] = optimizer.param_groups[0]["lr"]
    metrics["logit_scale"] = float(model.logit_scale.detach().exp())
    if getattr(model, "logit_bias", None) is not None:
        metrics["logit_bias"] = float(model.logit_bias.detach())
    if grad_norm is not None:
        metrics["grad_norm"] = float(grad_norm)
    metrics["samples_per_s"] = throughput
    metrics.update(collect_routing_stats(model.visual))
    return metrics


def flat_metrics(results: dict, prefix: str = "") -> dict[str, float]:
    """`{"zeroshot": {"acc1": x}, "fewshot": {"10shot": {"acc1": y}}}` -> `{"zeroshot/acc1": x, ...}` (scalars only)."""
    out = {}
    for key, value in results.items():
        if isinstance(value, dict):
            out.update(flat_metrics(value, f"{prefix}{key}/"))
        elif isinstance(value, int | float):
            out[f"{prefix}{key}"] = float(value)
    return out


def fit(cfg: TrainConfig) -> dict:
    """Train as configured; returns the final metrics (also in `output_dir/final/trainer_state.json`)."""
    Path(cfg.output_dir).mkdir(parents=True, exist_ok=True)
    accelerator = build_accelerator(cfg)
    set_seed(cfg.seed)
    model, tokenizer, model_cfg = build_model(cfg)
    unwrapped = model
    optimizer = build_optimizer(model, lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay,
                                betas=tuple(cfg.optim.betas), eps=cfg.optim.eps)
    model, optimizer = accelerator.prepare(model, optimizer)
    if cfg.model.compile:
        model = torch.compile(model)

    state, metrics_log = TrainState(), MetricsLogger(accelerator, cfg.output_dir)
    resume_from = find_resume_checkpoint(cfg.resume, cfg.output_dir)
    last_eval: dict[str, float] = {}
    if resume_from is not None:
        saved = load_checkpoint(accelerator, resume_from, cfg.model.name)
        state, last_eval = TrainState(**saved["state"]), saved.get("metrics", {})
        metrics_log.truncate_after(state.step)
        logger.info("resumed from %s at step %d", resume_from, state.step)

    preprocess = preprocess_config(unwrapped)
    _, eval_tf = transforms_from_preprocess_cfg(preprocess)
    dataset = build_pair_dataset(cfg.data, preprocess, tokenizer, accelerator.process_index,
                                 accelerator.num_processes)
    micro_batch = cfg.batch_size // (accelerator.num_processes * cfg.grad_accum_steps)
    loader = build_train_loader(dataset, global_batch=cfg.batch_size, grad_accum_steps=cfg.grad_accum_steps,
                                rank=accelerator.process_index, world_size=accelerator.num_processes,
                                seed=cfg.seed, start_step=state.step, total_steps=cfg.steps,
                                num_workers=cfg.data.num_workers, pin_memory=accelerator.device.type == "cuda")
    loss_fn = build_loss(cfg.loss, local_loss=cfg.local_loss, gather_with_grad=cfg.gather_with_grad,
                         rank=accelerator.process_index, world_size=accelerator.num_processes)

    def run_eval(final: bool) -> dict[str, float]:
        if cfg.eval.dataset is None:
            return {}
        tasks = ("zeroshot", "fewshot") if final and cfg.eval.fewshot else ("zeroshot",)
        results = run_evaluation(unwrapped, tokenizer, dataset=cfg.eval.dataset, tasks=tasks, preprocess=eval_tf,
                                 batch_size=micro_batch, accelerator=accelerator, shots=(10,))[cfg.eval.dataset]
        return flat_metrics({k: v for k, v in results.items() if k in tasks})

    def trainer_state() -> dict:
        """What `trainer_state.json` records, in every checkpoint and in `final/`."""
        return {"state": state.to_dict(), "step": state.step, "samples_seen": state.samples_seen,
                "config": to_dict(cfg), "metrics": last_eval, "data_skipped": getattr(dataset, "num_skipped", 0)}

    def checkpoint() -> None:
        save_checkpoint(accelerator, model, cfg.output_dir, step=state.step, trainer_state=trainer_state(),
                        model_cfg=model_cfg, keep=cfg.keep_checkpoints)

    progress = tqdm(total=cfg.steps, initial=state.step, desc="train", disable=not accelerator.is_local_main_process,
                    dynamic_ncols=True)
    interval_start, interval_samples = time.perf_counter(), 0
    while state.step < cfg.steps:
        micro = [_to_device(next(loader), accelerator.device) for _ in range(cfg.grad_accum_steps)]
        set_lr(optimizer, cfg.optim.lr * lr_multiplier(
            state.step, schedule=cfg.optim.schedule, total_steps=cfg.steps, warmup_steps=cfg.optim.warmup_steps,
            cooldown_steps=cfg.optim.cooldown_steps, min_lr_ratio=cfg.optim.min_lr_ratio))
        logging_step = (state.step + 1) % cfg.log_every == 0 or state.step + 1 == cfg.steps
        set_record_stats(unwrapped, logging_step)  # routing statistics cost time: only on logged steps
        losses = train_step(model, micro, loss_fn, accelerator, unwrapped.visual, cfg.aux_loss_weight)
        grad_norm = None
        if all_finite(accelerator, sum(losses.values())):
            if cfg.optim.grad_clip:
                grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
            optimizer.step()
            state.nonfinite_in_a_row = 0
        else:
            state.nonfinite_steps += 1
            state.nonfinite_in_a_row += 1
            logger.warning("step %d: non-finite loss %s, step skipped", state.step, {k: float(v) for k, v in
                                                                                      losses.items()})
            if state.nonfinite_in_a_row >= cfg.max_nonfinite_steps:
                raise RuntimeError(
                    f"{state.nonfinite_in_a_row} consecutive non-finite losses at step {state.step}; stopping. "
                    "Lower optim.lr, use precision=bf16 instead of fp16, or resume from the last checkpoint "
                    f"in {cfg.output_dir}/checkpoints with a smaller learning rate")
        optimizer.zero_grad(set_to_none=True)
        state.step += 1
        state.samples_seen += cfg.batch_size
        interval_samples += cfg.batch_size
        progress.update(1)

        record = {}
        if logging_step:
            elapsed = time.perf_counter() - interval_start
            record = _step_metrics(accelerator, losses, unwrapped, optimizer, grad_norm, interval_samples / elapsed)
            record["nonfinite_steps"] = state.nonfinite_steps
            progress.set_postfix(loss=f"{record['loss']:.4f}", samples_s=f"{record['samples_per_s']:.1f}")
            interval_start, interval_samples = time.perf_counter(), 0
        if cfg.eval.every and state.step % cfg.eval.every == 0 and state.step < cfg.steps:
            last_eval = run_eval(final=False)
            record.update(last_eval)
        if record:
            metrics_log.log(state.step, record)
        if state.step % cfg.checkpoint_every == 0 and state.step < cfg.steps:
            checkpoint()
    progress.close()

    last_eval = run_eval(final=True)
    metrics_log.log(state.step, dict(last_eval))
    checkpoint()
    if accelerator.is_main_process:
        final_dir = save_clip(unwrapped, model_cfg, Path(cfg.output_dir) / "final")
        (final_dir / "trainer_state.json").write_text(json.dumps(trainer_state(), indent=2))
        plot_training(metrics_log.read(), Path(cfg.output_dir) / "training.png")
    accelerator.end_training()
    return last_eval


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(prog="mmsoftmoe train", description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="YAML run config (configs/*.yaml)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. optim.lr=1e-3 steps=100 smoke=true")
    return parser.parse_args(argv), []


def main(argv: list[str] | None = None) -> int:
    args, _ = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = load_config(args.config, args.overrides)
    metrics = fit(cfg)
    print(json.dumps({"output_dir": cfg.output_dir, **metrics}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
