"""Every exit's logits on a data set, collected in one pass: all that calibration and
evaluation of early exits need, so neither runs the network again."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from dynify.errors import DataError, StrategyError
from dynify.runtime.early_exit import EarlyExitModel
from dynify.runtime.model import (
    DecisionScalars,
    DynamicModel,
    ExitCascade,
    GatedExits,
    PerSampleExits,
)
from dynify.train.batches import (
    Batches,
    Preprocessing,
    model_batch_options,
    open_data,
    resolve_preprocessing,
)


@dataclass
class ExitOutputs:
    """The logits of every exit (the last: the final classifier) on a data set, with labels.

    Without labels (`labels` None) accuracy means agreement with the final classifier.
    """

    logits: list[torch.Tensor]
    labels: torch.Tensor | None
    exit_macs: list[int]
    static_macs: int
    raw: bool = True  # each head's own logits (False: what an ensembled model's exits answer)
    # Models whose exit costs depend on the sample (`PerSampleExits`): MACs of leaving at each
    # exit [K + 1, N] and which exits are open to each sample [K, N]; None: `exit_macs` for all.
    sample_macs: torch.Tensor | None = None
    available: torch.Tensor | None = None
    # The static network's predictions [N] where the final exit is not the static network
    # (decision scalars such as a jump threshold change what it reads); None: it is.
    static_preds: torch.Tensor | None = None
    # Gated exits (`GatedExits`): every gate's logits [K, N], which decide instead of a policy
    # on the exits' logits; None for exit cascades.
    gate_logits: torch.Tensor | None = None

    @property
    def num_samples(self) -> int:
        return int(self.logits[0].shape[0])

    def reference(self) -> torch.Tensor:
        """The labels, or without them the static network's predictions."""
        return self.labels if self.labels is not None else self.static_predictions()

    def static_predictions(self) -> torch.Tensor:
        return self.static_preds if self.static_preds is not None else self.logits[-1].argmax(-1)

    def static_correct(self) -> torch.Tensor:
        """[N] bool: is the static network right on sample n (the target's reference)."""
        return self.static_predictions() == self.reference()

    def correct(self) -> torch.Tensor:
        """[exits + 1, N] bool: is exit i right on sample n."""
        ref = self.reference()
        return torch.stack([lg.argmax(-1) == ref for lg in self.logits])

    def cost_fractions(self) -> torch.Tensor:
        """[K + 1] what leaving at each exit costs (the most a sample can spend there)."""
        return torch.tensor(self.exit_macs, dtype=torch.float64) / self.static_macs

    def sample_cost_fractions(self) -> torch.Tensor:
        """[K + 1, N] what leaving at exit i costs sample n, as a fraction of the static MACs."""
        if self.sample_macs is not None:
            return self.sample_macs.double() / self.static_macs
        return self.cost_fractions()[:, None].expand(-1, self.num_samples)

    def open_exits(self) -> torch.Tensor:
        """[K, N] bool: can sample n leave at exit i (all True unless the model says)."""
        if self.available is not None:
            return self.available
        k = len(self.logits) - 1
        return torch.ones(k, self.num_samples, dtype=torch.bool)


@contextmanager
def one_thread() -> Iterator[None]:
    """Thousands of tiny tensor ops run faster on one thread than fighting over several."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def data_batches(
    dyn: DynamicModel,
    data: Any,
    *,
    split: str | None = None,
    batch_size: int = 256,
    preprocessing: Preprocessing | None = None,
) -> Batches:
    """Evaluation batches (no augmentation, fixed order) over `data`."""
    if isinstance(data, Batches):
        return data
    pre = preprocessing or resolve_preprocessing(dyn)
    return Batches(
        open_data(data, dyn, split=split), pre, batch_size=batch_size, **model_batch_options(dyn)
    )


@torch.no_grad()
def collect_outputs(
    dyn: DynamicModel,
    data: Any,
    *,
    split: str | None = None,
    batch_size: int = 256,
    preprocessing: Preprocessing | None = None,
    raw: bool = False,
) -> ExitOutputs:
    """One pass over `data` keeping every exit's logits (early-exit models): what each exit
    answers, or with `raw` each head's own logits (to fit an ensemble on). Gated exits
    (`GatedExits`) keep every gate's logits too."""
    if not isinstance(dyn, ExitCascade | GatedExits):
        raise StrategyError(f"{type(dyn).__name__} has no exits whose logits could be collected.")
    gated = isinstance(dyn, GatedExits)
    batches = (
        data
        if isinstance(data, Batches)
        else data_batches(
            dyn, data, split=split, batch_size=batch_size, preprocessing=preprocessing
        )
    )
    was_training = dyn.training
    dyn.eval()
    per_exit: list[list[torch.Tensor]] = []
    labels, sample_macs, available, gate_logits = [], [], [], []
    per_sample = isinstance(dyn, PerSampleExits)
    # with decision scalars (a jump threshold) the final exit may read less than the static
    # network: a target's reference is then the static network itself
    static_preds: list[torch.Tensor] = []
    own_static = isinstance(dyn, DecisionScalars) and bool(dyn.decision_scalars())
    try:
        for x, y in batches.epoch(0):
            if own_static:
                with dyn.static():
                    static_preds.append(dyn(x).argmax(-1))
            raw_heads = raw and isinstance(dyn, EarlyExitModel)
            if gated:
                gates, outs = dyn.gated_exit_outputs(x)
                gate_logits.append(torch.stack(gates).float())
            elif raw_heads:
                outs = dyn.exit_logits(x, raw=True)
            else:
                outs = dyn.exit_logits(x)
            if not per_exit:
                per_exit = [[] for _ in outs]
            for store, out in zip(per_exit, outs, strict=True):
                store.append(out.float())
            labels.append(y)
            if per_sample:
                macs, open_ = dyn.sample_exit_costs(x)
                sample_macs.append(macs)
                available.append(open_)
    finally:
        dyn.train(was_training)
    if not per_exit:
        raise DataError("The data set is empty: there is nothing to calibrate on.")
    y = torch.cat(labels)
    known = y >= 0
    if known.any() and not known.all():
        raise DataError("Some samples have labels and some do not; label all or none.")
    return ExitOutputs(
        [torch.cat(s) for s in per_exit],
        y if bool(known.all()) else None,
        list(dyn.exit_macs()),
        dyn.static_macs,
        raw=raw or not (isinstance(dyn, EarlyExitModel) and dyn.ensembled),
        sample_macs=torch.cat(sample_macs, 1) if per_sample else None,
        available=torch.cat(available, 1) if per_sample else None,
        static_preds=torch.cat(static_preds) if own_static else None,
        gate_logits=torch.cat(gate_logits, 1) if gated else None,
    )
