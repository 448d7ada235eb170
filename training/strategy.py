"""How a run is spread over processes: one object, chosen at start-up, that owns building the model, preparing it,
clipping gradients, gathering a whole copy, evaluating, and what a checkpoint holds. The training loop
(`mmsoftmoe_training.main.Trainer`) never asks which one it has.

- `Replicated` (the default, `parallel.dp_shard=0`): accelerate's DDP. Every process holds the whole model;
  accelerate places it, wraps it and all-reduces gradients.
- `Sharded` (`parallel.dp_shard` set): `mmsoftmoe.parallel`. Built on the meta device, the experts split over
  `parallel.ep` processes and everything FSDP2-sharded (bf16 all-gathers under `precision=bf16`), then each process
  draws only its own shards (`init_sharded_`: every parameter and expert from a generator seeded by its name, so
  the values an unsharded run starts from, and no whole copy anywhere); weights read from a whole file (warm start,
  upcycling, a Hugging Face text tower) are filled from the model rank 0 builds as an unsharded run would.
  Gradients are clipped by the global norm over both parameter kinds; checkpoints are DCP shards plus each
  process's random state (resumable at another process count or layout). Evaluation runs the sharded model on
  every process, each on its share of the evaluation data (only features and labels are gathered), so no process
  ever holds the whole model for it; `final/` is a whole copy gathered into rank 0's host memory (what export
  reads).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import open_clip
import torch
import torch.distributed as dist
from accelerate import Accelerator
from torch import nn

from mmsoftmoe.models.clip import build_clip_from_config, preprocess_config
from mmsoftmoe.parallel import (
    build_meshes,
    check_layout,
    clip_grad_norm_,
    expert_layers,
    full_model_state_dict,
    init_sharded_,
    materialize_from_rank0,
    parallelize,
    unsharded_root,
)
from mmsoftmoe_training.checkpointing import restore_training_state
from mmsoftmoe_training.config import TrainConfig
from mmsoftmoe_training.model import build_model
from mmsoftmoe_training.optim import build_optimizer

logger = logging.getLogger("mmsoftmoe.train")

# evaluate(model, accelerator) -> results: every process runs it on its share of the evaluation batches.
EvaluateFn = Callable[[nn.Module, Accelerator], dict]


class Strategy:
    """A built, placed model and its optimizer, and the operations whose form depends on the distribution.

    Attributes:
        module: the model itself (unwrapped; what routing statistics and checkpoints are read from).
        model: what the training step calls (accelerate-wrapped and/or compiled).
        optimizer: steps the parameters this process holds.
        tokenizer: the text tower's tokenizer.
        model_cfg: the complete open_clip model config (written into every checkpoint).
        clip_grad_norm: `clip(parameters, max_norm)` for `optimizer_step`; None: accelerate's.
    """

    clip_grad_norm: Callable[[Iterable[torch.Tensor], float], torch.Tensor] | None = None

    def __init__(self, cfg: TrainConfig, accelerator: Accelerator) -> None:
        self.accelerator = accelerator
        self.module, self.tokenizer, self.model_cfg = self.build(cfg)
        optimizer = build_optimizer(self.module, lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay,
                                    betas=tuple(cfg.optim.betas), eps=cfg.optim.eps)
        self.model, self.optimizer = self.prepare(self.module, optimizer)
        if cfg.model.compile:
            self.model = torch.compile(self.model)

    def build(self, cfg: TrainConfig) -> tuple[nn.Module, Any, dict]:
        raise NotImplementedError

    def prepare(self, model: nn.Module, optimizer: torch.optim.Optimizer):
        raise NotImplementedError

    def checkpoint_args(self) -> dict:
        """The `model` (and `sharded_optimizer`) arguments of `save_checkpoint` for this distribution."""
        raise NotImplementedError

    def restore(self, path: Path, model_name: str) -> dict:
        """Load the checkpoint `path` into the model, optimizer and random state; returns its trainer state."""
        return restore_training_state(self.accelerator, path, model_name, model=self.module,
                                      sharded_optimizer=self.checkpoint_args().get("sharded_optimizer"))

    def final_model(self) -> nn.Module | None:
        """The whole model to save as `final/` on the main process (None elsewhere). Call on every process."""
        raise NotImplementedError

    def evaluate(self, fn: EvaluateFn) -> dict:
        """`fn`'s results, computed by every process on its share of the evaluation batches (features and labels
        gathered), so equal on every process."""
        return fn(self.module, self.accelerator)


class Replicated(Strategy):
    def build(self, cfg: TrainConfig) -> tuple[nn.Module, Any, dict]:
        return build_model(cfg)

    def prepare(self, model: nn.Module, optimizer: torch.optim.Optimizer):
        return self.accelerator.prepare(model, optimizer)

    def checkpoint_args(self) -> dict:
        return {"model": self.model}  # accelerate's save_state takes the prepared model

    def final_model(self) -> nn.Module | None:
        return self.module


class Sharded(Strategy):
    clip_grad_norm = staticmethod(clip_grad_norm_)  # the global norm over parameters on different meshes

    def build(self, cfg: TrainConfig) -> tuple[nn.Module, Any, dict]:
        accelerator, par = self.accelerator, cfg.parallel
        world = accelerator.num_processes
        dp_shard = par.shard_size(world)
        model, tokenizer, model_cfg = build_model(cfg, device="meta")
        check_layout(world_size=world, dp_replicate=par.dp_replicate, dp_shard=dp_shard, ep=par.ep,
                     num_experts=tuple(layer.num_experts for layer in expert_layers(model).values()))
        meshes = build_meshes(device_type=accelerator.device.type, dp_replicate=par.dp_replicate,
                              dp_shard=dp_shard, ep=par.ep)
        parallelize(model, meshes, param_dtype=torch.bfloat16 if cfg.precision == "bf16" else None)
        if cfg.model.pretrained or cfg.model.upcycle_from or cfg.model.text_model:  # weights read from a whole file
            materialize_from_rank0(model, build_model(cfg)[0] if accelerator.is_main_process else None,
                                   accelerator.device)
        else:  # each process draws only what it holds: the values of the unsharded build
            init_sharded_(model, seed=cfg.seed, device=accelerator.device)
        logger.info("sharded: dp_replicate=%d x dp_shard=%d processes; experts split over ep=%d, each split "
                    "FSDP2-sharded over dp_shard / ep = %d", par.dp_replicate, dp_shard, par.ep, dp_shard // par.ep)
        return model, tokenizer, model_cfg

    def prepare(self, model: nn.Module, optimizer: torch.optim.Optimizer):
        return model, optimizer  # already placed and distributed; its optimizer steps its shards

    def checkpoint_args(self) -> dict:
        return {"model": self.module, "sharded_optimizer": self.optimizer}

    def evaluate(self, fn: EvaluateFn) -> dict:
        with unsharded_root(self.module):  # evaluation runs the towers outside `forward`
            return fn(self.module, self.accelerator)

    def final_model(self) -> nn.Module | None:
        """A whole, unsharded copy in rank 0's host memory (None on the other ranks): what `final/` holds."""
        state = full_model_state_dict(self.module)
        if not self.accelerator.is_main_process:
            return None
        plain, _ = build_clip_from_config(self.model_cfg)
        plain.load_state_dict(state)
        open_clip.set_model_preprocess_cfg(plain, preprocess_config(self.module))
        return plain.eval()


def build_strategy(cfg: TrainConfig, accelerator: Accelerator) -> Strategy:
    """The distribution `parallel.*` asks for, with its model built and placed."""
    return (Sharded if cfg.parallel.sharded else Replicated)(cfg, accelerator)


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
