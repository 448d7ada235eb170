"""mmsoftmoe: CLIP-style image-text models with Soft Mixture-of-Experts Vision Transformers.

Importing the package registers its towers in timm (`timm.create_model("softmoe_vit_small_patch16_224_e128")`)
and its CLIP model configs in open_clip (`open_clip.create_model_and_transforms("SoftMoE-Mini-8-64")`).
"""

from mmsoftmoe import layers, models
from mmsoftmoe.layers import ExpertsChoiceMoE, SoftMoE, TokensChoiceMoE, collect_aux_loss, collect_routing_stats
from mmsoftmoe.models import MoEVisionTransformer, list_models
from mmsoftmoe.models import clip as _clip  # noqa: F401  (importing it registers the CLIP configs with open_clip)

__version__ = "0.1.0"

__all__ = [
    "ExpertsChoiceMoE",
    "MoEVisionTransformer",
    "SoftMoE",
    "TokensChoiceMoE",
    "collect_aux_loss",
    "collect_routing_stats",
    "layers",
    "list_models",
    "models",
]
