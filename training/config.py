"""Typed run configuration: dataclasses, YAML files derived from a base, and `key=value` overrides.

A run config file is YAML whose top-level keys are the fields of `TrainConfig` (sections `model`, `data`,
`optim`, plus run fields). `base: other.yaml` (relative to the file) is loaded first and the file's keys are
merged over it; a `smoke:` mapping holds the overrides that shrink the run to seconds (big_vision's `runlocal`),
applied with `smoke=true`. Unknown or mistyped keys are rejected with the list of valid keys.
"""

from __future__ import annotations

import dataclasses
import glob
import types
import typing
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

CONFIG_DIR = Path(__file__).parent / "configs"  # the run configs shipped with the package


def setting(default: Any = dataclasses.MISSING, help: str = "", *, factory: Any = dataclasses.MISSING,
            minimum: float | None = None) -> Any:
    """A config field with its one-line meaning (shown by `mmsoftmoe train --help-config`).

    `minimum` is checked by `validate` when the config is loaded, before anything is built.
    """
    metadata = {"help": help, "minimum": minimum}
    if factory is not dataclasses.MISSING:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class ModelConfig:
    name: str = setting("SoftMoE-Micro-4-32", "an open_clip model config name (mmsoftmoe ships its own)")
    text_model: str | None = setting(None, "local Hugging Face encoder folder replacing the text transformer")
    lock_image: bool = setting(False, "LiT: freeze the image trunk (open_clip keeps the projection head trainable)")
    lock_text: bool = setting(False, "freeze the text tower")
    grad_checkpointing: bool = setting(False, "recompute activations in backward (less memory, more compute)")
    compile: bool = setting(False, "torch.compile the model")
    pretrained: str | None = setting(None, "warm start from a CLIP checkpoint folder or weights file (not a resume)")
    pretrained_towers: str = setting("both", "which towers the warm start loads: both | image | text")
    upcycle_from: str | None = setting(None, "dense ViT/CLIP weights whose MLPs seed every expert (sparse upcycling)")


@dataclass
class DataConfig:
    source: str = setting("shapes", "'shapes' (built-in generated pairs) or a path / glob / comma list of pair files")
    format: str | None = setting(None, "imagefolder | parquet | arrow | webdataset | csv (inferred when None)")
    image_column: str | None = setting(None, "image column (';' separates alternatives); None: inferred (csv: "
                                             "filepath, paths relative to the csv file)")
    caption_column: str | None = setting(None, "caption column; None: inferred (caption, text, txt; csv: title)")
    csv_separator: str | None = setting(None, "csv column separator; None: a tab for .tsv files, else a comma")
    streaming: bool = setting(False, "stream WebDataset .tar shards (endless, shuffled, exactly resumable) instead "
                                     "of preparing an Arrow cache")
    resampled: bool = setting(False, "streaming: draw shards with replacement (a run is steps, not epochs)")
    shuffle_buffer: int = setting(1000, "streaming: samples per shuffled window of each reader (0: shard order)",
                                  minimum=0)
    max_image_pixels: int = setting(40_000_000, "larger images are decoded reduced (JPEG) or skipped and counted",
                                    minimum=1)
    allow_repeats_in_batch: bool = setting(False, "accept batch_size > dataset size (batches then hold pairs "
                                                  "twice, which the contrastive loss counts as negatives)")
    num_samples: int = setting(100_000, "size of the built-in dataset", minimum=1)
    image_seed: int = setting(0, "seed of the built-in dataset")
    num_workers: int = setting(2, "DataLoader worker processes per training process", minimum=0)
    crop_scale: tuple[float, float] = setting((0.9, 1.0), "RandomResizedCrop scale; (0.08, 1.0) is Inception crop")
    hflip: bool = setting(False, "random horizontal flips (off: flips contradict captions saying left/right)")


@dataclass
class OptimConfig:
    lr: float = setting(5e-4, "peak learning rate (AdamW)", minimum=0)
    weight_decay: float = setting(0.2, "AdamW weight decay (none on gains, biases, scales, phi)", minimum=0)
    betas: tuple[float, float] = setting((0.9, 0.98), "AdamW betas")
    eps: float = setting(1e-6, "AdamW epsilon", minimum=0)
    schedule: str = setting("cosine", "cosine | rsqrt | constant")
    warmup_steps: int = setting(100, "linear warmup steps", minimum=0)
    cooldown_steps: int = setting(0, "rsqrt: linear cooldown to 0 over the last steps (the paper: 50k)", minimum=0)
    min_lr_ratio: float = setting(0.0, "cosine: final lr as a fraction of lr", minimum=0)
    grad_clip: float | None = setting(1.0, "clip the global gradient norm to this; none: no clipping", minimum=0)


