"""Typed run configuration: dataclasses, YAML files derived from a base, and `key=value` overrides.

A run config file is YAML whose top-level keys are the fields of `TrainConfig` (sections `model`, `data`,
`optim`, plus run fields). `base: other.yaml` (relative to the file) is loaded first and the file's keys are
merged over it; a `smoke:` mapping holds the overrides that shrink the run to seconds (big_vision's `runlocal`),
applied with `smoke=true`. Unknown or mistyped keys and values are rejected naming the nearest valid ones
("did you mean ..."); open_clip's precision names (`amp`, `amp_bf16`, `fp32`) are accepted as aliases.
"""

from __future__ import annotations

import dataclasses
import difflib
import glob
import types
import typing
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from open_clip.transform import AugmentationCfg

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
    patch_dropout: float = setting(0.0, "FLIP: fraction of image patches dropped at random in training (none in "
                                        "evaluation); open_clip's --force-patch-dropout", minimum=0)
    lock_image_unlocked_groups: int = setting(0, "with lock_image: leave the last N layer groups of the image "
                                                 "tower trainable (open_clip's --lock-image-unlocked-groups)",
                                              minimum=0)
    lock_text_unlocked_layers: int = setting(0, "with lock_text: leave the last N layers of the text tower "
                                                "trainable (open_clip's --lock-text-unlocked-layers)", minimum=0)


@dataclass
class DataConfig:
    source: str = setting("shapes", "'shapes' (built-in generated pairs) or pair files: paths, globs, braces "
                                    "({000..099}), comma lists; streaming also s3:// https:// ... URLs, pipe:CMD, "
                                    "and several sources joined by '::'")
    source_weights: list[float] | None = setting(None, "streaming + resampled: one weight per '::' source (open_clip's "
                                                       "--train-data-upsampling-factors; per shard of that source)")
    storage_options: str | None = setting(None, "JSON of fsspec options for remote shards, e.g. "
                                                "'{\"endpoint_url\": \"http://host:9000\"}' (default: AWS_* env)")
    max_unreadable_shards: float = setting(0.01, "streaming: fraction of shards that may stay unreadable after "
                                                 "retries (skipped, logged) before the run stops", minimum=0)
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
    train_num_samples: int | None = setting(None, "streaming: samples per epoch (open_clip's --train-num-samples); "
                                                  "only counts epochs in the logs", minimum=1)
    cache_dir: str | None = setting(None, "where map-style sources are converted to Arrow files (None: the HF "
                                          "datasets cache, ~/.cache/huggingface/datasets or $HF_DATASETS_CACHE)")
    val_source: str | None = setting(None, "held-out pairs (same forms as data.source) for the validation loss and "
                                           "retrieval of mmsoftmoe_training.validate (open_clip's --val-data)")
    aug_use_timm: bool = setting(False, "open_clip aug_cfg use_timm: the train transform from timm's "
                                        "create_transform (ratio, color_jitter, re_prob, re_count)")
    aug_ratio: tuple[float, float] | None = setting(None, "open_clip aug_cfg ratio: crop aspect-ratio range (timm; "
                                                          "None: 3/4..4/3)")
    aug_color_jitter: tuple[float, float, float, float] | None = setting(
        None, "open_clip aug_cfg color_jitter: (brightness, contrast, saturation, hue); None: no jitter")
    aug_color_jitter_prob: float | None = setting(None, "open_clip aug_cfg color_jitter_prob (torchvision pipeline: "
                                                        "how often the jitter applies)", minimum=0)
    aug_gray_scale_prob: float | None = setting(None, "open_clip aug_cfg gray_scale_prob (torchvision pipeline)",
                                                minimum=0)
    aug_re_prob: float | None = setting(None, "open_clip aug_cfg re_prob: random-erasing probability (timm)",
                                        minimum=0)
    aug_re_count: int | None = setting(None, "open_clip aug_cfg re_count: random-erasing count (timm)", minimum=1)

    def aug_cfg(self) -> AugmentationCfg:
        """open_clip's `AugmentationCfg` of these settings (`crop_scale` is its `scale`)."""
        return AugmentationCfg(scale=tuple(self.crop_scale), ratio=_tuple(self.aug_ratio),
                               color_jitter=_tuple(self.aug_color_jitter), re_prob=self.aug_re_prob,
                               re_count=self.aug_re_count, use_timm=self.aug_use_timm,
                               color_jitter_prob=self.aug_color_jitter_prob, gray_scale_prob=self.aug_gray_scale_prob)


