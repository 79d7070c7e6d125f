"""Fine-tuning a dynamic model's new parts by self-distillation from the static network.

The loop knows nothing about strategies: each batch it asks the model for
`training_loss(x, teacher_logits, labels, LossConfig(...))` and steps the optimizer. Two modes:

- `heads`: the static network is frozen (eval mode, no gradients) and only the parts the
  conversion added learn. The frozen network *is* the teacher, so for early exits one forward
  pass gives both the teacher's logits and the features every head trains on.
- `joint`: everything learns; a frozen copy of the model taken before training is the teacher,
  which keeps the final exit faithful to the original network.

Runs are reproducible (epoch e's batches depend only on the seed and e) and write an atomic
checkpoint after every epoch. Ctrl-C or SIGTERM only asks the loop to stop: it finishes the
batch in flight, checkpoints and raises `Interrupted`, and a resumed run ends bit for bit where
an uninterrupted one would. A non-finite loss stops the run with the last finite weights. Under
`torchrun` the loop trains with DistributedDataParallel (gloo on CPU, nccl on GPU).
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from dynify.errors import DataError, DynifyError
from dynify.heldout import data_key
from dynify.runtime.model import DynamicModel, ExitCascade, TrainingRecord
from dynify.train.batches import (
    Batches,
    Preprocessing,
    call_model,
    model_batch_options,
    open_data,
    resolve_preprocessing,
)
from dynify.train.checkpoint import (
    Position,
    load_checkpoint,
    remove_stale_temporaries,
    restore_rng,
    save_checkpoint,
    weights_fingerprint,
)
from dynify.train.data import split_dataset
from dynify.train.losses import LossConfig
from dynify.train.run_env import (
    Interrupted,
    StopRequest,
    init_distributed,
    interrupt_hook,
    progress_bar,
    stop_signals,
)

__all__ = [
    "FinetuneConfig",
    "FinetuneResult",
    "Interrupted",
    "finetune",
    "lr_factor",
    "warmup_steps",
]

MODES = ("heads", "joint")
# `FinetuneConfig.clip_grad_norm`'s default: see there.
CLIP_GRAD_NORM = 50.0
SCHEDULES = ("cosine", "onecycle", "constant")
# Joint mode's warm-up lasts at least this many steps (`FinetuneConfig.warmup_min_steps`), but
# never more than WARMUP_CAP of the run. SGD on a pretrained backbone needs ~100 small steps
# before it takes the full rate whatever the run's length; 5 % of a 2,000-step run is that
# already, so longer runs keep their schedule.
JOINT_WARMUP_STEPS = 100
WARMUP_CAP = 0.5


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
    # The warm-up's floor in steps (capped at WARMUP_CAP of the run; no floor when warmup is
    # 0); None: JOINT_WARMUP_STEPS in joint mode, 0 in heads mode.
    warmup_min_steps: int | None = None
    seed: int = 0
    augment: bool = True
    kd_temperature: float | None = None  # None: each strategy's own (see train/losses.py)
    label_weight: float = 0.5
    budget: float | None = None
    calibration_fraction: float = 0.1
    # Each parameter group's gradient norm is clipped to this (None: not clipped), unless the
    # strategy's joint recipe clips that group itself. Far above the norms of a healthy run
    # (docs/training.md): it only stops a diverging step, as a short warm-up can cause.
    clip_grad_norm: float | None = CLIP_GRAD_NORM

    def validate(self) -> None:
        if self.mode not in MODES:
            raise DynifyError(f"Unknown fine-tuning mode '{self.mode}'; choose one of {MODES}.")
        if self.schedule not in SCHEDULES:
            raise DynifyError(f"Unknown schedule '{self.schedule}'; choose one of {SCHEDULES}.")
        if self.epochs < 1:
            raise DynifyError(f"epochs must be at least 1, got {self.epochs}.")
        if self.lr is not None and not 0 < self.lr < math.inf:
            raise DynifyError(f"The learning rate must be a positive number, got {self.lr}.")
        if not 0 <= self.weight_decay < math.inf:
            raise DynifyError(f"weight_decay must be a number >= 0, got {self.weight_decay}.")
        if not 0.0 <= self.calibration_fraction < 1.0:
            raise DataError(
                f"calibration_fraction must be in [0, 1), got {self.calibration_fraction}."
            )
        if self.budget is not None and not 0.0 < self.budget <= 1.0:
            raise DynifyError(f"budget must be in (0, 1], got {self.budget}.")
        if self.warmup_min_steps is not None and not (
            isinstance(self.warmup_min_steps, int) and self.warmup_min_steps >= 0
        ):
            raise DynifyError(
                "warmup_min_steps must be a whole number of steps >= 0 (or None: the mode's "
                f"default), got {self.warmup_min_steps}."
            )
        if self.clip_grad_norm is not None and not 0 < self.clip_grad_norm < math.inf:
            raise DynifyError(
                "clip_grad_norm must be a positive number (or None: no clipping), got "
                f"{self.clip_grad_norm}."
            )
        for setting in fields(self):
            value = getattr(self, setting.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise DynifyError(
                    f"The fine-tuning setting {setting.name} must be a finite number, got {value}."
                )

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else (3e-3 if self.mode == "heads" else 0.01)

    @property
    def warmup_floor(self) -> int:
        """The warm-up's floor in steps: `warmup_min_steps`, or the mode's default."""
        if self.warmup_min_steps is not None:
            return self.warmup_min_steps
        return JOINT_WARMUP_STEPS if self.mode == "joint" else 0


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
    config: FinetuneConfig | None = None,
    *,
    mode: str | None = None,
    epochs: int | None = None,
    batch_size: int | None = None,
    lr: float | None = None,
    weight_decay: float | None = None,
    schedule: str | None = None,
    warmup: float | None = None,
    warmup_min_steps: int | None = None,
    seed: int | None = None,
    augment: bool | None = None,
    kd_temperature: float | None = None,
    label_weight: float | None = None,
    budget: float | None = None,
    calibration_fraction: float | None = None,
    clip_grad_norm: float | None = None,
    split: str | None = None,
    teacher: nn.Module | None = None,
    preprocessing: Preprocessing | None = None,
    checkpoint: str | Path | None = None,
    resume: bool = False,
    progress: bool = True,
    num_workers: int = 0,
    callback: Callable[[dict[str, Any]], None] | None = None,
) -> FinetuneResult:
    """Fine-tune `dyn` in place by self-distillation; returns the run's history.

    The settings come from `config` (a `FinetuneConfig`; its defaults without one), and a
    setting given as a keyword overrides the config's (the caller's config is not modified).

    `data`: an ImageFolder directory, a zip of one, a torchvision data set name, tensors
    (`images` or `(images, labels)`; uint8 images are normalised, float ones used as they are)
    or a Dataset. A deterministic `calibration_fraction` of it is held out (returned as
    `result.calibration_data`) and never trained on; 0 trains on everything. A key of the data
    is recorded in `dyn.training_record`, so `calibrate` on the same data takes that part.

    `mode`: "heads" (the static network frozen: fast) or "joint" (everything trains, distilled
    from a frozen copy of the model as it is now, or from `teacher`, a static nn.Module called
    as the original network is: `teacher(ids, lengths)` for a model converted with lengths).
    Labels are used where present (weight `label_weight`), never required.

    `checkpoint`: a file written atomically at the start, after every epoch and when Ctrl-C or
    SIGTERM stops the run (at the next batch boundary; `Interrupted` is raised then). With
    `resume` the run continues from it and ends with exactly the weights of an uninterrupted run; `dyn` must
    then hold the weights the run started from (e.g. the artifact loaded again).
    `callback(info)` is called after every optimizer step (info: epoch, step, metrics).
    A non-finite loss, or a step that makes weights non-finite, raises DynifyError and leaves
    `dyn` with its weights from before that step. Every step clips each parameter group's
    gradient norm to `clip_grad_norm` (a keyword None: the config's; a config's None: no clip)
    unless the strategy's joint recipe clips that group itself.
    """
    given = {
        "mode": mode,
        "epochs": epochs,
        "batch_size": batch_size,
        "lr": lr,
        "weight_decay": weight_decay,
        "schedule": schedule,
        "warmup": warmup,
        "warmup_min_steps": warmup_min_steps,
        "seed": seed,
        "augment": augment,
        "kd_temperature": kd_temperature,
        "label_weight": label_weight,
        "budget": budget,
        "calibration_fraction": calibration_fraction,
        "clip_grad_norm": clip_grad_norm,
    }
    config = replace(
        config or FinetuneConfig(), **{k: v for k, v in given.items() if v is not None}
    )
    config.validate()
    mode, epochs, batch_size, seed = config.mode, config.epochs, config.batch_size, config.seed
    augment, calibration_fraction = config.augment, config.calibration_fraction
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
        **model_batch_options(dyn),
    )
    pre = batches.pre  # the identity for token ids, whatever was asked
    result = FinetuneResult(config, calibration_data=calibration, preprocessing=pre)
    if mode == "joint" and teacher is None:
        teacher = copy.deepcopy(dyn).eval()
        static_teacher: Callable[..., torch.Tensor] | None = _static_call(teacher)
    elif teacher is not None:
        static_teacher = teacher.eval()
    else:
        static_teacher = None  # heads mode: the frozen network is its own teacher
    if teacher is not None:
        for p in teacher.parameters():
            p.requires_grad_(False)
    flags = [p.requires_grad for p in dyn.parameters()]
    started = time.perf_counter()
    try:
        trainable = _set_trainable(dyn, mode)
        optimizer = _optimizer(dyn, trainable, config)
        ckpt = Path(checkpoint) if checkpoint is not None else None
        origin = weights_fingerprint(dyn) if ckpt is not None else ""
        if ckpt is not None and rank == 0:
            remove_stale_temporaries(ckpt)
        position = Position()
        if resume and ckpt is not None:
            state = load_checkpoint(ckpt, config, len(fit), dyn, origin)
            _restore(ckpt, dyn, optimizer, state)
            position = Position(**state["position"])
            result.history = list(state["history"])
            result.resumed_from = position.epoch
        loss_module = _LossModule(dyn, config)
        runner: nn.Module = loss_module
        if world > 1:
            from torch.nn.parallel import DistributedDataParallel

            runner = DistributedDataParallel(
                loss_module, find_unused_parameters=not isinstance(dyn, ExitCascade)
            )
        loop = _Loop(
            dyn=dyn,
            config=config,
            optimizer=optimizer,
            runner=runner,
            teacher=static_teacher,
            batches=batches,
            trainable=[p for _, p in trainable],
            result=result,
            checkpoint=ckpt if rank == 0 else None,
            samples=len(fit),
            origin=origin,
            world=world,
            callback=callback,
        )
        if not resume:
            loop.save()  # an unwritable checkpoint fails now, not after an epoch's work
        with progress_bar(progress and rank == 0) as bar, stop_signals() as stop:
            loop.run(position, bar, stop)
    finally:
        dyn.eval()
        for p, flag in zip(dyn.parameters(), flags, strict=True):
            p.requires_grad_(flag)
    result.seconds = time.perf_counter() - started
    dyn.spec["preprocessing"] = pre.to_dict()
    dyn.spec["finetune"] = TrainingRecord(
        mode=mode,
        epochs=config.epochs,
        seed=seed,
        calibration_fraction=calibration_fraction,
        data=data_key(data, split),
        samples=len(fit),
        seconds=round(result.seconds, 1),
    ).to_dict()
    return result


def _static_call(model: DynamicModel) -> Callable[..., torch.Tensor]:
    def call(*x: torch.Tensor) -> torch.Tensor:
        with model.static():
            return model(*x)

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
    frozen = [p.requires_grad for _, p in named]  # fine-tuning in heads mode freezes some
    was_training = dyn.training
    dyn.eval()
    try:
        for _, p in named:
            p.requires_grad_(True)
        x = dyn.random_input(1, torch.Generator().manual_seed(0))
        with torch.enable_grad():  # whatever the caller's grad mode
            with dyn.static():
                out = dyn(x)
            grads = torch.autograd.grad(out.float().sum(), [p for _, p in named], allow_unused=True)
    finally:
        dyn.train(was_training)
        for (_, p), grad in zip(named, frozen, strict=True):
            p.requires_grad_(grad)
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


def _clip_gradients(optimizer: Optimizer, limit: float | None) -> None:
    """Clip each parameter group's gradient norm: to the strategy's joint recipe's clip where it
    sets one (the backbone), else to `limit` (`FinetuneConfig.clip_grad_norm`)."""
    for group in optimizer.param_groups:
        clip = group.get("clip") or limit
        if clip:
            torch.nn.utils.clip_grad_norm_(group["params"], clip)


def warmup_fraction(warmup: float, total: int, min_steps: int = 0) -> float:
    """The share of `total` steps the warm-up lasts: `warmup`, lengthened to `min_steps` steps
    but to no more than WARMUP_CAP of the run (no warm-up stays none). Where the fraction is
    long enough already it is returned as it is, so those runs keep their schedule exactly."""
    if warmup <= 0 or warmup * total >= min_steps:
        return warmup
    return max(warmup, min(min_steps / max(total, 1), WARMUP_CAP))


def lr_factor(
    schedule: str, step: int, total: int, warmup: float = 0.05, min_steps: int = 0
) -> float:
    """The learning-rate multiplier at `step` of `total` (per step, so resume needs only `step`).

    cosine: a linear warm-up over `warmup_fraction(warmup, total, min_steps)` of the steps,
    then a cosine decay to zero."""
    t = min(step / max(total, 1), 1.0)
    warmup = warmup_fraction(warmup, total, min_steps)
    if schedule == "constant":
        return 1.0
    if schedule == "onecycle":
        peak = 0.3
        if t < peak:
            return 0.04 + 0.96 * (1 - math.cos(math.pi * t / peak)) / 2
        return 1e-4 + (1 - 1e-4) * (1 + math.cos(math.pi * (t - peak) / (1 - peak))) / 2
    if warmup > 0 and t < warmup:  # the warm-up's last step reaches the full rate, not above
        return min((t + 1 / max(total, 1)) / warmup, 1.0)
    return (1 + math.cos(math.pi * (t - warmup) / max(1 - warmup, 1e-8))) / 2


def warmup_steps(warmup: float, total: int, min_steps: int = 0) -> int:
    """How many of `total` steps the cosine schedule's warm-up lasts (see `warmup_fraction`)."""
    warmup = warmup_fraction(warmup, total, min_steps)
    return min(total, math.ceil(warmup * total)) if warmup > 0 else 0


