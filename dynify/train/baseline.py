"""The fair baseline for a dynamic model: the static network fine-tuned as long, or trained
from scratch where no trained model exists.

Fine-tuning a converted model also adapts its backbone to the data (JPEG images, a new
domain), so comparing it with the original network credits that adaptation to the dynamic
parts. The baseline gets the same data, epochs, augmentation, schedule and loss instead: the
static network trained like a joint run's final exit (SGD with Nesterov momentum, cosine
schedule, 0.5 distillation from its frozen original at temperature 3 + 0.5 cross-entropy).
With `label_weight=1.0` there is no teacher: the labels alone train the model, which is how a
text classifier is trained from scratch (no pretrained text model ships), usually with Adam.
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
from torch.utils.data import DataLoader, Dataset

from dynify.errors import DynifyError
from dynify.frontend.inputs import ExtraInput, Inputs, input_tensors, parse_extra_input
from dynify.frontend.padding import check_pad_id, module_pad_id
from dynify.train.batches import Batches, Preprocessing, call_model, holds_token_ids
from dynify.train.data import IMAGENET_MEAN, IMAGENET_STD, TensorImageDataset
from dynify.train.data.collated import loader_dataset
from dynify.train.distill import lr_factor

OPTIMIZERS = ("sgd", "adam")
SCHEDULES = ("cosine", "constant")

__all__ = ["StaticFinetuneResult", "finetune_static"]


@dataclass
class StaticFinetuneResult:
    """What a run did: per epoch the mean training loss (and the held-out accuracy with
    `validation`), the epoch whose weights the model ended with, and the wall time."""

    epochs: int
    seconds: float
    history: list[dict[str, float]] = field(default_factory=list)
    best_epoch: int | None = None


def finetune_static(
    model: nn.Module,
    data: Dataset | DataLoader | tuple[torch.Tensor, torch.Tensor],
    *,
    epochs: int,
    input_size: int | None = None,
    mean: tuple[float, ...] = IMAGENET_MEAN,
    std: tuple[float, ...] = IMAGENET_STD,
    batch_size: int = 128,
    lr: float = 0.01,
    seed: int = 0,
    kd_temperature: float = 3.0,
    label_weight: float = 0.5,
    optimizer: str = "sgd",
    weight_decay: float = 5e-4,
    schedule: str = "cosine",
    augment: bool = True,
    clip_grad_norm: float | None = None,
    validation: Dataset | DataLoader | None = None,
    trim_padding: bool = False,
    callback: Callable[[dict[str, Any]], None] | None = None,
    extra_input: str | ExtraInput | None = None,
    pad_id: int | None = None,
) -> StaticFinetuneResult:
    """Train the static `model` in place on `data`: the baseline to report a dynamic model
    against.

    `data`: `(images, labels)` tensors (uint8 images are scaled and normalised by `mean` and
    `std`, float ones used as they are) or a Dataset of such images (e.g. a split of the data
    `dynify.finetune` reads), resized to `input_size`; or token ids (a `TextDataset`), passed
    to the model unchanged (no `input_size`, no augmentation).

    The loss is `label_weight` x cross-entropy plus the rest as distillation from a frozen copy
    of `model` at `kd_temperature`; `label_weight=1.0` trains from the labels alone (from
    scratch: no teacher is made). `optimizer`: "sgd" (Nesterov momentum 0.9) or "adam";
    `schedule`: "cosine" or "constant"; `clip_grad_norm` clips the gradient norm (RNNs).
    With `validation` (held-out data, never the test set) each epoch's accuracy on it is
    recorded and the model ends with the weights of its best epoch (early stopping).
    `trim_padding` cuts each batch of token ids after its last column that holds a token: much
    faster on short texts, and exact for models that read a text only up to its last token
    (`TextClassifier`), not for ones that pool over all positions.
    `extra_input` ("lengths", "mask", "mask:int64", as `dynify.convert`'s second input) is for
    a model called as `model(ids, lengths)` or `model(ids, mask)`: they are made from the
    right-padded ids (or taken from items `((ids, lengths), label)`).
    `pad_id` is the token id the texts are padded with (lengths, masks and `trim_padding`
    count with it): by default the `padding_idx` of the model's first embedding, else 0.
    `data` may also be a DataLoader, batched by its own `collate_fn` (`dynify.finetune`'s rule).
    """
    if epochs < 1:
        raise DynifyError(f"epochs must be at least 1, got {epochs}.")
    if not lr > 0:
        raise DynifyError(f"The learning rate must be positive, got {lr}.")
    if not 0.0 <= label_weight <= 1.0:
        raise DynifyError(f"label_weight must be between 0 and 1, got {label_weight}.")
    if optimizer not in OPTIMIZERS:
        raise DynifyError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {optimizer!r}.")
    if schedule not in SCHEDULES:
        raise DynifyError(f"schedule must be one of {', '.join(SCHEDULES)}, got {schedule!r}.")
    if clip_grad_norm is not None and not clip_grad_norm > 0:
        raise DynifyError(f"clip_grad_norm must be positive, got {clip_grad_norm}.")
    extra = None if extra_input is None else parse_extra_input(extra_input)
    pad_id = module_pad_id(model) if pad_id is None else check_pad_id(pad_id)
    if isinstance(data, DataLoader):
        data = loader_dataset(data)
    if isinstance(validation, DataLoader):
        validation = loader_dataset(validation)
    if isinstance(data, tuple | list):
        data = TensorImageDataset(*data)
    tokens = holds_token_ids(data)
    if input_size is None and not tokens:
        raise DynifyError("Give input_size: the resolution images are resized to for the model.")
    preprocessing = Preprocessing(input_size or 0, tuple(mean), tuple(std))
    batches = Batches(
        data,
        preprocessing,
        batch_size=batch_size,
        train=True,
        augment=augment,
        seed=seed,
        extra_input=extra,
        pad_id=pad_id,
    )
    held_out = None
    if validation is not None:
        held_out = Batches(
            validation,
            batches.pre,
            batch_size=max(batch_size, 256),
            extra_input=extra,
            pad_id=pad_id,
        )
    teacher = copy.deepcopy(model).eval() if label_weight < 1.0 else None
    params = [p for p in model.parameters() if p.requires_grad]
    if optimizer == "adam":
        opt: torch.optim.Optimizer = torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    else:
        opt = torch.optim.SGD(params, lr=lr, momentum=0.9, nesterov=True, weight_decay=weight_decay)
    total, step, start = epochs * len(batches), 0, time.perf_counter()
    t = kd_temperature
    result = StaticFinetuneResult(epochs=epochs, seconds=0.0)
    best: tuple[float, dict[str, torch.Tensor]] | None = None
    try:
        for epoch in range(epochs):
            model.train()
            torch.manual_seed(seed * 7919 + epoch)
            loss = torch.zeros(())
            loss_sum, seen = 0.0, 0
            for x, y in batches.epoch(epoch):
                if trim_padding and tokens:
                    x = _trim(x, pad_id)
                for group in opt.param_groups:
                    group["lr"] = lr * lr_factor(schedule, step, total)
                target = None
                if teacher is not None:
                    with torch.no_grad():
                        target = torch.softmax(call_model(teacher, x) / t, -1)
                out = call_model(model, x)
                if target is None:
                    loss = F.cross_entropy(out, y)
                else:
                    kd = F.kl_div(torch.log_softmax(out / t, -1), target, reduction="batchmean")
                    kd = kd * (t * t)
                    loss = (1 - label_weight) * kd + label_weight * F.cross_entropy(out, y)
                opt.zero_grad()
                loss.backward()
                if clip_grad_norm is not None:
                    torch.nn.utils.clip_grad_norm_(params, clip_grad_norm)
                opt.step()
                step += 1
                loss_sum, seen = loss_sum + loss.item(), seen + 1
                if callback is not None:
                    callback({"epoch": epoch, "step": step, "loss": loss.item()})
            record = {
                "epoch": epoch + 1,
                "last_loss": round(loss.item(), 5),
                "mean_loss": round(loss_sum / max(seen, 1), 5),
            }
            if held_out is not None:
                accuracy = _accuracy(model, held_out, trim_padding and tokens, pad_id)
                record["val_acc"] = round(accuracy, 5)
                if best is None or accuracy > best[0]:
                    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
                    best = (accuracy, state)
                    result.best_epoch = epoch + 1
            result.history.append(record)
            if callback is not None:  # after the epoch: its record, `epoch` still 0-based
                callback({**record, "epoch": epoch, "step": step})
    finally:
        model.eval()
    if best is not None:
        model.load_state_dict(best[1])
    else:
        result.best_epoch = epochs
    result.seconds = time.perf_counter() - start
    return result


def _trim(x: Inputs, pad_id: int) -> Inputs:
    """Token ids (and their mask) without the trailing columns that are padding in every row
    (at least one); lengths are unchanged (none reaches past the last such column)."""
    ids, *rest = input_tensors(x)
    used = (ids != pad_id).any(0).nonzero()
    end = int(used.max()) + 1 if len(used) else 1
    if not rest:
        return ids[:, :end]
    extra = rest[0][:, :end] if rest[0].dim() == 2 else rest[0]
    return ids[:, :end], extra


@torch.no_grad()
def _accuracy(model: nn.Module, batches: Batches, trim: bool, pad_id: int) -> float:
    model.eval()
    correct = count = 0
    for x, y in batches.epoch(0):
        out = call_model(model, _trim(x, pad_id) if trim else x)
        correct += int((out.argmax(-1) == y).sum())
        count += len(y)
    model.train()
    return correct / max(count, 1)
