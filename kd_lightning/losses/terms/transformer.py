"""What the transformer terms (MiniLM/MiniViT, ViTKD) read from a vision transformer: its blocks by index.

A network qualifies when it has a `blocks` sequence whose blocks hold a timm-style self-attention module as
`attn` (a `qkv` linear, `num_heads`, `head_dim`, and the probabilities passing through `attn_drop`), which is
what timm's VisionTransformer, DeiT and their relatives build.
"""

from __future__ import annotations

from torch import nn

from kd_lightning.errors import ConfigError


def network_name(model: nn.Module, role: str) -> str:
    return getattr(model, "kd_spec", {}).get("name", role)


def transformer_blocks(model: nn.Module, role: str, term: str) -> nn.Sequential | nn.ModuleList:
    """The model's transformer blocks, or the ConfigError that says which models the term supports."""
    blocks = getattr(model, "blocks", None)
    if isinstance(blocks, (nn.Sequential, nn.ModuleList)) and len(blocks) > 0 and all(
            _is_attention(getattr(block, "attn", None)) for block in blocks):
        return blocks
    raise ConfigError(
        f"The {term} term distils transformer self-attention, but the {role} {network_name(model, role)!r} has "
        f"no transformer blocks (a `blocks` list whose blocks hold a timm self-attention module `attn` with a "
        f"`qkv` projection), e.g. it is a CNN. Use a vision transformer for both networks (student=vit_digits "
        f"teacher=vit_digits_large on digits, or a timm ViT/DeiT), or choose a feature term made for CNNs such "
        f"as distill=[at] or distill=[fitnet]."
    )


def _is_attention(module: nn.Module | None) -> bool:
    return (module is not None and isinstance(getattr(module, "qkv", None), nn.Linear)
            and hasattr(module, "num_heads") and hasattr(module, "head_dim")
            and isinstance(getattr(module, "attn_drop", None), nn.Module))


def block_index(index: int, depth: int, option: str, model: nn.Module, role: str) -> int:
    """A block index as Python counts it (−1 = last), checked against the model's depth."""
    if not -depth <= index < depth:
        raise ConfigError(
            f"{option}={index} names no block of the {role} {network_name(model, role)!r}, which has {depth} "
            f"transformer blocks. Use 0..{depth - 1}, or negative indices from the end (-1 = the last block)."
        )
    return index % depth


def prefix_tokens(model: nn.Module) -> int:
    """Tokens before the patch tokens (class, distillation, register tokens), as timm records them."""
    return int(getattr(model, "num_prefix_tokens", 0))