def _tuple(value: Any) -> tuple | None:
    return None if value is None else tuple(value)


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
    precision: str = setting("no", "accelerate mixed precision: no | bf16 | fp16 (open_clip's fp32 | amp_bf16 | "
                                   "amp are aliases)")
    seed: int = setting(0, "seed of initialisation, data order and augmentation")
    output_dir: str = setting("runs/default", "run folder: config, logs, metrics, checkpoints, final model")
    log_every: int = setting(10, "log metrics every N steps", minimum=1)
    checkpoint_every: int = setting(500, "save a resumable checkpoint every N steps", minimum=1)
    keep_checkpoints: int = setting(2, "how many of the newest checkpoints to keep", minimum=1)
    checkpoint_async: bool = setting(False, "sharded runs: stage checkpoints to host memory and write them in the "
                                            "background; each is published (manifest, rename) once on disk")
    resume: str = setting("auto", "auto (latest checkpoint in output_dir, if any) | none | a checkpoint folder")
    verify_checkpoints: bool = setting(True, "check resume, model.pretrained and model.upcycle_from folders against "
                                       "their manifest.json (sizes, hashes) before reading; false reads them as is")
    max_nonfinite_steps: int = setting(5, "consecutive non-finite losses (skipped steps) that stop the run; checked "
                                       "at the next logging step", minimum=1)
    trackers: list[str] = setting(factory=lambda: ["tensorboard"], help="trackers (tensorboard, wandb); [] for none")
    smoke: bool = setting(False, "apply the config file's `smoke:` overrides")
    val_every: int = setting(0, "validation on data.val_source every N steps (0: only at the end)", minimum=0)


CHOICES = {
    "loss": ("clip", "siglip"),
    "precision": ("no", "bf16", "fp16"),
    "optim.schedule": ("cosine", "rsqrt", "constant"),
    "model.pretrained_towers": ("both", "image", "text"),
    "data.format": (None, "imagefolder", "parquet", "arrow", "webdataset", "csv"),
}


# open_clip's --precision names that mean the same as one of ours (open_clip_train/precision.py: `amp` is fp16
# autocast with a GradScaler, `amp_bf16` bf16 autocast, `fp32` none; the weights stay fp32 in all three).
PRECISION_ALIASES = {"amp": "fp16", "amp_bf16": "bf16", "amp_bfloat16": "bf16", "fp32": "no"}
# open_clip names with no faithful counterpart: they cast the weights themselves (no fp32 master copy).
PRECISION_REFUSED = {
    "pure_bf16": "bf16 weights with no fp32 master copy",
    "pure_fp16": "fp16 weights with no fp32 master copy",
}


def suggest(word: str, options: list[str]) -> str:
    """` (did you mean 'a' or 'b'?)` for the options nearest to `word`, matched whole and by their last dotted
    part (so `lr` finds `optim.lr`); empty when none is near."""
    near = difflib.get_close_matches(word, options, n=3)
    leaves = {option.rsplit(".", 1)[-1]: option for option in options}
    near += [leaves[leaf] for leaf in difflib.get_close_matches(word.rsplit(".", 1)[-1], list(leaves), n=3)]
    near = list(dict.fromkeys(near))[:3]
    return f" (did you mean {' or '.join(map(repr, near))}?)" if near else ""


