"""Pictures of Soft MoE routing: which image patches each of a few slots draws from.

In a Soft MoE layer (Puigcerver et al. 2024, section 2.1 and Fig. 2) slot j's input is a convex mix of the tokens with
the dispatch weights ``D[:, j]`` (softmax over tokens), so on a ViT each slot's weights are a heat map over the patch
grid. ``dispatch_maps`` captures the input of a tower's last Soft MoE layer with a forward hook and recomputes its
routing weights; ``plot_dispatch`` overlays the maps on the images, one row per image and one column per slot.

All maps of a figure share one colour scale, centred on the uniform weight 1/m (m tokens per image): white is
uniform, red draws more than uniform, blue less, and a colour bar gives the values. A per-map scale would stretch
near-uniform routing (all weights close to 1/m) into what looks like structure.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from mmsoftmoe.figures import save_figure
from mmsoftmoe_eval.features import eval_mode


def last_soft_moe(tower: nn.Module) -> nn.Module | None:
    """The tower's last layer that declares token-to-slot `dispatch_weights` (a Soft MoE MLP), or None."""
    layers = [module for module in tower.modules() if callable(getattr(module, "dispatch_weights", None))]
    return layers[-1] if layers else None


def spread_slots(num_slots: int, count: int) -> list[int]:
    """``count`` slot indices spread evenly over ``0 .. num_slots - 1`` (distinct experts when p = 1)."""
    return torch.linspace(0, num_slots - 1, min(count, num_slots)).round().long().tolist()


def dispatch_maps(tower: nn.Module, images: torch.Tensor, slots: Sequence[int]) -> torch.Tensor:
    """Dispatch weights of the chosen slots of the last Soft MoE layer over the patch grid.

    Args:
        tower: A timm ViT (``patch_embed.grid_size``, ``num_prefix_tokens``) with at least one ``SoftMoE`` MLP.
        images: ``[b, 3, H, W]`` preprocessed images on the tower's device.
        slots: Slot indices to keep.

    Returns:
        ``[b, len(slots), gh, gw]`` weights; over patches and prefix tokens together, each slot's weights sum to 1.
    """
    layer = last_soft_moe(tower)
    if layer is None:
        raise ValueError(f"{type(tower).__name__} has no SoftMoE layer: dispatch maps exist only for Soft MoE towers.")
    captured = []
    # Computed inside the layer's forward, where a sharded (FSDP2) layer holds its parameters gathered; before
    # FSDP2's own post-forward hook reshards them (prepend).
    handle = layer.register_forward_hook(
        lambda module, args, output: captured.append(module.dispatch_weights(args[0])), prepend=True)
    try:
        with torch.no_grad(), eval_mode(tower):  # not inference_mode: a sharded (FSDP2) model cannot run in it
            tower(images)
    finally:
        handle.remove()
    dispatch_bms = captured[-1]
    grid_h, grid_w = tower.patch_embed.grid_size
    patches_bpk = dispatch_bms[:, tower.num_prefix_tokens:, list(slots)]
    return patches_bpk.transpose(1, 2).reshape(len(images), len(slots), grid_h, grid_w).float().cpu()


def num_tokens(tower: nn.Module) -> int:
    """Tokens per image entering the tower's blocks (patches + prefix tokens): the m of the uniform weight 1/m."""
    return tower.patch_embed.num_patches + tower.num_prefix_tokens


def dispatch_norm(maps: torch.Tensor, tokens: int) -> Any:
    """One colour scale for all maps, white at the uniform weight 1/m, from 0 to the largest weight or 2/m if larger."""
    from matplotlib.colors import TwoSlopeNorm

    uniform = 1.0 / tokens
    return TwoSlopeNorm(vmin=0.0, vcenter=uniform, vmax=max(float(maps.max()), 2.0 * uniform))


def plot_dispatch(
    images: torch.Tensor, maps: torch.Tensor, slots: Sequence[int], path: str | Path, tokens: int, title: str = ""
) -> Path:
    """A grid PNG: per image, the image then each slot's dispatch map over it, one colour scale and a colour bar.

    Args:
        images: ``[b, 3, H, W]`` images in ``[0, 1]`` (un-normalised, for display).
        maps: ``[b, k, gh, gw]`` from ``dispatch_maps``.
        slots: The k slot indices, for the column titles.
        path: PNG file to write.
        tokens: Tokens per image m (``num_tokens``); the scale is centred on 1/m.
        title: Figure title; the uniform weight is appended.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, cols = maps.shape[0], maps.shape[1] + 1
    fig = plt.figure(figsize=(1.6 * cols + 0.8, 1.6 * rows + 0.4))
    grid = fig.add_gridspec(rows, cols + 1, width_ratios=[1.0] * cols + [0.08])  # last column: the colour bar
    axes = np.array([[fig.add_subplot(grid[i, j]) for j in range(cols)] for i in range(rows)])
    height, width = images.shape[-2:]
    norm = dispatch_norm(maps, tokens)
    for i in range(rows):
        picture = images[i].permute(1, 2, 0).clamp(0, 1).cpu().numpy()
        axes[i, 0].imshow(picture)
        for k, slot in enumerate(slots):
            axes[i, k + 1].imshow(picture)
            shown = axes[i, k + 1].imshow(maps[i, k].numpy(), extent=(0, width, height, 0), alpha=0.6,
                                          cmap="RdBu_r", norm=norm, interpolation="nearest")
            axes[0, k + 1].set_title(f"slot {slot}", fontsize=8)
    axes[0, 0].set_title("image", fontsize=8)
    for ax in axes.flat:
        ax.set_axis_off()
    colorbar = fig.colorbar(shown, cax=fig.add_subplot(grid[:, -1]), label="dispatch weight")
    colorbar.ax.axhline(1.0 / tokens, color="black", linewidth=1)
    uniform = f"uniform 1/m = 1/{tokens} = {1.0 / tokens:.3g}"
    fig.suptitle(f"{title or 'dispatch weights of the last Soft MoE layer'} ({uniform})", fontsize=9)
    return save_figure(fig, path, dpi=100)