def _set_lr(optimizer: Optimizer, config: FinetuneConfig, step: int, total: int) -> None:
    factor = lr_factor(config.schedule, step, total, config.warmup, config.warmup_floor)
    for group in optimizer.param_groups:
        group["lr"] = group["base_lr"] * max(factor, group.get("floor", 0.0))


# --- the loop ------------------------------------------------------------------------------------


def _restore(path: Path, dyn: DynamicModel, optimizer: Optimizer, state: dict[str, Any]) -> None:
    """Weights, optimizer and random states from a checkpoint `load_checkpoint` accepted."""
    try:
        dyn.load_state_dict(state["weights"])
        optimizer.load_state_dict(state["optimizer"])
        restore_rng(state["rng"])
    except (KeyError, TypeError, ValueError, RuntimeError, IndexError) as exc:
        raise DynifyError(
            f"The checkpoint '{path}' does not fit this run ({type(exc).__name__}: {exc}); "
            "start afresh without --resume."
        ) from exc


class _Snapshot:
    """The state one batch changes before it is committed (trainable weights, buffers such as
    batch-norm statistics), copied at the batch start so a failed batch can be undone."""

    def __init__(self, dyn: DynamicModel, trainable: list[nn.Parameter]):
        self.live = [p.data for p in trainable] + list(dyn.buffers())
        self.saved = [t.detach().clone() for t in self.live]

    def take(self) -> None:
        with torch.no_grad():
            torch._foreach_copy_(self.saved, self.live)

    def restore(self) -> None:
        with torch.no_grad():
            torch._foreach_copy_(self.live, self.saved)


