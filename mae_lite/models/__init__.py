"""Model families; importing this package registers every architecture in timm's registry."""
from .mae import MAE_ARCHS, MaskedAutoencoderViT
from .mae_d2 import MAE_D2_ARCHS, MaskedAutoencoderViTD2  # D²-MAE student (adds to MAE_ARCHS)
from .mocov3 import MOCOV3_ARCHS, VisionTransformerMoCo
from .pos_embed import resize_pos_embed, sincos_2d
from .vit import VIT_ARCHS, Attention, Block, VisionTransformer, capture_attention, capture_representations
from .vit_rpe import RPE_ARCHS, VisionTransformerRPE

__all__ = ["MAE_ARCHS", "VIT_ARCHS", "Attention", "Block", "MaskedAutoencoderViT", "VisionTransformer",
           "capture_attention", "capture_representations", "resize_pos_embed", "sincos_2d", "RPE_ARCHS", "VisionTransformerRPE",
           "MOCOV3_ARCHS", "VisionTransformerMoCo"]