@dataclass
class EvalConfig:
    every: int = setting(0, "zero-shot evaluation every N steps (0: only at the end)", minimum=0)
    dataset: str | None = setting("shapes", "classification dataset (shapes, digits, folder:ROOT); none: no evaluation")
    fewshot: bool = setting(True, "also the 10-shot ridge probe (on frozen pre-logits) at the end")


@dataclass
class ParallelConfig:
    dp_replicate: int = setting(1, "HSDP: model replicas (e.g. nodes), each sharded over dp_shard processes",
                                minimum=1)
    dp_shard: int = setting(0, "FSDP2: processes a replica is sharded over (dp_replicate * dp_shard = processes); "
                               "-1: all processes / dp_replicate; 0: DDP, no sharding (the default)", minimum=-1)
    ep: int = setting(1, "expert parallelism: processes each MoE layer's experts are split over (divides dp_shard "
                         "and the number of experts)", minimum=1)
    nccl_timeout_s: int = setting(600, "timeout of collective operations (init_process_group), seconds", minimum=1)

    @property
    def sharded(self) -> bool:
        """FSDP2 (+ expert parallelism) through `mmsoftmoe.parallel` instead of accelerate's DDP."""
        return self.dp_shard != 0

    def shard_size(self, world_size: int) -> int:
        """dp_shard for `world_size` processes (-1 resolved: every process of a replica)."""
        if self.dp_shard != -1:
            return self.dp_shard
        if world_size % self.dp_replicate:
            raise ValueError(f"parallel.dp_shard=-1 takes the processes / parallel.dp_replicate, but {world_size} "
                             f"processes do not split into {self.dp_replicate} replicas; launch a multiple of "
                             f"{self.dp_replicate} processes or set parallel.dp_replicate")
        return world_size // self.dp_replicate


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    loss: str = setting("clip", "clip (softmax, open_clip ClipLoss) | siglip (sigmoid, open_clip SigLipLoss)")
    local_loss: bool = setting(True, "open_clip: each process scores its own rows against the gathered batch")
    gather_with_grad: bool = setting(True, "open_clip: gather features with their gradient (exact distributed loss)")
    aux_loss_weight: float = setting(1.0, "multiplies the routers' auxiliary losses (each already weighted)",
                                     minimum=0)
    steps: int = setting(1000, "optimizer steps of the run", minimum=1)
    batch_size: int = setting(64, "global batch per optimizer step (all processes, all accumulation steps)", minimum=1)
    grad_accum_steps: int = setting(1, "micro-batches per optimizer step (exact full-batch gradient)",
                                   minimum=1)
    precision: str = setting("no", "accelerate mixed precision: no | bf16 | fp16")
    seed: int = setting(0, "seed of initialisation, data order and augmentation")
    output_dir: str = setting("runs/default", "run folder: config, logs, metrics, checkpoints, final model")
    log_every: int = setting(10, "log metrics every N steps", minimum=1)
    checkpoint_every: int = setting(500, "save a resumable checkpoint every N steps", minimum=1)
    keep_checkpoints: int = setting(2, "how many of the newest checkpoints to keep", minimum=1)
    resume: str = setting("auto", "auto (latest checkpoint in output_dir, if any) | none | a checkpoint folder")
    verify_checkpoints: bool = setting(True, "check resume, model.pretrained and model.upcycle_from folders against "
                                       "their manifest.json (sizes, hashes) before reading; false reads them as is")
    max_nonfinite_steps: int = setting(5, "consecutive non-finite losses (skipped steps) that stop the run; checked "
                                       "at the next logging step", minimum=1)
    trackers: list[str] = setting(factory=lambda: ["tensorboard"], help="trackers (tensorboard, wandb); [] for none")
    smoke: bool = setting(False, "apply the config file's `smoke:` overrides")


CHOICES = {
    "loss": ("clip", "siglip"),
    "precision": ("no", "bf16", "fp16"),
    "optim.schedule": ("cosine", "rsqrt", "constant"),
    "model.pretrained_towers": ("both", "image", "text"),
    "data.format": (None, "imagefolder", "parquet", "arrow", "webdataset", "csv"),
}


