"""Tiny vision transformers for the embedded digits (8×8 grayscale), so the transformer terms (MiniLM, ViTKD)
have a teacher/student pair that trains in seconds on a CPU. timm's VisionTransformer with 2×2 patches: a
4×4 grid plus the class token, 17 tokens. Not from a paper; `timm:<name>` configs build the published ones."""

from __future__ import annotations

from torch import nn

from kd_lightning.models import register_model


def _digits_vit(num_classes: int, in_channels: int, img_size: int, embed_dim: int, depth: int,
                num_heads: int) -> nn.Module:
    import timm  # imported on use: timm is heavy and most runs build no transformer

    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=img_size, patch_size=2,
                             embed_dim=embed_dim, depth=depth, num_heads=num_heads, num_classes=num_classes,
                             in_chans=in_channels)


@register_model("vit_digits")
def vit_digits(num_classes: int, in_channels: int = 1, img_size: int = 8) -> nn.Module:
    """Student: width 32, 3 blocks, 2 heads (about 40k parameters)."""
    return _digits_vit(num_classes, in_channels, img_size, embed_dim=32, depth=3, num_heads=2)


@register_model("vit_digits_large")
def vit_digits_large(num_classes: int, in_channels: int = 1, img_size: int = 8) -> nn.Module:
    """Teacher: width 64, 4 blocks, 4 heads: other width, depth and head count than the student, so the
    terms' relation heads and aligners are exercised."""
    return _digits_vit(num_classes, in_channels, img_size, embed_dim=64, depth=4, num_heads=4)
