"""The acceleration strategies' schedules (arXiv 2212.05611): extendable cyclic learning rate,
progressive image size and augmentation magnitude, hard positive mining; and LARS."""

import math

import numpy as np
import pytest
import torch

from sept.training.acceleration import AccelerationPlan, box_ious, crop_difficulty, hardest_pairs
from sept.training.augment import ViewAugment
from sept.training.lars import LARS
from sept.training.schedule import cyclic_learning_rate, progressive_image_size, progressive_strength

torch.set_num_threads(1)


def _plan(steps, **kw):
    base = dict(steps=steps, base_lr=1.0, warmup_steps=2, image_size=32)
    return AccelerationPlan(**{**base, **kw})


def test_cyclic_learning_rate_warms_up_and_anneals_every_cycle():
    def lr(s):
        return cyclic_learning_rate(s, cycle_steps=10, base_lr=1.0, warmup_steps=2, cycle_decay=0.5, min_lr_ratio=0.1)  # noqa: E731

    for cycle, peak in enumerate([1.0, 0.5, 0.25]):
        start = 10 * cycle
        assert lr(start) == pytest.approx(peak / 2)  # linear warm-up restarts each cycle
        assert lr(start + 1) == pytest.approx(peak)
        assert lr(start + 9) == pytest.approx(0.1 * peak)  # each cycle ends annealed
        values = [lr(start + t) for t in range(1, 10)]
        assert all(a >= b for a, b in zip(values, values[1:]))
    # The decay is a half cosine between warm-up and the cycle's last step.
    assert lr(5) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 3 / 7)))


def test_cyclic_schedule_is_extendable_and_cosine_is_not():
    short, long = _plan(60, lr_schedule="cyclic", cycle_steps=20), _plan(200, lr_schedule="cyclic", cycle_steps=20)
    assert [short.lr(s) for s in range(60)] == [long.lr(s) for s in range(60)]
    assert short.cycle_ends() == [20, 40, 60]
    cos_short, cos_long = _plan(60), _plan(200)
    assert cos_short.lr(30) != pytest.approx(cos_long.lr(30))
    assert cos_short.cycle_ends() == [60]


