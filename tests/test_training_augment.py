"""Batched view augmentation (training/augment.py): crops, resampling and per-sample keys."""

import numpy as np
import torch
from torchvision.transforms import InterpolationMode, RandomResizedCrop
from torchvision.transforms.v2 import functional as TF

from sept.training.augment import ViewAugment, ViewPlan, crop_boxes
from sept.training.colour import NUM_PARAMS
from sept.training.keyed_random import keyed_uniforms, sample_keys


def _ramp_image(h, w):
    """A smooth uint8 image: resampling methods that agree on smooth content agree here."""
    y, x = torch.meshgrid(torch.linspace(0, 1, h), torch.linspace(0, 1, w), indexing="ij")
    return (torch.stack([x, y, (x + y) / 2]) * 255).round().to(torch.uint8)


def test_crops_match_torchvision_resized_crop_when_shrinking_and_enlarging():
    augment = ViewAugment(16, color_jitter=0.0, mean=(0, 0, 0), std=(1, 1, 1))
    image = _ramp_image(40, 40)
    boxes = np.array([[[3, 5, 30, 28], [10, 12, 8, 9]]])  # 30 px to 16 (area averaging), 8 px to 16 (bilinear)
    plan = ViewPlan(boxes, np.array([[False, True]]), torch.zeros(1, 2, NUM_PARAMS))
    views = augment.render([image], plan)
    expected = [TF.resized_crop(image, *box, [16, 16], antialias=True).float() / 255 for box in boxes[0].tolist()]
    assert (views.view1[0] - expected[0]).abs().mean() < 1 / 255
    assert (views.view2[0] - expected[1].flip(-1)).abs().mean() < 1 / 255  # mirrored as planned
    mask = torch.arange(40 * 40).remainder(7).to(torch.uint8).view(40, 40)
    cut = augment.render([image], plan, masks=[mask])
    nearest = TF.resized_crop(mask[None], *boxes[0, 1].tolist(), [16, 16], interpolation=InterpolationMode.NEAREST)[0]
    assert torch.equal(cut.mask2[0], nearest.flip(-1)) and torch.equal(cut.view2, views.view2)


def test_crop_boxes_follow_random_resized_crop():
    keys = sample_keys(0, 0, np.arange(4000))
    u = keyed_uniforms(keys, 22)
    boxes = crop_boxes(np.full(4000, 60), np.full(4000, 80), u, 0.2)
    area = boxes[:, 2] * boxes[:, 3] / (60 * 80)
    ratio = boxes[:, 3] / boxes[:, 2]
    assert (boxes[:, 0] >= 0).all() and (boxes[:, 0] + boxes[:, 2] <= 60).all()
    assert (boxes[:, 1] >= 0).all() and (boxes[:, 1] + boxes[:, 3] <= 80).all()
    assert area.min() > 0.18 and area.max() <= 1.0 and 3 / 4 - 0.05 < ratio.min() and ratio.max() < 4 / 3 + 0.05
    torch.manual_seed(0)
    reference = np.array(
        [RandomResizedCrop.get_params(torch.zeros(3, 60, 80), [0.2, 1.0], [3 / 4, 4 / 3]) for _ in range(4000)]
    )
    ref_area = reference[:, 2] * reference[:, 3] / (60 * 80)
    assert (
        abs(area.mean() - ref_area.mean()) < 0.02
        and abs(np.median(ratio) - np.median(reference[:, 3] / reference[:, 2])) < 0.05
    )
    # A strip no try can fit falls back to torchvision's centred crop of ratio 4/3.
    strip = crop_boxes(np.array([4]), np.array([64]), u[:1], 0.9)
    assert strip.tolist() == [[0, 29, 4, 5]]


def test_keyed_uniforms_are_uniform_and_depend_on_key_and_column_only():
    keys = sample_keys(3, 1, np.arange(1000))
    u = keyed_uniforms(keys, 8)
    assert u.shape == (1000, 8) and 0 <= u.min() and u.max() < 1 and abs(u.mean() - 0.5) < 0.01
    assert np.array_equal(keyed_uniforms(keys[[5, 2]], 8), u[[5, 2]])
    assert np.array_equal(keyed_uniforms(keys, 4), u[:, :4])
    assert not np.array_equal(keyed_uniforms(keys, 8, stream=1), u)
    assert not np.array_equal(sample_keys(3, 2, np.arange(1000)), keys)
    assert abs(np.corrcoef(u[:, 0], u[:, 1])[0, 1]) < 0.1


def test_a_samples_views_are_the_same_alone_or_in_any_batch():
    augment = ViewAugment(16, color_jitter=1.0)
    images = [_ramp_image(24, 24).roll(3 * i, -1) for i in range(6)]
    images[5] = images[5][:, :20]  # another image size: resampled in its own group
    keys = np.arange(100, 106, dtype=np.uint64)
    together = augment.views(images, keys)
    assert together.view1.shape == (6, 3, 16, 16) and together.view1.dtype == torch.float32
    order = [4, 5, 0]
    apart = augment.views([images[i] for i in order], keys[order])
    assert torch.allclose(apart.view1, together.view1[order], atol=1e-5)
    assert torch.allclose(apart.view2, together.view2[order], atol=1e-5)
    assert not torch.allclose(together.view1, together.view2)
    other = augment.views(images, keys + np.uint64(1000))  # other keys (another epoch): other views
    assert not torch.allclose(other.view1, together.view1)
