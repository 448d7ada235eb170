"""Configuration of an mmsoftmoe image encoder (Soft MoE ViT + projection) for Hugging Face transformers.

Shipped as remote code by `mmsoftmoe export --format hf`; it imports transformers only.
"""

from __future__ import annotations

from transformers import PretrainedConfig


class MMSoftMoEVisionConfig(PretrainedConfig):
    """Architecture of the exported image encoder.

    Args:
        vit_kwargs: Arguments of timm's `VisionTransformer` (img_size, patch_size, embed_dim, depth, ...).
        moe_block_indices: Blocks whose MLP is a Soft MoE layer.
        moe_kwargs: Soft MoE settings: `num_experts`, `slots_per_expert`, `normalize`, `bias`,
            `gelu_approximate` ("none" or "tanh").
        projection_dim: Width of the linear projection after pooling (the CLIP embedding); 0 for none.
        projection_bias: Whether that projection has a bias.
        image_mean, image_std: Per-channel normalisation the encoder expects of its input pixels.
    """

    model_type = "mmsoftmoe_vision"

    def __init__(
        self,
        vit_kwargs: dict | None = None,
        moe_block_indices: list[int] | None = None,
        moe_kwargs: dict | None = None,
        projection_dim: int = 0,
        projection_bias: bool = False,
        image_mean: list[float] | None = None,
        image_std: list[float] | None = None,
        **kwargs,
    ) -> None:
        self.vit_kwargs = dict(vit_kwargs or {})
        self.moe_block_indices = list(moe_block_indices or [])
        self.moe_kwargs = dict(moe_kwargs or {})
        self.projection_dim = projection_dim
        self.projection_bias = projection_bias
        self.image_mean = list(image_mean or [0.5, 0.5, 0.5])
        self.image_std = list(image_std or [0.5, 0.5, 0.5])
        super().__init__(**kwargs)
