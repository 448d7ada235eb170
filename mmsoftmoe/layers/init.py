"""Initialisation rules: how one parameter starts, as data that any generator (and any slice of experts) can replay.

A rule is the distribution a layer draws a parameter from, kept apart from where the random numbers come from:
a layer's `init_weights()` applies its rules with torch's global generator, while
`mmsoftmoe.models.init.init_weights_` applies the same rules with one generator per parameter (and per expert),
so that the values depend only on the seed and the parameter's name (README "Scaling out").

Expert weights are stacked (n, ...) tensors. A rule with `experts="shared"` draws one expert's slice and gives it
to every expert (vmoe's `split_rngs=False`); `experts="independent"` draws each expert's slice on its own.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

Fill = Callable[[torch.Tensor, torch.Generator | None], object]
EXPERT_DRAWS = ("shared", "independent")


@dataclass(frozen=True)
class InitRule:
    """`fill(tensor, generator)` draws a tensor in place; `experts` is None for an unstacked parameter, else how
    the experts along the leading axis are drawn (one of `EXPERT_DRAWS`), `fill` then drawing one expert's slice."""

    fill: Fill
    experts: str | None = None


def constant(value: float) -> Fill:
    return lambda t, g: nn.init.constant_(t, value)


def normal(std: float) -> Fill:
    return lambda t, g: nn.init.normal_(t, std=std, generator=g)


def trunc_normal(std: float, a: float = -2.0, b: float = 2.0) -> Fill:
    """timm's `trunc_normal_`: the bounds are absolute values, not multiples of `std`."""
    return lambda t, g: nn.init.trunc_normal_(t, std=std, a=a, b=b, generator=g)


def lecun_normal(fan_in: int) -> Fill:
    """JAX's `lecun_normal`: variance 1/fan_in, truncated at 2 std and rescaled so the truncated draw keeps it."""
    std = math.sqrt(1.0 / fan_in) / 0.87962566103423978
    return trunc_normal(std, -2 * std, 2 * std)


def xavier_uniform() -> Fill:
    return lambda t, g: nn.init.xavier_uniform_(t, generator=g)


def torch_default_weight() -> Fill:
    """`nn.Linear` / `nn.Conv2d` `reset_parameters` for the weight: kaiming-uniform with a = sqrt(5)."""
    return lambda t, g: nn.init.kaiming_uniform_(t, a=math.sqrt(5), generator=g)


def torch_default_bias(fan_in: int) -> Fill:
    """`nn.Linear` / `nn.Conv2d` `reset_parameters` for the bias: uniform within +-1/sqrt(fan_in)."""
    bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0.0
    return lambda t, g: nn.init.uniform_(t, -bound, bound, generator=g)


@torch.no_grad()
def apply_rules_(module: nn.Module, rules: dict[str, InitRule], generator: torch.Generator | None = None) -> None:
    """Draw the parameters of `module` named in `rules` (names relative to `module`) from `generator`."""
    for name, rule in rules.items():
        param = module.get_parameter(name)
        if rule.experts == "shared":
            rule.fill(param[0], generator)
            param.copy_(param[:1].expand_as(param))
        elif rule.experts == "independent":
            for expert in param:
                rule.fill(expert, generator)
        else:
            rule.fill(param, generator)
