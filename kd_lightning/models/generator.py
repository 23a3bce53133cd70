"""The image generator of DAFL and DFAD: noise z → an image batch of the teacher's input shape.

As in DAFL's DAFL_train.py `Generator` and DFAD's network/gan.py `GeneratorA` (the same network):
Linear(z → 2w·(s/4)²) → BN → ×2 upsample → conv 3×3 (2w) → BN → LeakyReLU(0.2) → ×2 upsample → conv 3×3 (w)
→ BN → LeakyReLU(0.2) → conv 3×3 (channels) → tanh → BN without affine. DAFL builds its two inner BNs with
eps=0.8 (`nn.BatchNorm2d(128, 0.8)`, the positional argument is eps), DFAD with the default 1e-5; `bn_eps`
keeps either. ZSKT's generator (models/generator.py) is the same network with no tanh (`tanh=False`) and a
last BN with affine parameters (`affine_output=True`); its convolutions keep their biases, as here.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from kd_lightning.errors import ConfigError


class ImageGenerator(nn.Module):
    def __init__(self, latent_dim: int, image_size: tuple[int, int], channels: int, width: int = 64,
                 bn_eps: float = 1e-5, tanh: bool = True, affine_output: bool = False) -> None:
        super().__init__()
        height, breadth = image_size
        if height % 4 or breadth % 4 or height < 4 or breadth < 4:
            raise ConfigError(f"The generator upsamples twice by 2, so it makes images whose sides are multiples "
                              f"of 4; {height}×{breadth} is not. Set scheme.generator.image_size to the teacher's "
                              f"input size rounded to a multiple of 4 (the data module's image_size, e.g. 8, 28, 32).")
        self.latent_dim, self.image_size, self.channels = int(latent_dim), (height, breadth), int(channels)
        self.initial = (height // 4, breadth // 4)
        self.project = nn.Linear(self.latent_dim, 2 * width * self.initial[0] * self.initial[1])
        self.bn0 = nn.BatchNorm2d(2 * width)
        self.block1 = nn.Sequential(nn.Conv2d(2 * width, 2 * width, 3, 1, 1), nn.BatchNorm2d(2 * width, eps=bn_eps),
                                    nn.LeakyReLU(0.2))
        self.block2 = nn.Sequential(nn.Conv2d(2 * width, width, 3, 1, 1), nn.BatchNorm2d(width, eps=bn_eps),
                                    nn.LeakyReLU(0.2), nn.Conv2d(width, self.channels, 3, 1, 1),
                                    nn.Tanh() if tanh else nn.Identity(), nn.BatchNorm2d(self.channels, affine=bool(affine_output)))

    def forward(self, z: Tensor) -> Tensor:
        x = self.project(z.flatten(1)).view(len(z), -1, *self.initial)
        x = self.block1(F.interpolate(self.bn0(x), scale_factor=2))
        return self.block2(F.interpolate(x, scale_factor=2))
