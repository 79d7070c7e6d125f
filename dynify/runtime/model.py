"""DynamicModel: the contract every strategy's model fulfils, declared here and checked by type.

Whatever the strategy, a dynamic model
- computes the original network exactly inside `with dyn.static():`;
- reports after each forward the MACs each sample really spent (`last_macs`), next to the
  original network's (`static_macs`): its wrappers charge a per-forward tab from the cost book
  the pass built from the front end's MACs (`dynify.runtime.ledger`, re-exported here);
- holds its decision thresholds one way: a float32 buffer `thresholds` [K] set only through
  `set_thresholds` (0 = the cheapest behaviour, above 1 = the static network's work);
- describes itself as table rows (`describe()`);
- bounds what one sample can spend (`worst_case_macs()`): every decision taken the dearest way;
- trains through `training_loss(x, teacher_logits, labels, config)`: the one distillation loss of
  `dynify.train.losses` plus the strategy's own compute term;
- exports through `export_face()`: an `ExportFace` whose `forward(x, thresholds)` returns
  `(logits, decisions)`, named `OUTPUT_NAMES` in every exported graph;
- carries the `spec` that rebuilds it from an artifact, and reads back from it what a user
  asks of a converted model: the network it came from (`model_name`), what its parts cost
  (`costs()`, the cost book's items) and how it was fine-tuned (`training_record`).

Narrower capabilities are protocols checked with `isinstance` (`ExitCascade`: a cascade of
exits whose logits calibration can collect in one pass). Callers never probe with `hasattr`.
"""

from __future__ import annotations

import math
import threading
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, runtime_checkable

import torch
from torch import nn

from dynify.errors import InputError, StrategyError
from dynify.frontend.inputs import ExtraInput, as_inputs
from dynify.runtime.ledger import DECIDER, FIXED, UNIT, CostBook, CostItem, Tab

__all__ = [
    "DECIDER",
    "FIXED",
    "INPUT_NAMES",
    "OUTPUT_NAMES",
    "UNIT",
    "CostBook",
    "CostItem",
    "DecisionScalars",
    "DynamicModel",
    "ExitCascade",
    "ExportFace",
    "JointRecipe",
    "MacCapped",
    "PerCall",
    "PerCallRecord",
    "PerSampleExits",
    "Tab",
    "TrainingRecord",
]

if TYPE_CHECKING:
    from dynify.runtime.policy import ExitPolicy
    from dynify.train.losses import LossConfig

# The names of an export face's inputs and outputs in every exported graph (ONNX, pt2).
# `decisions` is int64: [N] exit index for exit cascades, [N, K] per-unit flags or counts
# for block gates and spatial masks.
INPUT_NAMES = ("x", "thresholds")
OUTPUT_NAMES = ("logits", "decisions")


@dataclass(frozen=True)
class JointRecipe:
    """How joint fine-tuning treats a strategy's new parts, which the strategy knows best.

    Exit heads learn well with the backbone's SGD at 10x its rate. Gates do not: a few hundred
    SGD steps barely move them, closed gates make the first losses large enough to blow up an
    unclipped backbone, and batch-norm statistics drift towards gated features (which would
    also change `dyn.static()`). So a strategy may ask for Adam on its new parts, a clipped
    backbone gradient and frozen batch-norm statistics.
    """

    new_parts: str = "sgd"  # "sgd": with the backbone at new_lr_scale x; "adam": at new_lr
    new_lr_scale: float = 10.0
    new_lr: float = 0.02
    clip_grad_norm: float | None = None
    freeze_batchnorm: bool = False


@dataclass(frozen=True)
class TrainingRecord:
    """How `dynify.finetune` trained a model, as its artifact records it: what a benchmark or a
    user reading a .dyn file needs to know about the run (and what `calibrate` reads to find the
    part of the data fine-tuning held out).

    `data` names the data (a path source's absolute path, or a digest of tensors; None when
    neither applies); `samples` counts the examples trained on; `seconds` is the wall time.
    """

    mode: str
    epochs: int
    seed: int
    calibration_fraction: float
    data: str | None
    samples: int
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainingRecord:
        """Read a stored record; fields an older artifact lacks take neutral values."""
        return cls(
            mode=str(data.get("mode", "")),
            epochs=int(data.get("epochs", 0)),
            seed=int(data.get("seed", 0)),
            calibration_fraction=float(data.get("calibration_fraction", 0.0)),
            data=data.get("data"),
            samples=int(data.get("samples", 0)),
            seconds=float(data.get("seconds", 0.0)),
        )


