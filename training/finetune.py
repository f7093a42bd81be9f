"""Full fine-tuning of an encoder on a labelled target task: every weight trains, with a new linear
classifier, on the train split; accuracy is measured on the val split.

Small by design (an evaluation, not a training stage): one process, the encoder's own input
size and normalisation, light augmentation (random resized crop with scale (0.5, 1) and
horizontal flip), AdamW with a cosine learning rate, cross entropy, a fixed number of epochs.
BatchNorm layers train too, so the batch size must be at least 2.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torchvision.transforms import v2

from sept.training.encoder import EncoderBundle

log = logging.getLogger(__name__)


def _train_transform(bundle: EncoderBundle) -> v2.Compose:
    return v2.Compose(
        [
            v2.ToImage(),
            v2.RandomResizedCrop(bundle.image_size, scale=(0.5, 1.0), antialias=True),
            v2.RandomHorizontalFlip(),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(list(bundle.mean), list(bundle.std)),
        ]
    )


def finetune_accuracy(
    bundle: EncoderBundle,
    train_images: Sequence[Image.Image],
    train_labels: np.ndarray,
    val_images: Sequence[Image.Image],
    val_labels: np.ndarray,
    *,
    epochs: int = 10,
    lr: float = 1e-3,
    weight_decay: float = 1e-4,
    batch_size: int = 64,
    seed: int = 0,
) -> dict[str, float]:
    """Fine-tunes a copy of ``bundle.model`` (the bundle is left as it was) plus a linear head;
    returns ``{"accuracy": val accuracy, "train_loss": mean loss of the last epoch, "epochs": ...}``."""
    if len(train_images) < 2:
        raise ValueError("fine-tuning needs at least two training images")
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    device = bundle.device
    num_classes = int(max(np.max(train_labels), np.max(val_labels))) + 1
    model = nn.Sequential(copy.deepcopy(bundle.model), nn.Linear(bundle.dim, num_classes)).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    batch_size = max(2, min(batch_size, len(train_images)))
    steps_per_epoch = math.ceil(len(train_images) / batch_size)
    total = epochs * steps_per_epoch
    augment = _train_transform(bundle)
    labels = torch.as_tensor(np.asarray(train_labels), dtype=torch.long)
    rgb = [im.convert("RGB") for im in train_images]
    step, last_losses = 0, []
    for _epoch in range(epochs):
        model.train()
        order = torch.randperm(len(rgb), generator=generator)
        last_losses = []
        for start in range(0, len(order), batch_size):
            index = order[start : start + batch_size]
            if len(index) < 2:  # BatchNorm cannot train on one image
                continue
            x = torch.stack([augment(rgb[i]) for i in index.tolist()]).to(device)
            y = labels[index].to(device)
            for group in optimizer.param_groups:
                group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / total))
            loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            last_losses.append(loss.item())
            step += 1
    model.eval()
    correct = 0
    with torch.inference_mode():
        for start in range(0, len(val_images), 256):
            chunk = val_images[start : start + 256]
            x = torch.stack([bundle.preprocess(im) for im in chunk]).to(device)
            predicted = model(x).argmax(dim=1).cpu().numpy()
            correct += int((predicted == np.asarray(val_labels[start : start + len(chunk)])).sum())
    accuracy = correct / len(val_images)
    log.info("fine-tuned %s for %d epochs: val accuracy %.4f", bundle.identity, epochs, accuracy)
    return {
        "accuracy": accuracy,
        "train_loss": float(np.mean(last_losses)) if last_losses else float("nan"),
        "epochs": epochs,
    }
