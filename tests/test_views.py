"""Named views give torchvision's pad-crop-flip pixels and distribution."""

import torch
import torchvision.transforms.functional as TF
from torchvision import transforms

from kd_lightning.data.views import CropFlipViews, ViewedTransform


def torchvision_view(image, dy, dx, flipped, pad, fill=0):
    # RandomCrop(size, padding=pad) = pad with the fill, then crop at (dy, dx); then RandomHorizontalFlip.
    padded = TF.pad(image, [pad], fill=fill)
    crop = TF.crop(padded, dy, dx, image.shape[-2], image.shape[-1])
    return TF.hflip(crop) if flipped else crop


def test_every_view_equals_torchvision_pixels_on_uint8_and_float():
    views = CropFlipViews(pad=4, flip=True)
    assert views.count == 162
    images = torch.randint(0, 256, (views.count, 3, 32, 32), dtype=torch.uint8)
    every = torch.arange(views.count)
    for batch in (images, images.float() / 255):
        seen = views.crop_flip(batch, every)
        for view in range(views.count):
            dy, dx, flipped = (int(t) for t in views.decode(torch.tensor(view)))
            assert torch.equal(seen[view], torchvision_view(batch[view], dy, dx, flipped, 4))


def test_identity_view_and_per_channel_fill():
    views = CropFlipViews(pad=1, flip=False, fill=(-1.0, 2.0))
    images = torch.randn(1, 2, 8, 8)
    assert views.count == 9
    assert torch.equal(views.crop_flip(images, torch.tensor([views.identity])), images)
    corner = views.crop_flip(images, torch.tensor([views.encode(0, 0, False)]))[0]
    assert corner[0, 0, 0] == -1.0 and corner[1, 0, 0] == 2.0 and corner[0, 1, 1] == images[0, 0, 0, 0]


def test_views_are_drawn_with_the_frequencies_of_randomcrop_and_flip():
    # Both pipelines see the view of a constant-free image uniquely: mark each pixel with its position.
    views = CropFlipViews(pad=1, flip=True)
    marked = torch.arange(1, 26, dtype=torch.float32).view(1, 5, 5)
    lookup = {tuple(views.crop_flip(marked[None], torch.tensor([v]))[0].flatten().tolist()): v
              for v in range(views.count)}
    torch.manual_seed(0)
    torchvision_pipeline = transforms.Compose([transforms.RandomCrop(5, padding=1), transforms.RandomHorizontalFlip()])
    viewed = ViewedTransform(views)
    n = 9000
    tv_counts = torch.zeros(views.count)
    ours = torch.zeros(views.count)
    for _ in range(n):
        tv_counts[lookup[tuple(torchvision_pipeline(marked).flatten().tolist())]] += 1
        image, view = viewed(marked)
        assert lookup[tuple(image.flatten().tolist())] == view
        ours[view] += 1
    expected = n / views.count
    # Chi-square statistic, 17 degrees of freedom: its 99.9 % quantile is 40.8, so 45 fails only a biased draw.
    for counts in (tv_counts, ours):
        assert ((counts - expected) ** 2 / expected).sum() < 45
