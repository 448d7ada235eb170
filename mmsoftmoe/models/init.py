"""Sharding-invariant initialisation: each parameter (and each expert) draws from a generator of its own.

A parameter's initial values are a function of (seed, its qualified name[, expert index]) alone, so a process
holding a slice of a parameter (an FSDP2 shard, its experts) draws exactly the values a one-process build holds
there, and never more than one parameter (one expert's slice, for stacked experts) at a time (README "Scaling
out"). torchtitan builds on the meta device and calls `init_weights()` on each rank's shards; without one
generator per parameter the values would then depend on the layout.

The distributions are the ones each part of the model uses when constructed, as `InitRule`s
(`mmsoftmoe.layers.init`): the MoE layers' own (`init_rules()`: vmoe's), timm's ViT init (`weight_init=""`), the
open_clip text tower's `init_parameters`, torch's `reset_parameters` for the other leaf modules, and the
`init_logit_scale` / `init_logit_bias` constants of the CLIP config. Random numbers are drawn on the CPU and copied,
so a GPU run starts from the same values as a CPU run.
"""

from __future__ import annotations

import hashlib

import open_clip
import open_clip.transformer
import timm.models.vision_transformer
import torch
from torch import nn
from torch.distributed.tensor import DTensor
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

from mmsoftmoe.layers.base import ExpertLayerBase
from mmsoftmoe.layers.init import (
    InitRule,
    constant,
    normal,
    torch_default_bias,
    torch_default_weight,
    trunc_normal,
    xavier_uniform,
)

# Set by `build_clip_from_config` on the models it builds: the constants a meta-device build cannot hold.
INIT_CONSTANTS_ATTR = "init_constants"


def parameter_generator(seed: int, name: str, expert: int | None = None) -> torch.Generator:
    """A CPU generator seeded from (seed, name[, expert]) by a stable hash (Python's `hash` varies per process)."""
    key = f"{seed}/{name}" if expert is None else f"{seed}/{name}/{expert}"
    digest = hashlib.blake2b(key.encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") & (2**63 - 1))


def _prefixed(prefix: str, rules: dict[str, InitRule]) -> dict[str, InitRule]:
    return {f"{prefix}.{name}" if prefix else name: rule for name, rule in rules.items()}


def _default_rules(module: nn.Module) -> dict[str, InitRule]:
    """torch's constructor initialisation of the modules the towers use."""
    if isinstance(module, nn.Linear | nn.Conv2d):
        rules = {"weight": InitRule(torch_default_weight())}
        if module.bias is not None:
            rules["bias"] = InitRule(torch_default_bias(module.weight[0].numel()))
        return rules
    if isinstance(module, nn.LayerNorm) and module.elementwise_affine:
        rules = {"weight": InitRule(constant(1.0))}
        return rules | ({"bias": InitRule(constant(0.0))} if module.bias is not None else {})
    if isinstance(module, nn.Embedding):
        return {"weight": InitRule(normal(1.0))}
    if isinstance(module, nn.MultiheadAttention) and module.in_proj_weight is not None:
        rules = {"in_proj_weight": InitRule(xavier_uniform())}
        if module.in_proj_bias is not None:
            rules |= {"in_proj_bias": InitRule(constant(0.0)), "out_proj.bias": InitRule(constant(0.0))}
        return rules
    return {}


def _vit_rules(vit: timm.models.vision_transformer.VisionTransformer) -> dict[str, InitRule]:
    """timm `VisionTransformer.init_weights("")`: every `nn.Linear` it holds when constructed (not the MLPs that
    `MoEVisionTransformer` swaps in afterwards) truncated normal 0.02 with zero bias, `pos_embed` likewise, the
    class / register tokens N(0, 1e-6)."""
    if vit.weight_init_mode or vit.fix_init:
        raise ValueError(f"weight_init={vit.weight_init_mode!r} / fix_init={vit.fix_init} has no per-parameter rule "
                         "here; build the tower with the default weight_init='' and fix_init=False")
    replaced = tuple(f"blocks.{i}.mlp" for i in getattr(vit, "moe_block_indices", ()))
    rules = {name: InitRule(rule) for name, rule in (("pos_embed", trunc_normal(0.02)),
                                                     ("cls_token", normal(1e-6)), ("reg_token", normal(1e-6)))
             if getattr(vit, name, None) is not None}
    for prefix, module in vit.named_modules():
        if isinstance(module, nn.Linear) and not prefix.startswith(replaced):
            rules[f"{prefix}.weight"] = InitRule(trunc_normal(0.02))
            if module.bias is not None:
                rules[f"{prefix}.bias"] = InitRule(constant(0.0))
    return rules


def _text_rules(text: nn.Module) -> dict[str, InitRule]:
    """open_clip `TextTransformer.init_parameters` (a `CLIP` holds the same names at its root)."""
    width, layers = text.transformer.width, text.transformer.layers
    proj_std, attn_std, fc_std = width**-0.5 * (2 * layers) ** -0.5, width**-0.5, (2 * width) ** -0.5
    rules = {"token_embedding.weight": InitRule(normal(0.02)), "positional_embedding": InitRule(normal(0.01))}
    if getattr(text, "cls_emb", None) is not None:
        rules["cls_emb"] = InitRule(normal(0.01))
    for i in range(layers):
        block = f"transformer.resblocks.{i}"
        rules |= {f"{block}.attn.in_proj_weight": InitRule(normal(attn_std)),
                  f"{block}.attn.out_proj.weight": InitRule(normal(proj_std)),
                  f"{block}.mlp.c_fc.weight": InitRule(normal(fc_std)),
                  f"{block}.mlp.c_proj.weight": InitRule(normal(proj_std))}
    projection = getattr(text, "text_projection", None)
    if isinstance(projection, nn.Linear):
        rules["text_projection.weight"] = InitRule(normal(width**-0.5))
        if projection.bias is not None:
            rules["text_projection.bias"] = InitRule(constant(0.0))
    elif projection is not None:
        rules["text_projection"] = InitRule(normal(width**-0.5))
    return rules


def _owner_rules(module: nn.Module) -> dict[str, InitRule]:
    """The rules a module sets for parameters it holds, overriding its children's defaults."""
    if isinstance(module, ExpertLayerBase):
        return module.init_rules()
    if isinstance(module, timm.models.vision_transformer.VisionTransformer):
        return _vit_rules(module)
    rules = {}
    if isinstance(module, open_clip.transformer.TextTransformer) or (
            isinstance(module, open_clip.CLIP) and hasattr(module, "token_embedding")):
        rules |= _text_rules(module)
    if isinstance(module, open_clip.CLIP | open_clip.CustomTextCLIP):
        constants = getattr(module, INIT_CONSTANTS_ATTR, None)
        if constants is None:
            raise ValueError("the CLIP model's logit_scale / logit_bias starting values are unknown; build it with "
                             "mmsoftmoe.models.clip.build_clip_from_config")
        rules |= {name: InitRule(constant(value)) for name, value in constants.items()}
    return rules


def init_rules(model: nn.Module, keep: tuple[str, ...] = ()) -> dict[str, InitRule]:
    """The rule of every parameter of `model`, by qualified name; a parameter without one (outside the `keep`
    prefixes) is a ValueError."""
    modules = list(model.named_modules())
    rules: dict[str, InitRule] = {}
    # As construction orders them: a module's own reset after its children's (reversed), then the towers' inits
    # (parents first: the MoE layers swapped into a timm ViT after its init override it).
    for prefix, module in reversed(modules):
        rules |= _prefixed(prefix, _default_rules(module))
    for prefix, module in modules:
        rules |= _prefixed(prefix, _owner_rules(module))
    missing = [name for name, _ in model.named_parameters() if name not in rules and not name.startswith(keep)]
    if missing:
        raise ValueError(f"no per-parameter initialisation rule for {missing[:5]} ({len(missing)} parameters); "
                         "mmsoftmoe.models.init knows timm ViTs, open_clip text towers and mmsoftmoe's MoE layers")
    return rules


def _local_slice(param: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...], tuple[int, ...]]:
    """(the tensor this process holds, its shape, its offset in the whole parameter)."""
    if isinstance(param, DTensor):
        shape, offset = compute_local_shape_and_global_offset(param.shape, param.device_mesh, param.placements)
        return param.to_local(), tuple(shape), tuple(offset)
    return param, tuple(param.shape), (0,) * param.ndim