def valid_keys() -> list[str]:
    """Every settable key, dotted (`optim.lr`)."""
    return [key for key, _ in _fields()]


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """Convert a YAML or command-line value to the field's annotated type, or raise naming the key."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            if type(None) in args:
                return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], key)
    if origin in (tuple, list):
        items = yaml.safe_load(value) if isinstance(value, str) else value
        if isinstance(items, str):
            items = items.split(",")
        if not isinstance(items, list | tuple):
            raise ValueError(f"{key}: expected a list, got {value!r}")
        if origin is tuple:
            if len(items) != len(args):
                raise ValueError(f"{key}: expected {len(args)} values, got {value!r}")
            return tuple(_coerce(v, a, key) for v, a in zip(items, args, strict=True))
        return [_coerce(v, args[0], key) for v in items]
    if hint is bool:
        if isinstance(value, bool):
            return value
        if str(value).lower() in ("true", "1", "yes"):
            return True
        if str(value).lower() in ("false", "0", "no"):
            return False
        raise ValueError(f"{key}: expected true/false, got {value!r}")
    if hint in (int, float, str):
        try:
            if hint is int and isinstance(value, float) and not value.is_integer():
                raise ValueError
            return hint(float(value)) if hint is int and isinstance(value, str) and "e" in value else hint(value)
        except (TypeError, ValueError):
            raise ValueError(f"{key}: expected {hint.__name__}, got {value!r}") from None
    return value


def get_value(cfg: TrainConfig, dotted: str) -> Any:
    """The value of a dotted key (`optim.lr`)."""
    value = cfg
    for part in dotted.split("."):
        value = getattr(value, part)
    return value


def _set(cfg: Any, dotted: str, value: Any) -> None:
    if dotted not in valid_keys():
        raise ValueError(f"unknown config key {dotted!r}; valid keys: {', '.join(valid_keys())}")
    parent, _, name = dotted.rpartition(".")
    target = get_value(cfg, parent) if parent else cfg
    hints = typing.get_type_hints(type(target))
    setattr(target, name, _coerce(value, hints[name], dotted))


def _flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _read_yaml(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(settings, smoke overrides) of a config file, both flat and merged over its `base` chain."""
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    tree = yaml.safe_load(path.read_text()) or {}
    if not isinstance(tree, dict):
        raise ValueError(f"config file {path} must hold a mapping, got {type(tree).__name__}")
    base = tree.pop("base", None)
    smoke = tree.pop("smoke", None)
    if isinstance(smoke, bool):  # the `smoke` setting itself (a resolved config.yaml), not a smoke section
        tree["smoke"], smoke = smoke, None
    smoke = _flatten(smoke or {})
    settings = _flatten(tree)
    if base is None:
        return settings, smoke
    base_settings, base_smoke = _read_yaml((path.parent / base).resolve())
    return {**base_settings, **settings}, {**base_smoke, **smoke}


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> TrainConfig:
    """Build a validated `TrainConfig` from an optional YAML file and `key=value` overrides.

    Precedence, lowest first: dataclass defaults, the base chain, the file, its `smoke:` section (only with
    `smoke=true`), the command-line overrides.
    """
    settings, smoke = _read_yaml(resolve_config_path(path)) if path else ({}, {})
    explicit = {}
    for item in overrides or []:
        if "=" not in item:
            raise ValueError(f"override {item!r} is not key=value; valid keys: {', '.join(valid_keys())}")
        key, value = item.split("=", 1)
        explicit[key.strip()] = value
    cfg = TrainConfig()
    for key, value in {**settings, **explicit}.items():
        _set(cfg, key, value)
    if cfg.smoke:
        for key, value in {**smoke, **explicit}.items():
            _set(cfg, key, value)
    validate(cfg)
    return cfg


def _fields(cls: type = TrainConfig, prefix: str = "") -> Iterator[tuple[str, dataclasses.Field]]:
    """(dotted key, field) of every setting, sections expanded."""
    for f in dataclasses.fields(cls):
        factory = f.default_factory if f.default_factory is not dataclasses.MISSING else None
        if dataclasses.is_dataclass(factory):
            yield from _fields(factory, f"{prefix}{f.name}.")
        else:
            yield prefix + f.name, f


