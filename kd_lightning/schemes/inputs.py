"""Which input of a batch a network reads, for batches whose images are named inputs ({name: tensor}).

A placeholder body for the named-inputs contract (networks carry the name of the input they read as
`kd_input`); the data side that produces such batches replaces it.
"""

from __future__ import annotations

from typing import Mapping

from torch import Tensor, nn


def role_input(images: Tensor | Mapping[str, Tensor], network: nn.Module) -> Tensor:
    """`images` itself for a plain tensor batch; else the input named by `network.kd_input`, or the batch's
    first input when the network names none."""
    if isinstance(images, Tensor):
        return images
    return images[getattr(network, "kd_input", None) or next(iter(images))]