class PerCall(threading.local):
    """What one forward call leaves behind, kept per thread: `static()` and the records.

    A server runs one model from several threads: a thread inside `with dyn.static():` must not
    make another thread's calls static, and `last_macs` read after a call must be that call's.
    A copy of the model (`copy.deepcopy`) starts with fresh records.
    """

    static = False

    def __reduce__(self) -> tuple:
        return (type(self), ())


class PerCallRecord:
    """A per-forward record of a DynamicModel (`last_macs`, `last_exit`, a strategy's own):
    a tensor or None, kept per thread (`PerCall`).

    A batch-1 forward records plain ints (`DynamicModel.record_one`) and the tensors are built
    when read: two one-element tensors cost ~20 us per forward, 2 % of a small network's early
    exit, and most forwards are never asked.
    """

    def __set_name__(self, owner: type, name: str) -> None:
        self.key = f"record_{name}"

    def __get__(self, model: DynamicModel | None, owner: type) -> torch.Tensor | None:
        if model is None:
            return self  # type: ignore[return-value]
        calls = model.per_call
        if calls.__dict__.get("one") is not None:
            model._unpack_one()
        return calls.__dict__.get(self.key)

    def __set__(self, model: DynamicModel, value: torch.Tensor | None) -> None:
        calls = model.per_call
        if calls.__dict__.get("one") is not None:
            model._unpack_one()
        calls.__dict__[self.key] = value