def validate(cfg: TrainConfig) -> None:
    """Check choices, bounds, paths and arithmetic between fields, before anything is built.

    Raises:
        ValueError: naming the field, its value and the fix.
    """
    for key, choices in CHOICES.items():
        value = get_value(cfg, key)
        if value not in choices:
            raise ValueError(f"{key}={value!r} is not valid; choices: {[c for c in choices if c is not None]}")
    for key, f in _fields():
        value, minimum = get_value(cfg, key), f.metadata.get("minimum")
        if minimum is not None and value is not None and value < minimum:
            raise ValueError(f"{key} must be >= {minimum}, got {value}")
    if cfg.batch_size % cfg.grad_accum_steps:
        raise ValueError(f"batch_size={cfg.batch_size} is not divisible by grad_accum_steps={cfg.grad_accum_steps}")
    if cfg.optim.lr <= 0:
        raise ValueError(f"optim.lr must be > 0, got {cfg.optim.lr}")
    _validate_parallel(cfg.parallel, cfg.precision)
    _validate_paths(cfg)


def _validate_parallel(par: ParallelConfig, precision: str) -> None:
    """The layout checks that need no process count (`mmsoftmoe.parallel.check_layout` does the rest at start)."""
    if par.sharded and precision == "fp16":
        raise ValueError("precision=fp16 needs a gradient scaler, which sharded runs (parallel.dp_shard != 0) do not "
                         "have; use precision=bf16")
    if not par.sharded and (par.ep > 1 or par.dp_replicate > 1):
        raise ValueError(f"parallel.ep={par.ep} / parallel.dp_replicate={par.dp_replicate} need parallel.dp_shard "
                         "> 0 (FSDP2); set parallel.dp_shard to the number of processes / parallel.dp_replicate, or "
                         "to -1 (all of them)")
    if par.dp_shard > 0 and par.dp_shard % par.ep:
        raise ValueError(f"parallel.ep={par.ep} must divide parallel.dp_shard={par.dp_shard} (expert-parallel "
                         "ranks are borrowed from the sharded data-parallel ranks); choose ep among "
                         f"{[d for d in range(1, par.dp_shard + 1) if par.dp_shard % d == 0]}")


def _validate_paths(cfg: TrainConfig) -> None:
    output = Path(cfg.output_dir)
    if output.exists() and not output.is_dir():
        raise ValueError(f"output_dir={cfg.output_dir!r} is a file, not a folder; choose another output_dir")
    if cfg.data.source != "shapes":
        for item in (s for s in cfg.data.source.split(",") if s):
            if not glob.glob(item):
                raise ValueError(f"data.source: {item!r} does not exist (or matches no file); give a folder, a file, "
                                 "a glob pattern or 'shapes' (the built-in data)")
    if cfg.model.text_model is not None and not Path(cfg.model.text_model).is_dir():
        raise ValueError(f"model.text_model={cfg.model.text_model!r} is not a folder; give a local Hugging Face "
                         "model folder (config.json, weights, tokenizer files)")
    for key in ("model.pretrained", "model.upcycle_from"):
        if get_value(cfg, key) is not None and not Path(get_value(cfg, key)).exists():
            raise ValueError(f"{key}={get_value(cfg, key)!r} does not exist; give a checkpoint folder or weights file")
    if cfg.resume not in ("auto", "none") and not Path(cfg.resume).is_dir():
        raise ValueError(f"resume={cfg.resume!r} is not a folder; use 'auto', 'none' or a checkpoint folder")


def config_help() -> str:
    """Every key with its type, default and meaning: what `mmsoftmoe train --help-config` prints."""
    rows = []
    for key, f in _fields():
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        hint = str(f.type).replace("typing.", "")
        choices = CHOICES.get(key)
        meaning = f.metadata.get("help", "") + (f" (choices: {', '.join(map(str, choices))})" if choices else "")
        rows.append((key, hint, repr(default), meaning))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    return "\n".join(f"{k:<{widths[0]}}  {t:<{widths[1]}}  {d:<{widths[2]}}  {m}" for k, t, d, m in rows)


def config_yaml(cfg: TrainConfig) -> str:
    """The resolved config as YAML that `load_config` reads back to an equal config."""
    def plain(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return list(value) if isinstance(value, tuple) else value
    return yaml.safe_dump(plain(to_dict(cfg)), sort_keys=False)  # no `smoke:` section: smoke=true is a no-op


def resolve_config_path(name_or_path: str | Path) -> Path:
    """A config file path, or the name of a run config shipped with mmsoftmoe (`demo`, `smoke`, ...)."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    shipped = CONFIG_DIR / f"{path.name.removesuffix('.yaml')}.yaml"
    if path.parent == Path(".") and shipped.is_file():
        return shipped
    names = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
    raise FileNotFoundError(f"config {str(name_or_path)!r} is neither a file nor a shipped config; shipped: {names}")


def to_dict(cfg: TrainConfig) -> dict:
    return dataclasses.asdict(cfg)
