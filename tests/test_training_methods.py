"""SSL methods: loss math against naive references, and each method's loss falls on a tiny batch."""

import math

import pytest
import torch
import torch.nn.functional as F

from sept.errors import SeptError
from sept.training.encoder import build_backbone
from sept.training.methods import build_method
from sept.training.moco import moco_loss
from sept.training.momentum import cosine_momentum, ema_update
from sept.training.schedule import learning_rate
from sept.training.simclr import nt_xent_loss

torch.set_num_threads(1)


def _naive_nt_xent(z1, z2, temperature):
    """The SimCLR paper's loss, one anchor at a time."""
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    n = z1.shape[0]
    total = 0.0
    for i in range(2 * n):
        positive = (i + n) % (2 * n)
        sims = [torch.dot(z[i], z[j]) / temperature for j in range(2 * n) if j != i]
        denominator = torch.logsumexp(torch.stack(sims), dim=0)
        total += -(torch.dot(z[i], z[positive]) / temperature - denominator)
    return total / (2 * n)


def test_nt_xent_matches_the_paper():
    torch.manual_seed(0)
    z1, z2 = torch.randn(5, 7), torch.randn(5, 7)
    ours = nt_xent_loss(z1, z2, z1, z2, first_row=0, temperature=0.3)
    assert torch.allclose(ours, _naive_nt_xent(z1, z2, 0.3), atol=1e-5)


def test_nt_xent_with_gathered_keys_equals_the_full_batch_loss():
    # Rank r of 2 sees its rows as queries and everyone's as keys; the mean over ranks is the
    # loss of the whole batch.
    torch.manual_seed(1)
    z1, z2 = torch.randn(8, 6), torch.randn(8, 6)
    full = nt_xent_loss(z1, z2, z1, z2, 0, 0.2)
    per_rank = [nt_xent_loss(z1[r * 4 : (r + 1) * 4], z2[r * 4 : (r + 1) * 4], z1, z2, r * 4, 0.2) for r in range(2)]
    assert torch.allclose(full, sum(per_rank) / 2, atol=1e-6)


def test_moco_loss_is_cross_entropy_on_the_positive():
    q = F.normalize(torch.tensor([[1.0, 0.0]]), dim=1)
    k = q.clone()
    queue = torch.tensor([[0.0, 1.0], [-1.0, 0.0]])
    expected = -math.log(math.exp(1 / 0.5) / (math.exp(1 / 0.5) + math.exp(0) + math.exp(-1 / 0.5)))
    assert moco_loss(q, k, queue, 0.5).item() == pytest.approx(expected, rel=1e-5)


def test_momentum_helpers():
    assert cosine_momentum(0.99, 0.0) == pytest.approx(0.99)
    assert cosine_momentum(0.99, 0.5) == pytest.approx(0.995)
    assert cosine_momentum(0.99, 1.0) == pytest.approx(1.0)
    target, online = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    before = target.weight.detach().clone()
    ema_update(target, online, 0.9)
    assert torch.allclose(target.weight, 0.9 * before + 0.1 * online.weight)


def test_learning_rate_schedule():
    assert learning_rate(0, total_steps=10, base_lr=1.0, warmup_steps=2) == pytest.approx(0.5)
    assert learning_rate(2, total_steps=10, base_lr=1.0, warmup_steps=2) == pytest.approx(1.0)
    assert learning_rate(10, total_steps=10, base_lr=1.0, warmup_steps=2) == pytest.approx(0.0)
    assert learning_rate(6, total_steps=10, base_lr=1.0) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.6)))


@pytest.mark.parametrize("name", ["simclr", "moco", "byol"])
def test_loss_is_finite_and_falls(name):
    torch.manual_seed(0)
    backbone, dim = build_backbone("resnet18_small", width=4)
    method = build_method(name, backbone, dim, temperature=0.2, momentum=0.99)
    if name == "moco":
        # The queue holds the previous batch's keys (other images), so from step 2 on the
        # negatives are real; the loss is compared from there.
        method.queue = method.queue[:16].clone()
    optimizer = torch.optim.Adam([p for p in method.parameters() if p.requires_grad], lr=3e-3)
    batches = [torch.randn(8, 3, 16, 16) for _ in range(4)]
    losses = []
    for step in range(22):
        images = batches[step % len(batches)]
        # Two noisy "views" of the same 8 images.
        x1 = images + 0.1 * torch.randn_like(images)
        x2 = images + 0.1 * torch.randn_like(images)
        loss = method(x1, x2)
        assert torch.isfinite(loss)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        method.momentum_update((step + 1) / 22)
        losses.append(loss.item())
    assert sum(losses[-4:]) / 4 < sum(losses[2:6]) / 4, losses


def test_moco_queue_advances_and_wraps():
    backbone, dim = build_backbone("resnet18_small", width=4)
    moco = build_method("moco", backbone, dim, temperature=0.2, momentum=0.99)
    moco.queue = moco.queue[:20].clone()
    before = moco.queue.clone()
    moco(torch.randn(6, 3, 8, 8), torch.randn(6, 3, 8, 8))  # enqueues 12 keys
    assert int(moco.queue_ptr) == 12
    assert torch.equal(moco.queue[12:], before[12:]) and not torch.equal(moco.queue[:12], before[:12])
    moco(torch.randn(6, 3, 8, 8), torch.randn(6, 3, 8, 8))
    assert int(moco.queue_ptr) == 4


def test_momentum_targets_follow_the_online_network():
    backbone, dim = build_backbone("resnet18_small", width=4)
    byol = build_method("byol", backbone, dim, temperature=0.2, momentum=0.5)
    with torch.no_grad():
        byol.backbone.conv1.weight.add_(1.0)
    target_before = byol.target_backbone.conv1.weight.clone()
    byol.momentum_update(0.0)
    expected = 0.5 * target_before + 0.5 * byol.backbone.conv1.weight
    assert torch.allclose(byol.target_backbone.conv1.weight, expected)
    assert not any(p.requires_grad for p in byol.target_backbone.parameters())


def test_unknown_methods():
    backbone, dim = build_backbone("resnet18_small", width=4)
    with pytest.raises(SeptError, match="unknown SSL method 'dino'"):
        build_method("dino", backbone, dim, temperature=0.2, momentum=0.99)
