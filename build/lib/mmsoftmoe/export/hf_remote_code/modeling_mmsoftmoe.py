"""Soft MoE ViT image encoder exported by mmsoftmoe, for Hugging Face transformers (remote code).

Self-contained: it needs torch, timm and transformers, not mmsoftmoe. The ViT is timm's `VisionTransformer`; the
Soft MoE layer ("From Sparse to Soft Mixtures of Experts", Puigcerver et al., ICLR 2024, Algorithm 1) is vendored
below for inference, with the parameter names and the operations of `mmsoftmoe.layers.SoftMoE`, so the exported
weights load unchanged and the outputs match the mmsoftmoe model (the exporter checks it on every export).
Einsum legend: b batch, m tokens, d width, n experts, p slots per expert, s = n * p slots, h expert width.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn
from transformers import PreTrainedModel
from transformers.utils import ModelOutput

from .configuration_mmsoftmoe import MMSoftMoEVisionConfig

_L2N_EPS = 1e-6


def autocast_off(device: torch.device) -> contextlib.AbstractContextManager:
    """Disable autocast where it exists for `device`: routing runs in float32, as in mmsoftmoe."""
    if torch.amp.is_autocast_available(device.type):
        return torch.autocast(device_type=device.type, enabled=False)
    return contextlib.nullcontext()


def l2_normalize(x: torch.Tensor, dim: int) -> torch.Tensor:
    """`x * rsqrt(sum(x**2, dim) + 1e-6)` (vmoe's normalisation)."""
    return x * torch.rsqrt(x.pow(2).sum(dim=dim, keepdim=True) + _L2N_EPS)


class StackedExperts(nn.Module):
    """n expert MLPs d -> h -> d (GELU, exact or tanh-approximate), stacked: w1 (n, d, h), w2 (n, h, d); input
    (n, k, d)."""

    def __init__(self, num_experts: int, width: int, hidden: int, bias: bool, gelu_approximate: str) -> None:
        super().__init__()
        self.w1 = nn.Parameter(torch.zeros(num_experts, width, hidden))
        self.w2 = nn.Parameter(torch.zeros(num_experts, hidden, width))
        self.b1 = nn.Parameter(torch.zeros(num_experts, 1, hidden)) if bias else None
        self.b2 = nn.Parameter(torch.zeros(num_experts, 1, width)) if bias else None
        self.act = nn.GELU(approximate=gelu_approximate)

    @staticmethod
    def _linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        return torch.bmm(x, w) if b is None else torch.baddbmm(b, x, w)

    def forward(self, x_nkd: torch.Tensor) -> torch.Tensor:
        return self._linear(self.act(self._linear(x_nkd, self.w1, self.b1)), self.w2, self.b2)


class SoftMoE(nn.Module):
    """Soft MoE MLP: slots are softmax-over-tokens mixes of the input, outputs softmax-over-slots mixes."""

    def __init__(self, width: int, hidden: int, num_experts: int, slots_per_expert: int = 1,
                 normalize: bool = True, bias: bool = True, gelu_approximate: str = "none") -> None:
        super().__init__()
        self.width, self.num_experts, self.slots_per_expert = width, num_experts, slots_per_expert
        self.num_slots = num_experts * slots_per_expert
        self.normalize = normalize
        self.phi = nn.Parameter(torch.zeros(width, num_experts, slots_per_expert))
        self.scale = nn.Parameter(torch.ones(())) if normalize else None
        self.experts = StackedExperts(num_experts, width, hidden, bias, gelu_approximate)

    def router_logits(self, x_bmd: torch.Tensor) -> torch.Tensor:
        """Token-slot logits (b, m, s) in float32 (float64 for float64 input)."""
        dtype = torch.promote_types(x_bmd.dtype, torch.float32)
        with autocast_off(x_bmd.device):
            x_bmd = x_bmd.to(dtype)
            phi_ds = self.phi.to(dtype).reshape(self.width, self.num_slots)
            if self.normalize:
                x_bmd = l2_normalize(x_bmd, dim=-1)
                phi_ds = self.scale.to(dtype) * l2_normalize(phi_ds, dim=0)
            return x_bmd @ phi_ds

    def forward(self, x_bmd: torch.Tensor) -> torch.Tensor:
        b, _, d = x_bmd.shape
        logits_bms = self.router_logits(x_bmd)
        dispatch_bms, combine_bms = torch.softmax(logits_bms, dim=1), torch.softmax(logits_bms, dim=2)
        xs_bsd = dispatch_bms.to(x_bmd.dtype).transpose(1, 2) @ x_bmd
        # (b, n*p, d) -> (n, b*p, d): each expert sees its p slots of every example.
        xs_nkd = xs_bsd.view(b, self.num_experts, self.slots_per_expert, d).transpose(0, 1)
        ys_nkd = self.experts(xs_nkd.reshape(self.num_experts, b * self.slots_per_expert, d))
        ys_bsd = ys_nkd.view(self.num_experts, b, self.slots_per_expert, -1).transpose(0, 1)
        return combine_bms.to(ys_bsd.dtype) @ ys_bsd.reshape(b, self.num_slots, -1)


def build_trunk(config: MMSoftMoEVisionConfig) -> VisionTransformer:
    """timm's ViT (no classifier) with a Soft MoE MLP in the configured blocks."""
    trunk = VisionTransformer(**config.vit_kwargs, num_classes=0)
    for i in config.moe_block_indices:
        dense = trunk.blocks[i].mlp
        trunk.blocks[i].mlp = SoftMoE(trunk.embed_dim, dense.fc1.out_features, **config.moe_kwargs)
    return trunk


@dataclass
class MMSoftMoEVisionOutput(ModelOutput):
    """image_embeds (b, projection_dim or width), pooler_output (b, width) before the projection,
    last_hidden_state (b, patches, width): the patch tokens after the final norm, only when asked for."""

    image_embeds: torch.FloatTensor | None = None
    pooler_output: torch.FloatTensor | None = None
    last_hidden_state: torch.FloatTensor | None = None


class MMSoftMoEVisionModel(PreTrainedModel):
    """Pixels (b, 3, H, W), normalised with `config.image_mean` / `image_std`, to CLIP image embeddings."""

    config_class = MMSoftMoEVisionConfig
    base_model_prefix = "mmsoftmoe"
    main_input_name = "pixel_values"

    def __init__(self, config: MMSoftMoEVisionConfig) -> None:
        super().__init__(config)
        self.trunk = build_trunk(config)
        width = self.trunk.num_features
        self.proj = (nn.Linear(width, config.projection_dim, bias=config.projection_bias)
                     if config.projection_dim else None)
        self.post_init()

    def forward(self, pixel_values: torch.Tensor, output_patch_tokens: bool = False) -> MMSoftMoEVisionOutput:
        tokens_bmd = self.trunk.forward_features(pixel_values)
        pooled_bd = self.trunk.forward_head(tokens_bmd, pre_logits=True)
        embeds = self.proj(pooled_bd) if self.proj is not None else pooled_bd
        patches = tokens_bmd[:, self.trunk.num_prefix_tokens:] if output_patch_tokens else None
        return MMSoftMoEVisionOutput(image_embeds=embeds, pooler_output=pooled_bd, last_hidden_state=patches)

    def get_image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The image embeddings (what open_clip's `encode_image` returns, unnormalised)."""
        return self(pixel_values).image_embeds
