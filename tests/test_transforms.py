"""The segmentation pipelines against hand-computed sizes and pixels: mmseg's random rescale bounds both sides, the
photometric distortion keeps the colours in their channels, masks stay on their pixels, and evaluation scores the
mask it was given."""
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import default_collate
from torchvision import tv_tensors

from asmlp_min.data.shapes import ShapesSegmentation
from asmlp_min.data.transforms import IMAGENET_MEAN, IMAGENET_STD, RandomRescale, segmentation_transforms
from asmlp_min.engine.data import task_transforms


def _image(height: int, width: int, rgb=(0, 0, 0)) -> tv_tensors.Image:
    return tv_tensors.Image(torch.tensor(rgb, dtype=torch.uint8)[:, None, None].expand(3, height, width).clone())


def _mask(height: int, width: int) -> tv_tensors.Mask:
    return tv_tensors.Mask(torch.zeros(height, width, dtype=torch.int64))


@pytest.mark.parametrize("height, width, crop, ratio, expected", [
    # scale (long, short) = (int(4 crop r), int(crop r)); factor min(short / short side, long / long side), half up
    (100, 1000, 32, 0.5, (6, 64)),        # (64, 16): min(16/100, 64/1000) = 0.064 -> 6.4, 64
    (100, 1000, 32, 2.0, (26, 256)),      # (256, 64): the long side binds, 0.256 -> 25.6, 256 (not 64 x 640)
    (600, 400, 32, 0.5, (24, 16)),        # (64, 16): the short side binds, 0.04 -> 24, 16
    (600, 400, 32, 2.0, (96, 64)),        # (256, 64): 0.16 -> 96, 64
    (600, 400, 10, 1.25, (18, 12)),       # (50, 12): 12.5 truncated to 12, 0.03 -> 18, 12 (untruncated 19, 13)
    (100, 1000, 512, 0.75, (154, 1536)),  # ADE20K's (2048, 512) at 0.75: (1536, 384), 1.536 -> 153.6, 1536
])
def test_random_rescale_fits_mmsegs_scale_times_the_ratio(height, width, crop, ratio, expected):
    image, mask = RandomRescale(crop, (ratio, ratio))(_image(height, width), _mask(height, width))
    assert image.shape == (3, *expected) and mask.shape == expected


def test_random_rescale_draws_the_ratio_uniformly_and_bounds_the_long_side():
    image, mask = _image(100, 1000), _mask(100, 1000)
    longs = []
    for seed in range(200):
        torch.manual_seed(seed)
        longs.append(RandomRescale(32, (0.5, 2.0))(image, mask)[0].shape[-1])   # int(128 r): r = 0.5-2 -> 64-256
    assert 64 <= min(longs) < 72 and 248 < max(longs) <= 256
    assert abs(sum(longs) / len(longs) - 160) < 16                              # uniform r: mean 1.25 x 128


def test_segmentation_train_rescale_bounds_the_long_side_of_a_panorama():
    # 100 x 1000 at r = 2 with a 32-px crop is 26 x 256: the 32-px crop has 6 rows of padding, ignored
    torch.manual_seed(0)
    _, crop = segmentation_transforms(train=True, size=32, ratio_range=(2.0, 2.0))(_image(100, 1000),
                                                                                   _mask(100, 1000))
    ignored = crop == 255
    assert ignored.all(1).sum() == 6 and ignored.sum() == 6 * 32


@pytest.mark.parametrize("crop, ratio", [(32, 1.7), (64, 2.0)])   # 80 x 120 to 54 x 81 (down), 128 x 192 (up)
def test_random_rescale_keeps_the_mask_on_its_pixels(crop, ratio):
    ids = torch.arange(24).reshape(4, 6).repeat_interleave(20, 0).repeat_interleave(20, 1)   # 20-px blocks
    image = tv_tensors.Image((ids * 10).to(torch.uint8).expand(3, -1, -1).clone())
    out, mask = RandomRescale(crop, (ratio, ratio))(image, tv_tensors.Mask(ids))     # the mask is the image / 10
    assert mask.shape == out.shape[-2:] and set(mask.unique().tolist()) <= set(range(24))
    red = out[:1].float()
    inside = (F.max_pool2d(red, 3, 1, 1) == -F.max_pool2d(-red, 3, 1, 1))[0]   # 3 x 3 of one block, no blend
    assert inside.float().mean() > 0.5
    assert (out[0][inside] == 10 * mask[inside]).all()


def test_photometric_distortion_never_swaps_the_channels():
    mean, std = torch.tensor(IMAGENET_MEAN)[:, None, None], torch.tensor(IMAGENET_STD)[:, None, None]
    transform = segmentation_transforms(train=True, size=32)
    changed = 0
    for seed in range(200):
        torch.manual_seed(seed)
        out, mask = transform(_image(48, 48, (200, 20, 100)), _mask(48, 48))
        rgb = (out * std + mean)[:, mask != 255] * 255                 # the image's pixels, padding left out
        assert (rgb.argmax(0) == 0).all(), f"seed {seed}: red is no longer the strongest channel"
        changed += (rgb.mean(1) - torch.tensor([200.0, 20.0, 100.0])).abs().max() > 2
    assert changed > 100                                                # the distortion did run


@pytest.mark.parametrize("augment", ["light", "none"])
def test_light_seg_eval_keeps_the_mask_and_resizes_the_image(augment):
    image = tv_tensors.Image(torch.randint(0, 256, (3, 100, 150), dtype=torch.uint8))
    mask = torch.randint(0, 4, (100, 150))
    out, kept = task_transforms("seg", augment, False, 64)(image, tv_tensors.Mask(mask))
    assert out.shape == (3, 64, 64) and out.dtype == torch.float32
    assert torch.equal(kept, mask) and kept.dtype == torch.int64       # scored at its own size, as the paper path
    assert torch.equal(task_transforms("seg", augment, False, 64)(image), out)   # predict: the image alone
    trained, resized = task_transforms("seg", augment, True, 64)(image, tv_tensors.Mask(mask))
    assert trained.shape == (3, 64, 64) and resized.shape == (64, 64)   # training resizes both
    assert set(resized.unique().tolist()) <= set(mask.unique().tolist())


def test_light_seg_eval_batches_of_shapes_collate_at_the_scene_size():
    transform = task_transforms("seg", "light", False, 32)
    val = ShapesSegmentation(2, seed=0, split="val", image_size=96, transform=transform)   # all scenes 96 x 96
    images, masks = default_collate([val[0], val[1]])
    assert images.shape == (2, 3, 32, 32) and masks.shape == (2, 96, 96)
