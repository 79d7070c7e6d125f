"""The fair baseline for a dynamic model: the static network fine-tuned as long.

Fine-tuning a converted model also adapts its backbone to the data (JPEG images, a new
domain), so comparing it with the original network credits that adaptation to the dynamic
parts. The baseline gets the same data, epochs, augmentation, schedule and loss instead: the
static network trained like a joint run's final exit (SGD with Nesterov momentum, cosine
schedule, 0.5 distillation from its frozen original at temperature 3 + 0.5 cross-entropy).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from dynify.errors import DynifyError
from dynify.train.batches import Batches, Preprocessing
from dynify.train.data import IMAGENET_MEAN, IMAGENET_STD, TensorImageDataset
from dynify.train.distill import lr_factor

__all__ = ["StaticFinetuneResult", "finetune_static"]


@dataclass
class StaticFinetuneResult:
    """What a baseline run did: the mean loss of each epoch's last batch and its wall time."""

    epochs: int
    seconds: float
    history: list[dict[str, float]] = field(default_factory=list)


def finetune_static(
    model: nn.Module,
    data: Dataset | tuple[torch.Tensor, torch.Tensor],
    *,
    epochs: int,
    input_size: int,
    mean: tuple[float, ...] = IMAGENET_MEAN,
    std: tuple[float, ...] = IMAGENET_STD,
    batch_size: int = 128,
    lr: float = 0.01,
    seed: int = 0,
    kd_temperature: float = 3.0,
    label_weight: float = 0.5,
    callback: Callable[[dict[str, Any]], None] | None = None,
) -> StaticFinetuneResult:
    """Fine-tune the static `model` in place on `data`, distilling from a frozen copy of
    itself: the baseline to report a dynamic model against.

    `data`: `(images, labels)` tensors (uint8 images are scaled and normalised by `mean` and
    `std`, float ones used as they are) or a Dataset of such images (e.g. a split of the data
    `dynify.finetune` reads), resized to `input_size`.
    """
    if epochs < 1:
        raise DynifyError(f"epochs must be at least 1, got {epochs}.")
    if not lr > 0:
        raise DynifyError(f"The learning rate must be positive, got {lr}.")
    if isinstance(data, tuple | list):
        data = TensorImageDataset(*data)
    teacher = copy.deepcopy(model).eval()
    preprocessing = Preprocessing(input_size, tuple(mean), tuple(std))
    batches = Batches(
        data, preprocessing, batch_size=batch_size, train=True, augment=True, seed=seed
    )
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=5e-4)
    total, step, start = epochs * len(batches), 0, time.perf_counter()
    t = kd_temperature
    result = StaticFinetuneResult(epochs=epochs, seconds=0.0)
    try:
        for epoch in range(epochs):
            model.train()
            torch.manual_seed(seed * 7919 + epoch)
            loss = torch.zeros(())
            for x, y in batches.epoch(epoch):
                for group in opt.param_groups:
                    group["lr"] = lr * lr_factor("cosine", step, total)
                with torch.no_grad():
                    target = torch.softmax(teacher(x) / t, -1)
                out = model(x)
                kd = F.kl_div(torch.log_softmax(out / t, -1), target, reduction="batchmean")
                kd = kd * (t * t)
                loss = (1 - label_weight) * kd + label_weight * F.cross_entropy(out, y)
                opt.zero_grad()
                loss.backward()
                opt.step()
                step += 1
                if callback is not None:
                    callback({"epoch": epoch, "step": step, "loss": loss.item()})
            result.history.append({"epoch": epoch + 1, "last_loss": round(loss.item(), 5)})
    finally:
        model.eval()
    result.seconds = time.perf_counter() - start
    return result
