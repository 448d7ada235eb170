"""Image towers (MoE ViTs registered in timm)."""

import timm

from mmsoftmoe.models import mmsoftmoe_vit
from mmsoftmoe.models.vit import MoEVisionTransformer, resolve_moe_blocks


def list_models(pattern: str = "") -> list[str]:
    """Names of the towers mmsoftmoe registers in timm (optionally filtered by a wildcard pattern)."""
    return timm.list_models(pattern or "*", module=mmsoftmoe_vit.__name__.split(".")[-1])


__all__ = ["MoEVisionTransformer", "list_models", "resolve_moe_blocks"]