class _Loop:
    """Epochs of batches, committed one at a time.

    A batch is drawn, run forward and backward, stepped and then counted; a stop request
    (signal) is acted on only once the batch is counted, so every checkpoint describes a state
    between two batches. A non-finite loss, or weights made non-finite by a step, undoes the
    batch and stops the run with the weights it had before.
    """

    def __init__(
        self,
        *,
        dyn: DynamicModel,
        config: FinetuneConfig,
        optimizer: Optimizer,
        runner: nn.Module,
        teacher: Callable[..., torch.Tensor] | None,
        batches: Batches,
        trainable: list[nn.Parameter],
        result: FinetuneResult,
        checkpoint: Path | None,
        samples: int,
        origin: str,
        world: int,
        callback: Callable[[dict[str, Any]], None] | None,
    ):
        self.dyn, self.config, self.optimizer, self.runner = dyn, config, optimizer, runner
        self.teacher, self.batches, self.trainable = teacher, batches, trainable
        self.result, self.checkpoint = result, checkpoint
        self.samples, self.origin, self.world, self.callback = samples, origin, world, callback
        self.device = trainable[0].device
        self.snapshot = _Snapshot(dyn, trainable)
        self.at = Position()
        self.in_batch = False  # drawn but not counted yet: its effects are undone on an error

    def run(self, position: Position, bar: Any, stop: StopRequest) -> None:
        self.at = position
        try:
            while self.at.epoch < self.config.epochs:
                self._epoch(bar, stop)
                self.save()  # the epoch is counted: (epoch + 1, batch 0)
                if stop.agreed(self.world, self.device):
                    self._stop("stopped after the epoch's checkpoint")
        except Interrupted:
            raise
        except KeyboardInterrupt:
            # Raised by a callback or by code inside the batch, not by a signal (those only set
            # the flag), or a second Ctrl-C (give up: the last checkpoint written stays).
            if stop.gave_up:
                raise
            if self.in_batch:
                self.snapshot.restore()
                self.in_batch = False
            self.save()
            raise

    def _epoch(self, bar: Any, stop: StopRequest) -> None:
        at, config, batches = self.at, self.config, self.batches
        if at.batch == 0:  # else the checkpoint restored the random state mid-epoch
            torch.manual_seed(config.seed * 7919 + at.epoch)
        _train_mode(self.dyn, config.mode)
        task = bar.start(at.epoch, config.epochs, len(batches), at.batch)
        for x, y in batches.epoch(at.epoch, skip=at.batch):
            metrics = self._batch(x, y)
            bar.advance(task, {k: v / at.seen for k, v in at.sums.items()})
            if self.callback is not None:
                self.callback({"epoch": at.epoch, "step": at.step, "batch": at.batch, **metrics})
            interrupt_hook("batch_end", at.step)
            if at.batch < len(batches) and stop.agreed(self.world, self.device):
                self.save()
                self._stop("stopped between two batches")
        record = {"epoch": at.epoch + 1}
        record.update({k: round(v / max(at.seen, 1), 5) for k, v in at.sums.items()})
        self.result.history.append(record)
        self.result.epochs_run += 1
        self.at = Position(epoch=at.epoch + 1, batch=0, step=at.step)

    def _batch(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
        at, optimizer = self.at, self.optimizer
        current = at.step + 1  # the hooks name the step in progress
        interrupt_hook("batch_start", current)
        self.snapshot.take()
        self.in_batch = True
        _set_lr(optimizer, self.config, at.step, self.config.epochs * len(self.batches))
        teacher_logits = None
        if self.teacher is not None:
            with torch.no_grad():
                teacher_logits = call_model(self.teacher, x)
        loss, metrics = self.runner(x, teacher_logits, y)
        interrupt_hook("forward", current)
        if not self._agreed_finite(loss):
            self._stop_non_finite(f"the loss became {loss.item()}")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        _clip_gradients(optimizer, self.config.clip_grad_norm)
        optimizer.step()
        interrupt_hook("after_step", current)
        if not bool(torch.stack([torch.isfinite(p).all() for p in self.trainable]).all()):
            self._stop_non_finite("the optimizer step made weights infinite or NaN")
        # Counted: from here on the batch belongs to the run, whatever happens next.
        at.step, at.batch, at.seen = at.step + 1, at.batch + 1, at.seen + 1
        for k, v in metrics.items():
            at.sums[k] = at.sums.get(k, 0.0) + v
        self.in_batch = False
        return metrics

    def _agreed_finite(self, loss: torch.Tensor) -> bool:
        finite = torch.isfinite(loss.detach()).all().float().reshape(1)
        if self.world > 1:
            import torch.distributed as dist

            dist.all_reduce(finite, op=dist.ReduceOp.MIN)
        return bool(finite.item())

    def _stop_non_finite(self, what: str) -> None:
        self.snapshot.restore()
        self.in_batch = False
        config = self.config
        total = config.epochs * len(self.batches)
        clip = "off" if config.clip_grad_norm is None else f"{config.clip_grad_norm:g}"
        pre = self.result.preprocessing
        norm = f" (now {list(pre.mean)} and {list(pre.std)})" if pre is not None else ""
        raise DynifyError(
            f"Fine-tuning stopped at epoch {self.at.epoch + 1}, step {self.at.step + 1}: {what}. "
            "The model keeps its weights from before that step; no checkpoint or artifact is "
            f"written for it; the last checkpoint written, if any, stays. Try a smaller learning "
            f"rate (lr, --lr: now {config.learning_rate:g}), a longer warm-up (warmup, --warmup: "
            f"now {config.warmup:g} of the steps, at least {config.warmup_floor} steps "
            f"(warmup_min_steps, --warmup-min-steps): "
            f"{warmup_steps(config.warmup, total, config.warmup_floor)} of {total}) or more "
            f"steps, a tighter gradient clip (clip_grad_norm, --clip-grad-norm: now {clip}), check --mean and --std{norm}, and check that the data holds no NaN or "
            "infinite values."
        )

    def _stop(self, why: str) -> None:
        if self.world > 1:  # torchrun ends every rank once one exits: rank 0 must have saved
            import torch.distributed as dist

            dist.barrier()
        raise Interrupted(why)

    def save(self) -> None:
        if self.checkpoint is None:
            return
        save_checkpoint(
            self.checkpoint,
            self.dyn,
            self.optimizer,
            self.config,
            self.at,
            self.result.history,
            samples=self.samples,
            origin=self.origin,
        )