def test_progressive_size_and_strength_rise_within_each_cycle_and_restart():
    plan = _plan(
        48, lr_schedule="cyclic", cycle_steps=16, progressive=True, min_image_size=16, min_strength=0.25, stages=4
    )
    sizes = [plan.image_size_at(s) for s in range(48)]
    strengths = [plan.strength_at(s) for s in range(48)]
    assert sizes[:16] == [16] * 4 + [20] * 4 + [24] * 4 + [32] * 4  # multiples of 4, last stage full size
    assert sizes[16:32] == sizes[:16] == sizes[32:]
    assert strengths[:16:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert all(plan.stage(s) == (s % 16) // 4 for s in range(48))
    # Without cycles the whole run is one period; without the flag nothing changes.
    whole = _plan(40, progressive=True, min_image_size=8, min_strength=0.5, stages=2)
    assert [whole.image_size_at(s) for s in (0, 19, 20, 39)] == [8, 8, 32, 32]
    off = _plan(40)
    assert {off.image_size_at(s) for s in range(40)} == {32} and {off.strength_at(s) for s in range(40)} == {1.0}


def test_progressive_helpers_round_and_clamp():
    assert progressive_image_size(0, period=10, stages=3, min_size=10, max_size=30) == 8  # rounded down to 4s
    assert progressive_image_size(9, period=10, stages=3, min_size=10, max_size=30) == 30
    assert progressive_strength(5, period=10, stages=1, min_strength=0.3) == 1.0


def _pixel_iou(a, b, size=64):
    grid = np.zeros((2, size, size), bool)
    for i, (t, l, h, w) in enumerate((a, b)):
        grid[i, t : t + h, l : l + w] = True
    return (grid[0] & grid[1]).sum() / (grid[0] | grid[1]).sum()


def test_crop_iou_matches_pixel_counts_and_hardest_pair_is_least_overlap():
    rng = np.random.default_rng(0)
    for _ in range(50):
        a, b = [
            tuple(int(v) for v in (rng.integers(0, 32), rng.integers(0, 32), rng.integers(1, 32), rng.integers(1, 32)))
            for _ in range(2)
        ]
        assert box_ious(np.array(a), np.array(b)) == pytest.approx(_pixel_iou(a, b))
    same, shifted, disjoint = (
        ((0, 0, 10, 10), (0, 0, 10, 10)),
        ((0, 0, 10, 10), (0, 5, 10, 10)),
        ((0, 0, 5, 5), (6, 6, 5, 5)),
    )
    same, shifted, disjoint = (np.array(p) for p in (same, shifted, disjoint))
    assert crop_difficulty(*same) == 0 and crop_difficulty(*disjoint) == 1
    assert hardest_pairs(np.stack([[same, shifted, disjoint], [same, shifted, same]])).tolist() == [2, 1]


def test_hard_positive_mining_picks_harder_pairs_and_strength_softens_crops():
    augment = ViewAugment(16, min_scale=0.2)
    keys = np.arange(300, dtype=np.uint64)
    sides = np.full(300, 48)

    def ious(**kwargs):
        boxes = augment.plan(keys, sides, sides, **kwargs).boxes
        return box_ious(boxes[:, 0], boxes[:, 1])

    assert np.mean(ious(candidates=4)) < np.mean(ious()) - 0.1
    weak = augment.plan(keys, sides, sides, strength=0.25).boxes.reshape(-1, 4)
    assert (weak[:, 2] * weak[:, 3]).min() >= 0.8 * 48 * 48 * 0.97  # min scale 1 - 0.8 * 0.25, up to rounding
    plain = augment.plan(keys, sides, sides).boxes.reshape(-1, 4)
    assert (plain[:, 2] * plain[:, 3]).min() < 0.5 * 48 * 48
    assert (
        (plain[:, :2] >= 0).all()
        and (plain[:, 0] + plain[:, 2] <= 48).all()
        and (plain[:, 1] + plain[:, 3] <= 48).all()
    )


def test_views_have_the_size_the_schedule_asks_for():
    image = torch.randint(0, 256, (3, 40, 40), dtype=torch.uint8)
    v1, v2 = ViewAugment(32).two_views(image, size=16, strength=0.5, candidates=3)
    assert v1.shape == v2.shape == (3, 16, 16)


def test_lars_scales_each_update_by_its_trust_ratio():
    w = torch.nn.Parameter(torch.tensor([[3.0, 4.0]]))  # norm 5
    b = torch.nn.Parameter(torch.tensor([1.0]))
    opt = LARS(
        [{"params": [w], "weight_decay": 0.1}, {"params": [b], "weight_decay": 0.0, "lars": False}],
        lr=0.5,
        momentum=0.9,
        eta=0.01,
    )
    w.grad, b.grad = torch.tensor([[0.0, 1.0]]), torch.tensor([2.0])
    update = torch.tensor([[0.0, 1.0]]) + 0.1 * torch.tensor([[3.0, 4.0]])
    expected_w = torch.tensor([[3.0, 4.0]]) - 0.5 * (0.01 * 5.0 / update.norm()) * update
    opt.step()
    assert torch.allclose(w, expected_w) and torch.allclose(b, torch.tensor([0.0]))
    w.grad, b.grad = torch.zeros_like(w), torch.zeros_like(b)
    opt.step()  # momentum carries the last update
    assert torch.allclose(b, torch.tensor([-0.9]))


def test_short_cycles_still_end_at_full_size():
    plan = _plan(6, lr_schedule="cyclic", cycle_steps=3, progressive=True, min_image_size=8, min_strength=0.5, stages=4)
    assert [plan.image_size_at(s) for s in range(6)] == [8, 20, 32] * 2
    assert [plan.strength_at(s) for s in range(3)] == pytest.approx([0.5, 0.75, 1.0])


def test_global_batch_lr_scales_linearly_only_when_a_reference_batch_is_given():
    from sept.training.schedule import global_batch_lr

    assert global_batch_lr(0.1, 1024, 256) == pytest.approx(0.4)
    assert global_batch_lr(0.1, 64, 256) == pytest.approx(0.025)
    assert global_batch_lr(0.1, 1024, None) == 0.1