def _draw(rule: InitRule, shape: tuple[int, ...], dtype: torch.dtype, generator: torch.Generator) -> torch.Tensor:
    values = torch.empty(shape, dtype=dtype)
    rule.fill(values, generator)
    return values


def _window(shape: tuple[int, ...], offset: tuple[int, ...]) -> tuple[slice, ...]:
    return tuple(slice(start, start + size) for start, size in zip(offset, shape, strict=True))


@torch.no_grad()
def init_parameter_(param: torch.Tensor, name: str, rule: InitRule, seed: int) -> None:
    """Fill the part of `param` this process holds with the values the whole parameter gets from (seed, name).

    An unstacked parameter is drawn whole and sliced; stacked experts are drawn one expert at a time, only the
    experts held here.
    """
    local, shape, offset = _local_slice(param)
    if local.numel() == 0:
        return
    if rule.experts is None and shape == tuple(param.shape) and local.device.type == "cpu" and local.is_contiguous():
        rule.fill(local, parameter_generator(seed, name))  # held whole on the CPU: drawn in place, no copy
        return
    if rule.experts is None:
        whole = _draw(rule, tuple(param.shape), local.dtype, parameter_generator(seed, name))
        local.copy_(whole[_window(shape, offset)])
        return
    window = _window(shape[1:], offset[1:])
    shared = _draw(rule, tuple(param.shape[1:]), local.dtype, parameter_generator(seed, name)) \
        if rule.experts == "shared" else None
    for row in range(shape[0]):
        expert = offset[0] + row
        values = shared if shared is not None else \
            _draw(rule, tuple(param.shape[1:]), local.dtype, parameter_generator(seed, name, expert))
        local[row].copy_(values[window])


def init_weights_(model: nn.Module, seed: int | None = None, keep: tuple[str, ...] = ()) -> nn.Module:
    """Draw every parameter of `model` (whole or sharded) from its own generator; returns `model`.

    Args:
        model: A CLIP model of mmsoftmoe (or a part: a tower, a layer), possibly parallelized and materialized.
        seed: The run's seed; None takes the seed torch was last seeded with (`torch.manual_seed`, accelerate's
            `set_seed`), so `torch.manual_seed(s)` before a build fixes its weights.
        keep: Name prefixes of parameters that keep their values (a pretrained Hugging Face text tower: "text.").
    """
    seed = torch.initial_seed() if seed is None else seed
    rules = init_rules(model, keep)
    for name, param in model.named_parameters():
        if not name.startswith(keep):
            init_parameter_(param, name, rules[name], seed)
    return model
