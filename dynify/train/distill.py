"""Fine-tuning a dynamic model's new parts by self-distillation from the static network.

The loop knows nothing about strategies: each batch it asks the model for
`training_loss(x, teacher_logits, labels, LossConfig(...))` and steps the optimizer. Two modes:

- `heads`: the static network is frozen (eval mode, no gradients) and only the parts the
  conversion added learn. The frozen network *is* the teacher, so for early exits one forward
  pass gives both the teacher's logits and the features every head trains on.
- `joint`: everything learns; a frozen copy of the model taken before training is the teacher,
  which keeps the final exit faithful to the original network.

Runs are reproducible (epoch e's batches depend only on the seed and e), write an atomic
checkpoint after every epoch (and on Ctrl-C or SIGTERM), and resume bit-exactly. Under
`torchrun` the loop trains with DistributedDataParallel (gloo on CPU, nccl on GPU).
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from dynify.errors import DataError, DynifyError
from dynify.runtime.model import DynamicModel, ExitCascade
from dynify.train.batches import (
    Batches,
    Preprocessing,
    open_data,
    resolve_preprocessing,
    source_key,
)
from dynify.train.checkpoint import load_checkpoint, save_checkpoint
from dynify.train.data import split_dataset
from dynify.train.losses import LossConfig
from dynify.train.run_env import Interrupted, init_distributed, progress_bar, sigterm_raises

__all__ = ["FinetuneConfig", "FinetuneResult", "Interrupted", "finetune", "lr_factor"]

MODES = ("heads", "joint")
SCHEDULES = ("cosine", "onecycle", "constant")


@dataclass
class FinetuneConfig:
    """Everything that decides the result of a run; a resumed run must match it."""

    mode: str = "heads"
    epochs: int = 5
    batch_size: int = 128
    lr: float | None = None  # heads: 3e-3 (AdamW); joint: 0.01 (SGD), new parts 10x
    weight_decay: float = 5e-4
    schedule: str = "cosine"
    warmup: float = 0.05  # fraction of steps
    seed: int = 0
    augment: bool = True
    kd_temperature: float | None = None  # None: each strategy's own (see train/losses.py)
    label_weight: float = 0.5
    budget: float | None = None
    calibration_fraction: float = 0.1

    def validate(self) -> None:
        if self.mode not in MODES:
            raise DynifyError(f"Unknown fine-tuning mode '{self.mode}'; choose one of {MODES}.")
        if self.schedule not in SCHEDULES:
            raise DynifyError(f"Unknown schedule '{self.schedule}'; choose one of {SCHEDULES}.")
        if self.epochs < 1:
            raise DynifyError(f"epochs must be at least 1, got {self.epochs}.")
        if self.lr is not None and not self.lr > 0:
            raise DynifyError(f"The learning rate must be positive, got {self.lr}.")
        if not 0.0 <= self.calibration_fraction < 1.0:
            raise DataError(
                f"calibration_fraction must be in [0, 1), got {self.calibration_fraction}."
            )
        if self.budget is not None and not 0.0 < self.budget <= 1.0:
            raise DynifyError(f"budget must be in (0, 1], got {self.budget}.")

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else (3e-3 if self.mode == "heads" else 0.01)


@dataclass
class FinetuneResult:
    """What a run did: per-epoch metrics, wall time and the held-out calibration part."""

    config: FinetuneConfig
    history: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0
    epochs_run: int = 0
    resumed_from: int | None = None
    calibration_data: Dataset | None = None
    preprocessing: Preprocessing | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "config": asdict(self.config),
            "history": self.history,
            "seconds": round(self.seconds, 2),
            "epochs_run": self.epochs_run,
            "resumed_from": self.resumed_from,
        }


def finetune(
    dyn: DynamicModel,
    data: Any,
    *,
    mode: str = "heads",
    epochs: int = 5,
    batch_size: int = 128,
    lr: float | None = None,
    weight_decay: float = 5e-4,
    schedule: str = "cosine",
    seed: int = 0,
    augment: bool = True,
    teacher: nn.Module | None = None,
    label_weight: float = 0.5,
    kd_temperature: float | None = None,
    budget: float | None = None,
    split: str | None = None,
    calibration_fraction: float = 0.1,
    preprocessing: Preprocessing | None = None,
    checkpoint: str | Path | None = None,
    resume: bool = False,
    progress: bool = True,
    num_workers: int = 0,
    callback: Callable[[dict[str, Any]], None] | None = None,
) -> FinetuneResult:
    """Fine-tune `dyn` in place by self-distillation; returns the run's history.

    `data`: an ImageFolder directory, a zip of one, a torchvision data set name, tensors
    (`images` or `(images, labels)`; uint8 images are normalised, float ones used as they are)
    or a Dataset. A deterministic `calibration_fraction` of it is held out (returned as
    `result.calibration_data`) and never trained on; 0 trains on everything.

    `mode`: "heads" (the static network frozen: fast) or "joint" (everything trains, distilled
    from a frozen copy of the model as it is now, or from `teacher`, a static nn.Module).
    Labels are used where present (weight `label_weight`), never required.

    `checkpoint`: a file written atomically after every epoch and on interrupt; with `resume`
    the run continues from it and ends with exactly the weights of an uninterrupted run.
    `callback(info)` is called after every optimizer step (info: epoch, step, metrics).
    """
    config = FinetuneConfig(
        mode=mode,
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        weight_decay=weight_decay,
        schedule=schedule,
        seed=seed,
        augment=augment,
        kd_temperature=kd_temperature,
        label_weight=label_weight,
        budget=budget,
        calibration_fraction=calibration_fraction,
    )
    config.validate()
    if not isinstance(dyn, DynamicModel):
        raise DynifyError(
            f"finetune needs a DynamicModel (from dynify.convert), got {type(dyn).__name__}."
        )
    if resume and checkpoint is None:
        raise DynifyError("resume=True needs the checkpoint path of the interrupted run.")
    rank, world = init_distributed()
    if batch_size % world:
        raise DynifyError(f"batch_size {batch_size} must be divisible by the {world} processes.")
    pre = preprocessing or resolve_preprocessing(dyn)
    dataset = open_data(data, dyn, split=split, decode=False)
    fit, calibration = dataset, None
    if calibration_fraction > 0:
        fit, calibration = split_dataset(dataset, calibration_fraction, seed)
    fit = open_data(fit, dyn)  # small images: decoded once, only the part that trains
    batches = Batches(
        fit,
        pre,
        batch_size=batch_size,
        train=True,
        augment=augment,
        seed=seed,
        rank=rank,
        world=world,
        num_workers=num_workers,
    )
    result = FinetuneResult(config, calibration_data=calibration, preprocessing=pre)
    if mode == "joint" and teacher is None:
        teacher = copy.deepcopy(dyn).eval()
        static_teacher: Callable[[torch.Tensor], torch.Tensor] | None = _static_call(teacher)
    elif teacher is not None:
        static_teacher = teacher.eval()
    else:
        static_teacher = None  # heads mode: the frozen network is its own teacher
    if teacher is not None:
        for p in teacher.parameters():
            p.requires_grad_(False)
    flags = [p.requires_grad for p in dyn.parameters()]
    try:
        trainable = _set_trainable(dyn, mode)
        optimizer = _optimizer(dyn, trainable, config)
        total_steps = config.epochs * len(batches)
        start_epoch, skip, step = 0, 0, 0
        ckpt = Path(checkpoint) if checkpoint is not None else None
        if resume and ckpt is not None:
            state = load_checkpoint(ckpt, config, len(fit))
            dyn.load_state_dict(state["weights"])
            optimizer.load_state_dict(state["optimizer"])
            start_epoch, skip, step = state["epoch"], state["batch"], state["step"]
            result.history = list(state["history"])
            result.resumed_from = start_epoch
            torch.set_rng_state(state["rng"])
        loss_module = _LossModule(dyn, config)
        runner: nn.Module = loss_module
        if world > 1:
            from torch.nn.parallel import DistributedDataParallel

            runner = DistributedDataParallel(
                loss_module, find_unused_parameters=not isinstance(dyn, ExitCascade)
            )
        started = time.perf_counter()
        epoch, batch = start_epoch, skip
        with progress_bar(progress and rank == 0) as bar, sigterm_raises():
            try:
                for epoch in range(start_epoch, config.epochs):
                    if epoch != start_epoch or skip == 0:
                        torch.manual_seed(config.seed * 7919 + epoch)
                    _train_mode(dyn, mode)
                    sums: dict[str, float] = {}
                    seen = 0
                    task = bar.start(epoch, config.epochs, len(batches), skip)
                    batch = skip if epoch == start_epoch else 0
                    for x, y in batches.epoch(epoch, skip=batch):
                        _set_lr(optimizer, config, step, total_steps)
                        teacher_logits = None
                        if static_teacher is not None:
                            with torch.no_grad():
                                teacher_logits = static_teacher(x)
                        loss, metrics = runner(x, teacher_logits, y)
                        optimizer.zero_grad(set_to_none=True)
                        loss.backward()
                        _clip_gradients(optimizer)
                        optimizer.step()
                        step += 1
                        batch += 1
                        seen += 1
                        for k, v in metrics.items():
                            sums[k] = sums.get(k, 0.0) + v
                        shown = {k: v / seen for k, v in sums.items()}
                        bar.advance(task, shown)
                        if callback is not None:
                            callback({"epoch": epoch, "step": step, "batch": batch, **metrics})
                    record = {
                        "epoch": epoch + 1,
                        **{k: round(v / max(seen, 1), 5) for k, v in sums.items()},
                    }
                    if skip and epoch == start_epoch:
                        record["partial_resume"] = 1.0
                    result.history.append(record)
                    result.epochs_run += 1
                    batch = 0
                    if ckpt is not None and rank == 0:
                        save_checkpoint(
                            ckpt, dyn, optimizer, config, epoch + 1, 0, step, result, len(fit)
                        )
                    skip = 0
            except KeyboardInterrupt:
                if ckpt is not None and rank == 0:
                    save_checkpoint(
                        ckpt, dyn, optimizer, config, epoch, batch, step, result, len(fit)
                    )
                raise
    finally:
        dyn.eval()
        for p, flag in zip(dyn.parameters(), flags, strict=True):
            p.requires_grad_(flag)
    result.seconds = time.perf_counter() - started
    dyn.spec["preprocessing"] = pre.to_dict()
    dyn.spec["finetune"] = {
        "mode": mode,
        "epochs": config.epochs,
        "seed": seed,
        "calibration_fraction": calibration_fraction,
        "data": source_key(data, split),
        "samples": len(fit),
        "seconds": round(result.seconds, 1),
    }
    return result


def _static_call(model: DynamicModel) -> Callable[[torch.Tensor], torch.Tensor]:
    def call(x: torch.Tensor) -> torch.Tensor:
        with model.static():
            return model(x)

    return call


class _LossModule(nn.Module):
    """Puts `training_loss` behind `forward`, which is what DistributedDataParallel wraps."""

    def __init__(self, dyn: DynamicModel, config: FinetuneConfig):
        super().__init__()
        self.dyn = dyn
        self.loss_config = LossConfig(
            kd_temperature=config.kd_temperature,
            label_weight=config.label_weight,
            budget=config.budget,
        )

    def forward(self, x, teacher_logits, labels):
        loss, metrics = self.dyn.training_loss(x, teacher_logits, labels, self.loss_config)
        accs = [v for k, v in metrics.items() if k.startswith("acc_") and k != "acc_final"]
        if "acc" not in metrics and accs:
            metrics = {**metrics, "acc": sum(accs) / len(accs)}
        return loss, metrics


# --- what trains -----------------------------------------------------------------------------


def static_parameter_names(dyn: DynamicModel) -> set[str]:
    """The parameters the static network uses: those that get a gradient inside `static()`.

    One tiny forward and backward pass finds them, so any strategy's new parts are told apart
    from the backbone without the strategy having to list them.
    """
    named = [(n, p) for n, p in dyn.named_parameters()]
    was_training = dyn.training
    dyn.eval()
    try:
        x = torch.zeros(1, *dyn.input_shape)
        with torch.enable_grad(), dyn.static():
            out = dyn(x)
        grads = torch.autograd.grad(out.float().sum(), [p for _, p in named], allow_unused=True)
    finally:
        dyn.train(was_training)
    return {n for (n, _), g in zip(named, grads, strict=True) if g is not None}


def _set_trainable(dyn: DynamicModel, mode: str) -> list[tuple[str, nn.Parameter]]:
    static = static_parameter_names(dyn) if mode == "heads" else set()
    trainable = []
    for name, p in dyn.named_parameters():
        p.requires_grad_(name not in static)
        if p.requires_grad:
            trainable.append((name, p))
    if not trainable:
        raise DynifyError("This model has no parameters outside the static network to train.")
    return trainable


def _train_mode(dyn: DynamicModel, mode: str) -> None:
    """joint: all in train mode. heads: eval everywhere (BN statistics of the frozen network
    stay as they are) except the largest submodules whose parameters all train."""
    if mode == "joint":
        dyn.train()
        if dyn.joint_recipe.freeze_batchnorm:
            for module in dyn.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.eval()  # running statistics stay; affine parameters still learn
        return
    dyn.eval()

    def visit(module: nn.Module) -> None:
        params = list(module.parameters())
        if params and all(p.requires_grad for p in params):
            module.train()
            return
        for child in module.children():
            visit(child)

    for child in dyn.children():
        visit(child)


class _Optimizers:
    """Several optimizers stepped as one (SGD for the backbone, Adam for the new parts), with
    one state dict, so checkpoints and resume treat them like a single optimizer."""

    def __init__(self, *optimizers: torch.optim.Optimizer):
        self.optimizers = optimizers

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return [g for o in self.optimizers for g in o.param_groups]

    def zero_grad(self, set_to_none: bool = True) -> None:
        for o in self.optimizers:
            o.zero_grad(set_to_none=set_to_none)

    def step(self) -> None:
        for o in self.optimizers:
            o.step()

    def state_dict(self) -> dict[str, Any]:
        return {"optimizers": [o.state_dict() for o in self.optimizers]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        for o, state in zip(self.optimizers, state_dict["optimizers"], strict=True):
            o.load_state_dict(state)


Optimizer = torch.optim.Optimizer | _Optimizers


def _optimizer(
    dyn: DynamicModel, trainable: list[tuple[str, nn.Parameter]], config: FinetuneConfig
) -> Optimizer:
    lr = config.learning_rate
    if config.mode == "heads":
        params = [p for _, p in trainable]
        group = {"params": params, "lr": lr, "base_lr": lr}
        return torch.optim.AdamW([group], lr=lr, weight_decay=config.weight_decay)
    recipe = dyn.joint_recipe
    static = static_parameter_names(dyn)
    backbone = [p for n, p in trainable if n in static]
    new = [p for n, p in trainable if n not in static]
    groups = [{"params": backbone, "lr": lr, "base_lr": lr, "clip": recipe.clip_grad_norm}]
    if new and recipe.new_parts == "sgd":
        scaled = lr * recipe.new_lr_scale
        groups.append({"params": new, "lr": scaled, "base_lr": scaled})
    sgd = torch.optim.SGD(
        groups, lr=lr, momentum=0.9, nesterov=True, weight_decay=config.weight_decay
    )
    if not new or recipe.new_parts == "sgd":
        return sgd
    # Adam's rate decays to a tenth, not to zero: decisions keep adapting to the backbone.
    adam_group = {"params": new, "lr": recipe.new_lr, "base_lr": recipe.new_lr, "floor": 0.1}
    return _Optimizers(sgd, torch.optim.Adam([adam_group], lr=recipe.new_lr))


def _clip_gradients(optimizer: Optimizer) -> None:
    for group in optimizer.param_groups:
        if group.get("clip"):
            torch.nn.utils.clip_grad_norm_(group["params"], group["clip"])


def lr_factor(schedule: str, step: int, total: int, warmup: float = 0.05) -> float:
    """The learning-rate multiplier at `step` of `total` (per step, so resume needs only `step`)."""
    t = min(step / max(total, 1), 1.0)
    if schedule == "constant":
        return 1.0
    if schedule == "onecycle":
        peak = 0.3
        if t < peak:
            return 0.04 + 0.96 * (1 - math.cos(math.pi * t / peak)) / 2
        return 1e-4 + (1 - 1e-4) * (1 + math.cos(math.pi * (t - peak) / (1 - peak))) / 2
    if warmup > 0 and t < warmup:
        return (t + 1 / max(total, 1)) / warmup
    return (1 + math.cos(math.pi * (t - warmup) / max(1 - warmup, 1e-8))) / 2


def _set_lr(optimizer: Optimizer, config: FinetuneConfig, step: int, total: int) -> None:
    factor = lr_factor(config.schedule, step, total, config.warmup)
    for group in optimizer.param_groups:
        group["lr"] = group["base_lr"] * max(factor, group.get("floor", 0.0))