class DynamicModel(nn.Module, ABC):
    """Base class of the networks the passes build: the contract, see the module docstring."""

    strategy: ClassVar[str] = ""
    joint_recipe: ClassVar[JointRecipe] = JointRecipe()
    # State entries an older artifact may lack; they keep their initial values when loaded.
    optional_state: ClassVar[tuple[str, ...]] = ()
    # Whether the strategy runs models called with a padded sequence and its lengths or mask
    # (`forward(x, extra)`); the others take one tensor.
    takes_extra_input: ClassVar[bool] = False
    thresholds: torch.Tensor

    def __init__(
        self,
        *,
        static_macs: int,
        input_shape: tuple[int, ...],
        num_classes: int,
        thresholds: Sequence[float] = (),
        book: CostBook | None = None,
    ):
        super().__init__()
        self.per_call = PerCall()
        self.static_macs = int(static_macs)
        # What the model's parts cost (`dynify.runtime.ledger`), built by the pass from the
        # front end's MACs: plain data, rebuilt with the model from its plan.
        self.book = CostBook(static_macs) if book is None else book
        self.input_shape = tuple(int(d) for d in input_shape)
        self.num_classes = int(num_classes)
        self.spec: dict[str, Any] = {}
        # The .dyn file `dynify.load` read it from (exports refuse to write over it), or None.
        self.artifact_path: Path | None = None
        # Integer inputs (token ids) keep their dtype; None: float inputs of the model's dtype.
        self.input_dtype: torch.dtype | None = None
        # The second input (lengths or padding mask) of a sequence model, or None.
        self.extra_input: ExtraInput | None = None
        # The token id texts are padded with (`dynify.frontend.padding`): dynify pads and counts
        # lengths with it where it makes a text model's inputs.
        self.pad_id: int = 0
        values = [float(t) for t in thresholds]
        _check_thresholds(values, len(values))
        self.register_buffer("thresholds", torch.tensor(values, dtype=torch.float32))

    # --- what every strategy writes -------------------------------------------------------
    @abstractmethod
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The dynamic forward: logits [N, C]; records `last_macs` (and the strategy's own
        per-call records)."""

    @abstractmethod
    def describe(self) -> list[dict[str, str]]:
        """One row per decision unit (exit, gate, mask...) for tables: same keys in every row."""

    @abstractmethod
    def training_loss(
        self,
        x: torch.Tensor,
        teacher_logits: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        config: LossConfig | None = None,
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """(loss, metrics) of one batch: `dynify.train.losses.distillation` towards the teacher
        plus the strategy's compute term. `teacher_logits` None: the static network teaches.
        `config` None: `LossConfig()` (the strategy's own temperature, label weight 0.5)."""

    @abstractmethod
    def export_face(self) -> ExportFace:
        """The module `torch.export` traces: `forward(x, thresholds) -> (logits, decisions)`
        with the skippable work under `dynify.runtime.control.cond`."""

    def last_decisions(self) -> torch.Tensor:
        """What each sample of this thread's last forward decided, int64, in the form the
        export face returns as `decisions`: the exit index [N] for exit cascades (this
        default); a strategy with other decisions overrides it."""
        if self.last_exit is None:
            raise StrategyError("No dynamic forward has run in this thread yet.")
        return self.last_exit.long()

    def worst_case_macs(self) -> int:
        """The most MACs one sample can spend, whatever its input and the thresholds: every
        decision taken the dearest way (every exit head paid, every gate and decider run,
        every mask unit and tile computed). `last_macs` never exceeds it; it may exceed
        `static_macs`, which is what an attacker who defeats every decision makes a sample cost.

        The cost book's (`CostBook.worst_case_macs`); the contract tests check it on every
        registered strategy.
        """
        if not self.book.items:
            raise NotImplementedError(f"{type(self).__name__} does not bound its per-sample cost.")
        return self.book.worst_case_macs()

    # --- what the artifact records -----------------------------------------------------------
    @property
    def model_name(self) -> str:
        """The network the model was converted from: its zoo name (`cifar_resnet44`,
        `resnet18`, `timm:...`) or import path, or for a module passed in, where its class is
        defined (`mypkg.models:Net`)."""
        return str((self.spec.get("model") or {}).get("name", type(self).__name__))

    @property
    def weight_notes(self) -> list[str]:
        """What loading the original network's weights said (pretrained, random, unavailable),
        for a user to check before trusting the conversion."""
        return [str(note) for note in (self.spec.get("model") or {}).get("notes", [])]

    @property
    def training_record(self) -> TrainingRecord | None:
        """How `dynify.finetune` last trained the model (kept in its artifact), or None if it
        has not been fine-tuned."""
        record = self.spec.get("finetune")
        return TrainingRecord.from_dict(record) if record else None

    def costs(self) -> list[CostItem]:
        """What each part of the model costs one sample: the cost book's items in the order the
        pass added them, each with its MACs, its role (`FIXED`, `DECIDER`, `UNIT`) and its
        dearest cost. Item names are the strategy's (early exits: `segment<i>`, `head<i>`)."""
        return list(self.book.items.values())

    # --- the cost ledger: a tab per forward, charged by the wrappers ----------------------
    def open_tab(
        self,
        batch: int,
        device: torch.device | str = "cpu",
        *,
        scalar: bool = False,
        dtype: torch.dtype = torch.float64,
    ) -> Tab:
        """A fresh tab for one forward (every sample starts at the book's fixed cost); the
        forward hands it to its wrappers with the rest of its per-thread state."""
        return self.book.tab(batch, device, scalar=scalar, dtype=dtype)

    def close_tab(self, tab: Tab, exit_index: int | None = None) -> None:
        """Record what the tab's samples spent as this thread's `last_macs` (a scalar tab as a
        batch-1 record, with its exit index if any: `record_one`)."""
        if tab.scalar:
            self.record_one(round(tab.spent), exit_index, self.thresholds.device)
        else:
            self.last_macs = tab.macs()

    def record_static(self, batch: int, device: torch.device | str = "cpu") -> None:
        """`last_macs` of a forward inside `static()`: the original network's per sample."""
        self.last_macs = torch.full((batch,), self.static_macs, dtype=torch.long, device=device)

    # --- thresholds -----------------------------------------------------------------------
    @property
    def num_thresholds(self) -> int:
        return int(self.thresholds.numel())

    def set_thresholds(self, values: Sequence[float] | torch.Tensor | float) -> None:
        """Set every threshold: one number for all, or exactly `num_thresholds` of them.

        Refuses a wrong count and non-finite values (a NaN threshold would silently make every
        comparison false). 0 is the cheapest behaviour, anything above 1 the static network's.
        """
        k = self.num_thresholds
        try:
            given = torch.as_tensor(values, dtype=torch.float64).detach().cpu()
        except (TypeError, ValueError, RuntimeError) as exc:
            raise StrategyError(f"Thresholds must be numbers, got {values!r}.") from exc
        if given.dim() == 0:  # one number for every decision unit
            given = given.expand(k)
        values = given.reshape(-1).tolist()
        _check_thresholds(values, k)
        self.thresholds.copy_(torch.tensor(values, dtype=torch.float32))

    # --- static mode and per-call records (per thread: `PerCall`) -------------------------
    @property
    def is_static(self) -> bool:
        return self.per_call.static

    @property
    def _static(self) -> bool:
        return self.per_call.static

    # What the last forward of this thread spent (`last_macs`) and, for strategies with exits,
    # where each sample left (`last_exit`); see `PerCallRecord`.
    last_macs = PerCallRecord()
    last_exit = PerCallRecord()

    def record_one(self, macs: int, exit_index: int | None, device: torch.device) -> None:
        """A batch-1 forward's `last_macs` (and `last_exit`, unless None), as Python ints."""
        self.per_call.one = (macs, exit_index, device)

    def _unpack_one(self) -> None:
        records = self.per_call.__dict__
        macs, exit_index, device = records.pop("one")
        records["record_last_macs"] = torch.tensor([macs], dtype=torch.long, device=device)
        if exit_index is not None:
            records["record_last_exit"] = torch.tensor(
                [exit_index], dtype=torch.long, device=device
            )

    @contextmanager
    def static(self) -> Iterator[DynamicModel]:
        """Within this block the model computes exactly the original network (in this
        thread only: other threads' calls stay dynamic)."""
        calls = self.per_call
        previous, calls.static = calls.static, True
        try:
            yield self
        finally:
            calls.static = previous

    def inputs(
        self, x: torch.Tensor | tuple[torch.Tensor, torch.Tensor], extra: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(sequence, second input or None) of a call, checked: `dyn(x)`, or for a model
        converted with lengths or a mask `dyn(ids, lengths)` and `dyn((ids, lengths))`."""
        if self.extra_input is not None:
            x, extra = as_inputs(x, extra)
        self.check_input(x, extra)
        return x, extra  # type: ignore[return-value]

    def input_args(
        self, x: torch.Tensor | tuple[torch.Tensor, torch.Tensor], extra: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, ...]:
        """The checked inputs of a call as a graph takes them: (x,) or (x, lengths / mask)."""
        x, extra = self.inputs(x, extra)
        return (x,) if extra is None else (x, extra)

    def check_input(self, x: torch.Tensor, extra: torch.Tensor | None = None) -> None:
        """Refuse inputs the cost accounting and the plan were not made for."""
        if self.extra_input is not None:
            x, extra = as_inputs(x, extra)
            if extra is None:
                kind = self.extra_input.kind
                raise InputError(
                    f"The model was converted for a padded sequence and its {kind}; call it as "
                    f"dyn(x, {kind}) (or dyn((x, {kind})))."
                )
        elif extra is not None:
            raise InputError(
                "The model takes one input tensor; it was converted without lengths or a mask."
            )
        if not isinstance(x, torch.Tensor):
            raise InputError(f"Expected a tensor input, got {type(x).__name__}.")
        expected = (None, *self.input_shape)
        if x.dim() != len(expected) or tuple(x.shape[1:]) != self.input_shape:
            shape = "[B, " + ", ".join(str(d) for d in self.input_shape) + "]"
            raise InputError(
                f"Expected an input of shape {shape}, got {list(x.shape)}. The model was "
                f"converted for inputs of {shape}; resize the input, or convert again with "
                "--input-size (example_input= in the API) matching your data."
            )
        # The thresholds buffer follows the model's dtype and device through .to(), .half()...
        want = self.thresholds
        if self.input_dtype is not None:
            if x.dtype != self.input_dtype or x.device != want.device:
                name = str(self.input_dtype).removeprefix("torch.")
                raise InputError(
                    f"Expected token ids as {name} on {want.device}, got "
                    f"{str(x.dtype).removeprefix('torch.')} on {x.device}. Pass the ids the "
                    f"model was converted with (x.to({want.device.type!r}, torch.{name}))."
                )
        elif x.dtype != want.dtype or x.device != want.device:
            raise InputError(
                f"Expected a {str(want.dtype).removeprefix('torch.')} input on {want.device}, "
                f"got {str(x.dtype).removeprefix('torch.')} on {x.device}. Convert the input "
                f"(x.to({want.device.type!r}, torch.{str(want.dtype).removeprefix('torch.')})): "
                "images as integers are scaled and normalised first, as in training."
            )
        if self.extra_input is not None:
            self.extra_input.check(x, extra)

    def random_input(
        self, batch: int, generator: torch.Generator | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """`batch` random inputs the model accepts, for verification, timing and warm-up:
        normal floats, or token ids below the smallest embedding's vocabulary; with random
        lengths in [1, T] (or their padding mask) for a model converted with them."""
        shape = (batch, *self.input_shape)
        if self.input_dtype is None:
            x = torch.randn(shape, generator=generator)
        else:
            vocab = min(
                (m.num_embeddings for m in self.modules() if isinstance(m, nn.Embedding)),
                default=2,
            )
            x = torch.randint(0, vocab, shape, generator=generator, dtype=self.input_dtype)
        if self.extra_input is None:
            return x
        steps = self.input_shape[0]
        lengths = torch.randint(1, steps + 1, (batch,), generator=generator)
        return x, self.extra_input.of_lengths(lengths, steps)

    def static_inputs_of(
        self, wrappers: Sequence[nn.Module], x: torch.Tensor
    ) -> list[torch.Tensor]:
        """What each wrapper (anything with an `index`) receives in a static forward of `x`, in
        the order of `wrappers`, differentiable in `x`: the features a strategy's decision units
        see with every block run (what a slowdown attack pushes)."""
        entries: dict[int, torch.Tensor] = {}
        hooks = [
            w.register_forward_pre_hook(lambda m, args: entries.__setitem__(m.index, args[0]))
            for w in wrappers
        ]
        try:
            with self.static():
                self(x)
        finally:
            for hook in hooks:
                hook.remove()
        return [entries[w.index] for w in wrappers]

    def mean_macs_fraction(self) -> float:
        """Mean MACs of the last forward as a fraction of the static model's."""
        if self.last_macs is None:
            raise RuntimeError("No forward pass has run yet.")
        return float(self.last_macs.double().mean()) / self.static_macs


def _check_thresholds(values: list[float], expected: int) -> None:
    if len(values) != expected:
        raise StrategyError(
            f"Expected {expected} threshold{'s' if expected != 1 else ''}, got {len(values)}: "
            "give one number for all of them or one per decision unit (see `dynify inspect`)."
        )
    bad = [v for v in values if not math.isfinite(v)]
    if bad:
        raise StrategyError(
            f"Thresholds must be finite numbers, got {bad}: use 0 for the cheapest behaviour "
            "and a value above 1 (e.g. 1.01) for the static network's."
        )


class ExportFace(nn.Module, ABC):
    """What `DynamicModel.export_face()` returns and `torch.export` traces.

    `forward(x, thresholds=None) -> (logits, decisions)`; the graph's inputs and outputs are
    named `INPUT_NAMES` and `OUTPUT_NAMES`. `thresholds` (float32 [K]) is a graph input whose
    default is the calibrated values held in the face's `thresholds` buffer.
    """

    thresholds: torch.Tensor
    # The name of the second graph input of a face whose model takes lengths or a mask
    # ("lengths" / "mask": `x` is then the pair); None: `x` is one tensor.
    extra_input_name: str | None = None
    # The torch.cond an export must keep at least: fewer means the skipping was folded into a
    # static graph. 0 for a strategy that skips nothing (dynamic convs: kernels, not branches).
    min_conditionals: ClassVar[int] = 1

    def __init__(self, thresholds: torch.Tensor | Sequence[float]):
        super().__init__()
        values = torch.as_tensor(thresholds, dtype=torch.float32).detach().clone().reshape(-1)
        self.register_buffer("thresholds", values)

    @property
    def num_thresholds(self) -> int:
        return int(self.thresholds.numel())

    def thresholds_or_default(self, thresholds: torch.Tensor | None) -> torch.Tensor:
        return (self.thresholds if thresholds is None else thresholds).to(torch.float32)

    @abstractmethod
    def forward(
        self, x: torch.Tensor, thresholds: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`x`: the input as the model takes it; for a model converted with lengths or a
        mask, the pair `(x, lengths)` (a second graph input named after its kind)."""


@runtime_checkable
class ExitCascade(Protocol):
    """A cascade of exits (early exits, the resolution cascade): every exit's logits come in one
    pass, so calibration simulates the exit rule on collected logits instead of re-running.

    Exit i < `num_exits` is a head; index `num_exits` is the final classifier. `exit_macs()[i]`
    is what a sample leaving at exit i spends; `temperatures` [num_exits] scale each head's
    logits before `policy` scores them.
    """

    temperatures: torch.Tensor
    policy: ExitPolicy

    @property
    def num_exits(self) -> int: ...

    def exit_logits(self, x: torch.Tensor) -> list[torch.Tensor]: ...

    def exit_macs(self) -> list[int]: ...


@runtime_checkable
class GatedExits(Protocol):
    """A cascade of exits decided by learned gates (frame-exit's gate model): after exit i,
    gate i reads the state and the sample goes on when its probability p > 1 - threshold_i
    (`gate_open`). Every gate's logits and every exit's logits come in one pass
    (`gated_exit_outputs(x)`: K gate logits [N], K + 1 exit logits [N, C]), so calibration
    simulates the gate rule on them and searches per-gate thresholds, as for exits.

    `exit_macs()[i]` is what a sample leaving at exit i spends, under the MAC cap the model
    holds; `deepest_group()` is the exit where the cap makes every sample leave without asking
    its gate (`num_exits`: no cap, or one that fits every exit).
    """

    @property
    def num_exits(self) -> int: ...

    def gated_exit_outputs(
        self, x: torch.Tensor
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]: ...

    def exit_macs(self) -> list[int]: ...

    def deepest_group(self, cap: int | None = None) -> int: ...


@runtime_checkable
class MacCapped(Protocol):
    """A model whose per-sample MACs can be capped for every input (`dynify.runtime.mac_cap`):
    block gates, spatial masks, dynamic width, skip-rnn and frame-exit's gates. Exit cascades
    cap by forcing an exit at calibration instead (`dynify.runtime.mac_cap.cost_bound` reads
    either).

    `set_mac_cap(fraction)` (None: no cap) refuses a cap below `cap_floor()`, the MACs a sample
    spends whatever it decides; `mac_cap_fraction()` reads it back.
    """

    mac_cap: torch.Tensor

    def set_mac_cap(self, fraction: float | None) -> None: ...

    def mac_cap_fraction(self) -> float | None: ...

    def cap_floor(self) -> int: ...


@runtime_checkable
class PerSampleExits(Protocol):
    """An exit cascade whose exit costs depend on the sample (stop-reading: a padded text ends
    early, so what an exit costs is what the sample read), and whose exits are not open to
    every sample (a text shorter than an exit's position has finished reading before it).

    `sample_exit_costs(x)` returns `(macs, available)`: `macs` int64 [num_exits + 1, N], what
    sample n spends if it leaves at exit i (the last row: the final classifier), and
    `available` bool [num_exits, N], whether sample n can leave at exit i at all. Calibration
    and evaluation simulate the exit rule with these instead of `exit_macs()`.

    `forced_exit_macs()[i]` is the most a sample can spend when exit i fires for every sample
    that reaches it (threshold 0, a MAC cap's forced exit): samples to whom exit i is closed
    take the final classifier, which may cost them more than exit i's head.
    """

    def sample_exit_costs(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...

    def forced_exit_macs(self) -> list[int]: ...


@runtime_checkable
class DecisionScalars(Protocol):
    """A model with decision scalars besides its thresholds, which calibration chooses with
    them (stop-reading's jump threshold): for each value of a small grid the thresholds are
    searched, and the setting that best meets the target is kept (`dynify.calibrate`).

    `decision_scalars()` maps each scalar's name to the grid calibration tries (empty: nothing
    to choose, e.g. a stop-reading model converted without a jump head); `scalar_values()`
    reads the values the model holds (saved with it, used by its export face);
    `set_scalar(name, value)` sets one.
    """

    def decision_scalars(self) -> dict[str, tuple[float, ...]]: ...

    def scalar_values(self) -> dict[str, float]: ...

    def set_scalar(self, name: str, value: float) -> None: ...