def canonical_precision(value: str) -> str:
    """Our precision name for `value`, open_clip's aliases mapped; open_clip's `pure_*` names are refused."""
    if value in PRECISION_REFUSED:
        raise ValueError(f"precision={value!r} (open_clip: {PRECISION_REFUSED[value]}) has no counterpart here; "
                         "use precision=bf16 (open_clip's amp_bf16: bf16 autocast over fp32 weights)")
    return PRECISION_ALIASES.get(value, value)


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
        raise ValueError(f"unknown config key {dotted!r}{suggest(dotted, valid_keys())}; `mmsoftmoe train "
                         "--help-config` lists every key")
    parent, _, name = dotted.rpartition(".")
    target = get_value(cfg, parent) if parent else cfg
    hints = typing.get_type_hints(type(target))
    value = _coerce(value, hints[name], dotted)
    setattr(target, name, canonical_precision(value) if dotted == "precision" else value)


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
            raise ValueError(f"override {item!r} is not key=value{suggest(item, valid_keys())}; `mmsoftmoe train "
                             "--help-config` lists every key")
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
            named = [str(c) for c in choices if c is not None] + (list(PRECISION_ALIASES) if key == "precision" else [])
            raise ValueError(f"{key}={value!r} is not valid{suggest(str(value), named)}; choices: "
                             f"{[c for c in choices if c is not None]}")
    for key, f in _fields():
        value, minimum = get_value(cfg, key), f.metadata.get("minimum")
        if minimum is not None and value is not None and value < minimum:
            raise ValueError(f"{key} must be >= {minimum}, got {value}")
    if cfg.batch_size % cfg.grad_accum_steps:
        raise ValueError(f"batch_size={cfg.batch_size} is not divisible by grad_accum_steps={cfg.grad_accum_steps}")
    if cfg.optim.lr <= 0:
        raise ValueError(f"optim.lr must be > 0, got {cfg.optim.lr}")
    _validate_parallel(cfg.parallel, cfg.precision)
    if cfg.checkpoint_async and not cfg.parallel.sharded:
        raise ValueError("checkpoint_async=true writes DCP shards in the background, which only sharded runs save; "
                         "set parallel.dp_shard (e.g. -1: every process) or checkpoint_async=false")
    _validate_model(cfg.model)
    _validate_data(cfg.data)
    _validate_paths(cfg)


def _validate_model(model: ModelConfig) -> None:
    if not 0 <= model.patch_dropout < 1:
        raise ValueError(f"model.patch_dropout is the fraction of patches dropped, in [0, 1); got {model.patch_dropout}"
                         " (FLIP uses 0.5 to 0.75)")
    for tower, lock, unlocked in (("image", model.lock_image, "lock_image_unlocked_groups"),
                                  ("text", model.lock_text, "lock_text_unlocked_layers")):
        if getattr(model, unlocked) and not lock:
            raise ValueError(f"model.{unlocked} leaves part of a locked {tower} tower trainable, but "
                             f"model.lock_{tower}=false; set model.lock_{tower}=true or drop model.{unlocked}")


def _validate_data(data: DataConfig) -> None:
    """Settings that only mean something together with another one."""
    if data.resampled and not data.streaming:
        raise ValueError("data.resampled=true draws WebDataset shards with replacement, which only streaming does; "
                         "set data.streaming=true (or drop data.resampled)")
    if data.train_num_samples is not None and not data.streaming:
        raise ValueError("data.train_num_samples sets the epoch size of a streaming source; a map-style source "
                         "knows its size: set data.streaming=true or drop data.train_num_samples")
    _validate_augmentation(data)


# open_clip's image_transform uses these aug_cfg items only in one of its two pipelines (and warns, unused, in the
# other); here that is an error naming the switch.
TIMM_ONLY_AUG = ("aug_ratio", "aug_re_prob", "aug_re_count")
TORCHVISION_ONLY_AUG = ("aug_color_jitter_prob", "aug_gray_scale_prob")


def _validate_augmentation(data: DataConfig) -> None:
    unused, pipeline = (TORCHVISION_ONLY_AUG, "torchvision") if data.aug_use_timm else (TIMM_ONLY_AUG, "timm")
    for name in unused:
        if getattr(data, name) is not None:
            raise ValueError(f"data.{name} is used only by {pipeline}'s pipeline; set "
                             f"data.aug_use_timm={str(not data.aug_use_timm).lower()} or drop data.{name}")
    for name in ("aug_color_jitter_prob", "aug_gray_scale_prob", "aug_re_prob"):
        if (getattr(data, name) or 0) > 1:
            raise ValueError(f"data.{name} is a probability, got {getattr(data, name)}; give a value in [0, 1]")
    if not data.aug_use_timm and data.aug_color_jitter is not None and not data.aug_color_jitter_prob:
        raise ValueError("data.aug_color_jitter without data.aug_use_timm applies with data.aug_color_jitter_prob; "
                         "set data.aug_color_jitter_prob (e.g. 0.8) or data.aug_use_timm=true")


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
        from mmsoftmoe.data.sources import local_items_exist  # here: mmsoftmoe.data loads torch and datasets

        local_items_exist(cfg.data.source)
    if cfg.data.val_source is not None and not glob.glob(cfg.data.val_source):
        raise ValueError(f"data.val_source: {cfg.data.val_source!r} does not exist (or matches no file); give a "
                         "folder, a file or a glob pattern of held-out pairs")
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
