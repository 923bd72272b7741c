"""Model families; importing this package registers every architecture in timm's registry.

The classification ViTs are timm's own classes (`VisionTransformer`, `Beit`) built by timm's
`build_model_with_cfg`; the MAE pre-training model is ours, made of timm's `Block`.
"""
from .mae import MAE_ARCHS, MaskedAutoencoderViT
from .mae_d2 import MAE_D2_ARCHS, MaskedAutoencoderViTD2  # D²-MAE student (adds to MAE_ARCHS)
from .mocov3 import MOCOV3_ARCHS
from .pos_embed import resize_pos_embed, sincos_2d
from .vit import VIT_ARCHS, capture_attention, capture_representations, uses_mean_pool, vit_dims, vit_tiny
from .vit_rpe import RPE_ARCHS, VisionTransformerRPE

VisionTransformer = vit_tiny  # our former class's name: builds timm's ViT with the same defaults

__all__ = ["MAE_ARCHS", "VIT_ARCHS", "MaskedAutoencoderViT", "VisionTransformer", "capture_attention",
           "capture_representations", "resize_pos_embed", "sincos_2d", "RPE_ARCHS", "VisionTransformerRPE",
           "MOCOV3_ARCHS", "uses_mean_pool", "vit_dims", "vit_tiny"]
