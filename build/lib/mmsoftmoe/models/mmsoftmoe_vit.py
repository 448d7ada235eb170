"""timm registry entries for the Soft MoE ViTs, their dense twins and their sparse (Tokens/Experts Choice) twins.

Architectures follow the paper's configs (Puigcerver et al. 2024, Table 9 / vmoe `configs/common.py`): the MoE
replaces the MLP of the last half of the blocks, one slot per expert, expert width = the dense MLP width,
global average pooling after the final norm, query-key normalisation in attention, no class token, and the
tanh-approximate GELU of every vmoe MLP (flax `nn.gelu`; `timm.create_model(name, act_layer="gelu")` for the exact
one). Experts start from vmoe's shared init (`moe_kwargs=dict(expert_init="independent")` for timm's per-expert
one). `micro` and `mini` are CPU-sized towers for tests, the demo and the small-scale study; `base_patch16_256` is
the tower of the paper's image-text recipe (App. F.1).

Names say what differs: `softmoe_vit_small_patch16_224_e128` (128 experts), `dense_vit_small_patch16_224`,
`tokenschoice_vit_small_patch16_224_e128_k2` (top-2), `expertschoice_vit_small_patch16_224_e128`,
`softmoe_vit_micro_patch4_32_e16_s4` (4 slots per expert), `..._e16_s4_duniform_csoft` (uniform dispatch, soft combine).
After `import mmsoftmoe`, `timm.create_model(name, **overrides)` builds any of them;
`timm.list_models(module="mmsoftmoe_vit")` lists them.
"""

from __future__ import annotations

from collections.abc import Callable

from timm.models import build_model_with_cfg, register_model
from timm.models._registry import generate_default_cfgs
from timm.models.vision_transformer import checkpoint_filter_fn

from mmsoftmoe.models.vit import MoEVisionTransformer

# (ViT kwargs, number of experts of the Soft MoE / sparse variants); the paper's sizes and two CPU sizes.
TOWERS: dict[str, tuple[dict, int]] = {
    "micro_patch4_32": (dict(img_size=32, patch_size=4, embed_dim=64, depth=4, num_heads=2), 16),
    "mini_patch8_64": (dict(img_size=64, patch_size=8, embed_dim=128, depth=6, num_heads=4), 32),
    "small_patch16_224": (dict(patch_size=16, embed_dim=384, depth=12, num_heads=6), 128),
    "base_patch16_224": (dict(patch_size=16, embed_dim=768, depth=12, num_heads=12), 128),
    "base_patch16_256": (dict(img_size=256, patch_size=16, embed_dim=768, depth=12, num_heads=12), 128),
    "large_patch16_224": (dict(patch_size=16, embed_dim=1024, depth=24, num_heads=16), 128),
    "small_patch14_224": (dict(patch_size=14, embed_dim=384, depth=12, num_heads=6), 256),
    "huge_patch14_224": (dict(patch_size=14, embed_dim=1280, depth=32, num_heads=16), 256),
}
SPARSE_TWINS = ("micro_patch4_32", "mini_patch8_64", "small_patch16_224", "base_patch16_224")
# The small-scale study's towers (benchmarks/study.py): Soft MoE with as many slots as tokens, i.e. the dense MLP's
# cost (`_e16_s4`), and at that size the paper's routing ablations (section 5, Table 3) as `_d<dispatch>_c<combine>`.
STUDY_TOWERS = ("micro_patch4_32", "mini_patch8_64")
ROUTING_ABLATIONS = (("soft", "uniform"), ("uniform", "soft"), ("uniform", "uniform"), ("identity", "identity"))

# The paper's ViT recipe shared by every tower (vmoe: GAP after the encoder norm, qk-norm, no class token).
_COMMON = dict(mlp_ratio=4.0, qk_norm=True, class_token=False, global_pool="avg", fc_norm=False, act_layer="gelu_tanh")


def matched_slots_per_expert(tower: str) -> int:
    """Slots per expert p with n * p = m tokens: the Soft MoE that costs what the dense MLP costs."""
    vit, experts = TOWERS[tower]
    tokens = (vit.get("img_size", 224) // vit["patch_size"]) ** 2
    if tokens % experts:
        raise ValueError(f"{tower}: {tokens} tokens do not split evenly over {experts} experts")
    return tokens // experts


def _variants() -> dict[str, dict]:
    """Registered name -> `MoEVisionTransformer` kwargs."""
    out = {}
    for tower, (vit, experts) in TOWERS.items():
        base = dict(_COMMON, **vit)
        out[f"dense_vit_{tower}"] = dict(base, moe_blocks="none")
        out[f"softmoe_vit_{tower}_e{experts}"] = dict(
            base, moe_layer="soft", moe_kwargs=dict(num_experts=experts, slots_per_expert=1))
        if tower in SPARSE_TWINS:
            for k in (1, 2):
                out[f"tokenschoice_vit_{tower}_e{experts}_k{k}"] = dict(
                    base, moe_layer="tokens_choice", moe_kwargs=dict(num_experts=experts, top_k=k, capacity_factor=1.0))
            out[f"expertschoice_vit_{tower}_e{experts}"] = dict(
                base, moe_layer="experts_choice", moe_kwargs=dict(num_experts=experts, capacity_factor=1.0))
        if tower in STUDY_TOWERS:
            slots = matched_slots_per_expert(tower)
            soft = dict(num_experts=experts, slots_per_expert=slots)
            out[f"softmoe_vit_{tower}_e{experts}_s{slots}"] = dict(base, moe_layer="soft", moe_kwargs=soft)
            for dispatch, combine in ROUTING_ABLATIONS:
                out[f"softmoe_vit_{tower}_e{experts}_s{slots}_d{dispatch}_c{combine}"] = dict(
                    base, moe_layer="soft", moe_kwargs=dict(soft, dispatch=dispatch, combine=combine))
    return out


MODEL_ARGS = _variants()


def _cfg(img_size: int) -> dict:
    # big_vision / vmoe preprocess to [-1, 1]: mean = std = 0.5. No hosted weights: `url` is empty.
    return dict(url="", num_classes=1000, input_size=(3, img_size, img_size), pool_size=None, crop_pct=1.0,
                interpolation="bicubic", fixed_input_size=True, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5),
                first_conv="patch_embed.proj", classifier="head", license="apache-2.0")


default_cfgs = generate_default_cfgs({name: _cfg(args.get("img_size", 224)) for name, args in MODEL_ARGS.items()})


def _create(variant: str, pretrained: bool = False, **kwargs) -> MoEVisionTransformer:
    model_args = dict(MODEL_ARGS[variant])
    if "moe_kwargs" in kwargs:  # merge, so e.g. moe_kwargs=dict(num_experts=4) keeps the other settings
        model_args["moe_kwargs"] = dict(model_args.get("moe_kwargs", {}), **kwargs.pop("moe_kwargs"))
    out_indices = kwargs.pop("out_indices", 3)
    return build_model_with_cfg(
        MoEVisionTransformer, variant, pretrained, pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(out_indices=out_indices, feature_cls="getter"), **dict(model_args, **kwargs),
    )


def _entrypoint(name: str) -> Callable[..., MoEVisionTransformer]:
    def entrypoint(pretrained: bool = False, **kwargs) -> MoEVisionTransformer:
        return _create(name, pretrained=pretrained, **kwargs)

    entrypoint.__name__ = entrypoint.__qualname__ = name
    entrypoint.__module__ = __name__
    entrypoint.__doc__ = f"{name}: {MODEL_ARGS[name]}"
    return entrypoint


for _name in MODEL_ARGS:
    globals()[_name] = register_model(_entrypoint(_name))
