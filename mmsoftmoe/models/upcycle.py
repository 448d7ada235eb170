"""Sparse upcycling: initialise a MoE ViT from a dense ViT's weights (Komatsuzaki et al., ICLR 2023).

Every expert of a MoE block starts as a copy of that block's dense MLP (`fc1`, `fc2`), the routers (Soft MoE's
`phi` and `scale`, the sparse layers' gates) keep their fresh initialisation, and every other tensor (patch
embedding, attention, norms, the MLPs of dense blocks, pooling) is copied unchanged. vmoe upcycles V-MoE the same
way. Which modules hold experts is found from the layers themselves (a module holding a `StackedExperts` child
replaced a timm `Mlp` with `fc1`/`fc2` at its own path), so no MoE layer type is named here.

The dense weights come from a timm ViT state dict or from an open_clip CLIP whose image tower is a timm model
(`visual.trunk.` prefix): a safetensors or `torch.save` file, or a CLIP model folder, read and verified by
`mmsoftmoe.checkpoint.read_clip_weights` (as `model.pretrained` is).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from mmsoftmoe.layers.experts import StackedExperts

# Where a dense ViT's own keys start inside the checkpoints we read: timm, open_clip (CLIP, or its visual), DDP.
PREFIXES = ("", "visual.trunk.", "trunk.", "module.", "module.visual.trunk.")
_ANCHOR = "patch_embed.proj.weight"


@dataclass
class UpcycleReport:
    """What `upcycle_` did, tensor by tensor."""

    copied: list[str] = field(default_factory=list)  # equal to the dense tensor of the same name
    upcycled: list[str] = field(default_factory=list)  # expert tensors, each expert a copy of the dense MLP
    fresh: list[str] = field(default_factory=list)  # kept at their initialisation (routers)
    unused: list[str] = field(default_factory=list)  # dense tensors with no place in the MoE tower


def _strip_prefix(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    for prefix in PREFIXES:
        if prefix + _ANCHOR in state:
            return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    raise ValueError(f"the dense checkpoint is not a ViT: no '{_ANCHOR}' under any of the prefixes {PREFIXES} "
                     "(expected timm ViT or open_clip CLIP weights)")


def _expert_sources(mlp_path: str, dense: Mapping[str, torch.Tensor], num_experts: int) -> dict[str, torch.Tensor]:
    """The stacked expert tensors (n, d, h) / (n, 1, h) / (n, h, o) / (n, 1, o) made of one dense timm `Mlp`."""
    key = f"{mlp_path}.fc1.weight"
    if key not in dense:
        raise ValueError(f"the dense checkpoint has no {key}: its MLP at {mlp_path} cannot seed the experts")
    fc1_w_hd, fc2_w_oh = dense[key], dense[f"{mlp_path}.fc2.weight"]
    out = {"w1": fc1_w_hd.t().expand(num_experts, -1, -1), "w2": fc2_w_oh.t().expand(num_experts, -1, -1)}
    for name, source in (("b1", f"{mlp_path}.fc1.bias"), ("b2", f"{mlp_path}.fc2.bias")):
        if source in dense:
            out[name] = dense[source].reshape(1, 1, -1).expand(num_experts, 1, -1)
    return out


@torch.no_grad()
def upcycle_(moe_tower: nn.Module, dense_state: Mapping[str, torch.Tensor]) -> UpcycleReport:
    """Initialise `moe_tower` (a timm ViT with MoE blocks) in place from a dense ViT state dict.

    Raises:
        ValueError: the checkpoint is not a ViT, or a tensor's shape differs (a different width, depth or patch).
    """
    dense = _strip_prefix(dense_state)
    targets = dict(moe_tower.state_dict())
    report = UpcycleReport()
    # experts module path -> (path of the MLP it replaced, number of experts)
    experts = {path: (path.rsplit(".", 1)[0], module.num_experts)
               for path, module in moe_tower.named_modules() if isinstance(module, StackedExperts)}
    sources = {f"{path}.{k}": v for path, (mlp_path, n) in experts.items()
               for k, v in _expert_sources(mlp_path, dense, n).items()}
    report.upcycled = sorted(sources)
    for name, target in targets.items():
        source = sources.get(name, dense.get(name))
        if source is None:
            report.fresh.append(name)
            continue
        if source.shape != target.shape:
            raise ValueError(f"{name}: the dense checkpoint has shape {tuple(source.shape)}, the MoE tower "
                             f"{tuple(target.shape)}; upcycle from a dense ViT of the same size")
        target.copy_(source)
        if name not in sources:
            report.copied.append(name)
    used = set(report.copied) | {f"{mlp}.{fc}.{w}" for mlp, _ in experts.values() for fc in ("fc1", "fc2")
                                 for w in ("weight", "bias")}
    report.unused = sorted(k for k in dense if k not in used)
    return report
