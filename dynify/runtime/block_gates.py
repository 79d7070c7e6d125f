"""GatedModel: residual blocks that each sample runs or skips (SkipNet, ConvNet-AIG, SACT, BlockDrop).

The pass replaces every gated residual join `out = shortcut(entry) + branch(entry)` by a call to
a `BlockGate` wrapper over the block's entry. The wrapper always runs the shortcut (identity, or
the projection / option-A arm alone) and runs the branch only for the samples whose gate is open:
it gathers them, runs the branch on that sub-batch and adds the result back in place (scatter),
so a skipped block costs a sample nothing. Three ways to decide share that wrapper:

- function (SkipNet, ConvNet-AIG): a tiny gate per block (global pool -> MLP) reads the block's
  input; the block runs when the gate's probability p satisfies p > 1 - threshold.
- halting (SACT / ACT): within a stage of same-shape blocks, block l+1 scores its input (block
  l's output) with a halting unit h_l; a sample stops once the cumulative score reaches the
  threshold (1 - epsilon by default), every later block of the stage is skipped, and the stage
  returns the halting-weighted mix sum_{l<N} h_l y_l + R y_N (R the remainder), as in ACT. A
  sample that never halts takes the last block's output, so halting switched off (threshold > 1)
  is exactly the original network.
- policy (BlockDrop): one small policy network looks at the downsampled input once and emits the
  whole run/skip plan; block k runs when pi_k > 1 - threshold_k.

All wrappers of one forward share a `GateRun` (thresholds, per-sample MACs, the policy plan, the
halting state); the GatedModel binds it before running the rewritten graph. Thresholds follow
dynify's convention: 0 is the cheapest behaviour, > 1 runs every block (the static network).

Faces: `forward` is eager (Python control flow, per-sample gather/run/scatter); `training_loss`
runs every branch for every sample with straight-through decisions (Gumbel for gates, REINFORCE
or Gumbel for the policy); `export_face()` puts every skippable branch under `torch.cond`.

This module holds the model and its export face; the decision units live in `units.py`, the
wrapper and the per-forward state in `gate_wrapper.py`, the decision rules in `decisions.py`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from dynify.errors import StrategyError
from dynify.runtime.decisions import (
    gate_open,
    gate_probability,
    gates_open_one,
    greedy_open,
    straight_through_gumbel,
)
from dynify.runtime.gate_wrapper import BlockGate, GateRun, HaltMix, RunContext
from dynify.runtime.mac_cap import CapHolder
from dynify.runtime.model import CostBook, DynamicModel, ExportFace, JointRecipe, PerCallRecord
from dynify.train.losses import (
    LossConfig,
    budget_price,
    distillation,
    explore_actions,
    priced_compute,
    reinforce,
    step_metrics,
)

GATE_KINDS = ("function", "halting", "policy")
POLICY, REST = "policy", "rest"  # the cost book's items of the policy network, the ungated layers
ESTIMATORS = ("reinforce", "gumbel")


@dataclass(frozen=True)
class GatedBlock:
    """One gated residual block as the model runs it (read-only): `block` the qualified name of
    the residual block in the original model (its branch's first convolution's parent, e.g.
    'layer2.3'); `identity_shortcut` whether skipping the branch leaves only the input
    (else the shortcut still runs); `branch_macs` what running the branch costs one sample;
    `threshold` the index of the threshold it decides with (halting: its stage's)."""

    index: int
    join: str
    block: str
    identity_shortcut: bool
    branch_macs: int
    threshold: int


class GatedModel(CapHolder, DynamicModel):
    """The rewritten graph (`gm`) with `gate_<k>` wrappers, plus the policy network if any.

    With a MAC cap (`set_mac_cap`, `dynify.runtime.mac_cap`) a gated branch runs only if it
    fits what is left of the sample's allowance; otherwise the gate closes (halting: the
    sample halts there). `static()` ignores the cap.
    """

    strategy = "block-gates"
    optional_state = ("budget_multiplier", "mac_cap")
    # [B, K] bool: the gated branches each sample of the last forward ran (per thread)
    last_gates = PerCallRecord()

    def __init__(
        self,
        gm: torch.fx.GraphModule,
        *,
        kind: str,
        gate_names: Sequence[str],
        book: CostBook,
        thresholds: Sequence[float],
        policy: nn.Module | None = None,
        groups: Sequence[Sequence[int]] = (),
        budget: float = 0.6,
        epsilon: float = 0.01,
        temperature: float = 1.0,
        distill_temperature: float = 2.0,
        compute_weight: float = 20.0,
        budget_rate: float = 0.1,
        estimator: str = "gumbel",
        static_macs: int,
        input_shape: tuple[int, ...],
        num_classes: int,
    ):
        super().__init__(
            static_macs=static_macs,
            input_shape=input_shape,
            num_classes=num_classes,
            thresholds=thresholds,
            book=book,
        )
        if kind not in GATE_KINDS:
            raise StrategyError(f"Unknown gate kind '{kind}'; choose one of {GATE_KINDS}.")
        if estimator not in ESTIMATORS:
            raise StrategyError(f"Unknown estimator '{estimator}'; choose one of {ESTIMATORS}.")
        self.gm = gm
        self._context = RunContext()
        for wrapper in self._wrappers():
            wrapper.context = self._context
        self.kind = kind
        self.gate_names = list(gate_names)  # the join node each gate replaced
        self.policy = policy
        self.groups = [list(g) for g in groups]
        self.budget = float(budget)
        self.epsilon = float(epsilon)
        self.temperature = float(temperature)
        self.distill_temperature = float(distill_temperature)
        self.compute_weight = float(compute_weight)
        self.budget_rate = float(budget_rate)
        # The compute price, learnt during fine-tuning: a buffer, so a checkpoint (and a resumed
        # run) carries it; as a Python float a resumed run restarted it from zero.
        self.register_buffer("budget_multiplier", torch.zeros((), dtype=torch.float64))
        self.estimator = estimator
        self.init_mac_cap()

    # structure ---------------------------------------------------------------------------
    @property
    def gates(self) -> list[BlockGate]:
        return [m for m in self.gm.children() if isinstance(m, BlockGate)]

    @property
    def fixed_macs(self) -> int:
        """The layers no gate skips (projection shortcuts of skipped blocks included)."""
        return self.book.fixed_macs()

    @property
    def policy_macs(self) -> int:
        return self.book.macs(POLICY) if POLICY in self.book.items else 0

    def cap_floor(self) -> int:
        """What a sample spends whatever it decides, every decision unit charged: the least
        MAC cap there can be (`dynify.runtime.mac_cap`)."""
        return self.book.floor()

    @property
    def joint_recipe(self) -> JointRecipe:  # type: ignore[override]
        """From benchmarks/block_gates.py: unclipped SGD diverged within ten steps and barely
        moved the gates; halting units oscillate at Adam 0.02 and settle at 0.008."""
        return JointRecipe(
            new_parts="adam",
            new_lr=0.008 if self.kind == "halting" else 0.02,
            clip_grad_norm=2.0,
            freeze_batchnorm=True,
        )

    @property
    def num_gates(self) -> int:
        return len(self.gate_names)

    def _wrappers(self) -> list[nn.Module]:
        return [m for m in self.gm.children() if isinstance(m, BlockGate | HaltMix)]

    def branch_macs(self) -> list[int]:
        return [g.branch_macs for g in self.gates]

    def gate_plan(self) -> tuple[GatedBlock, ...]:
        """The gated blocks, gate by gate (`last_decisions()`'s columns). Gate k is not the k-th
        residual block: halting never gates a stage's first block."""
        return tuple(
            GatedBlock(
                gate.index,
                name,
                _block_name(gate),
                gate.shortcut is None,
                gate.branch_macs,
                gate.group if self.kind == "halting" else gate.index,
            )
            for gate, name in zip(self.gates, self.gate_names, strict=True)
        )

    def min_macs(self) -> int:
        """MACs of a sample that skips every block it may, every decision unit charged."""
        return self.book.floor()

    def unit_probabilities(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Differentiable in `x`: the probability each decision unit gives with every block
        run (the static network's features), what a slowdown attack pushes over 1 - threshold:
        per gate a [B] tensor (function: open; halting: halt), or the policy's [B, K] plan."""
        if self.kind == "policy":
            return [gate_probability(self.policy(x))]
        inputs = self.static_inputs_of(self.gates, x)
        return [
            gate_probability(g.decider(entry)) for g, entry in zip(self.gates, inputs, strict=True)
        ]

    def last_decisions(self) -> torch.Tensor:
        """[N, num_gates] int64: 1 where a sample ran the gated branch."""
        return self.last_gates.long()

    def describe(self) -> list[dict[str, str]]:
        """One row per gated block for tables."""
        rows = []
        for gate, name in zip(self.gates, self.gate_names, strict=True):
            t = self.thresholds[gate.group if self.kind == "halting" else gate.index]
            rows.append(
                {
                    "gate": str(gate.index),
                    "join": name,
                    **self.book.columns(gate.branch_macs, "branch MACs", 2),
                    "shortcut": "identity" if gate.shortcut is None else "runs alone",
                    "threshold": f"{float(t):.3f}",
                }
            )
        return rows

    # running -----------------------------------------------------------------------------
    def _bind(self, run: GateRun | None) -> None:
        self._context.run = run

    def _run_graph(self, x: torch.Tensor, run: GateRun) -> torch.Tensor:
        self._bind(run)
        try:
            return self.gm(x)
        finally:
            self._bind(None)

    def _new_run(self, x: torch.Tensor, mode: str, thresholds: torch.Tensor) -> GateRun:
        batch = x.shape[0]
        return GateRun(
            mode=mode,
            thresholds=thresholds,
            tab=self.open_tab(batch, x.device),
            executed=torch.zeros(batch, self.num_gates, dtype=torch.bool, device=x.device),
            train_threshold=1.0 - self.epsilon,
            temperature=self.temperature,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        batch = x.shape[0]
        if self._static:
            out = self._run_graph(x, self._new_run(x, "static", self.thresholds))
            self.record_static(batch)
            self.last_gates = torch.ones(batch, self.num_gates, dtype=torch.bool)
            return out
        if batch == 1:
            return self._forward_one(x)
        run = self._new_run(x, "eager", self.thresholds)
        run.left = self.allowance(self.cap_macs(), x)
        if self.kind == "policy" and bool((self.thresholds <= 1.0).any()):
            run.tab.charge(POLICY)
            run.plan = gate_open(gate_probability(self.policy(x)), self.thresholds)
        out = self._run_graph(x, run)
        self.close_tab(run.tab)
        self.last_gates = run.executed.clone()
        return out

    def _forward_one(self, x: torch.Tensor) -> torch.Tensor:
        thr = self.thresholds.tolist()
        run = GateRun(
            mode="eager",
            thresholds=self.thresholds,
            tab=self.open_tab(1, scalar=True),
            scalar=True,
            thr=thr,
            flags=[True] * self.num_gates,
        )
        cap = self.cap_macs()
        if cap is not None:
            run.left = float(cap - self.book.floor())
        if self.kind == "policy" and min(thr) <= 1.0:
            run.tab.charge(POLICY)
            run.plan_list = self._plan_one(x, thr)
        out = self._run_graph(x, run)
        self.last_gates = torch.tensor([run.flags], dtype=torch.bool)
        self.close_tab(run.tab)
        return out

    def _plan_one(self, x: torch.Tensor, thr: list[float]) -> list[bool]:
        """The policy's run/skip plan for one image, decided in Python floats: at batch 1 the
        tensor form (sigmoid, compare, convert) costs more than the comparisons themselves."""
        return gates_open_one(self.policy(x).float().tolist()[0], thr)

    # training ----------------------------------------------------------------------------
    def training_loss(
        self,
        x: torch.Tensor,
        teacher_logits: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        config: LossConfig | None = None,
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """Distillation (+ CE on labels) under sampled decisions, plus a compute term.

        function / halting: straight-through Gumbel (halting: ACT's deterministic scores, a
        straight-through 'still running' weight) plus `price * mean MAC fraction`, where the
        price follows the distance of the deterministic decisions' MACs from the budget
        (`dynify.train.losses.budget_price`). policy: REINFORCE as in BlockDrop (Bernoulli
        actions with exploration, batch-mean baseline; the reward is minus the sample's
        distillation loss minus a cost term whose sign follows the batch's distance to the
        budget), or Gumbel. With labels the task loss is twice `distillation`'s mix: the compute
        weight and the controller were tuned on kd + ce, which is that at label weight 0.5.
        """
        self.check_input(x)
        config = config or LossConfig()
        budget = self.budget if config.budget is None else float(config.budget)
        if teacher_logits is None:  # fine-tuning with the backbone frozen: it is the teacher
            with torch.no_grad(), self.static():
                teacher_logits = self(x)
        run = self._new_run(x, "train", self.thresholds)
        run.greedy = self.open_tab(x.shape[0], x.device)
        run.tab = self.open_tab(x.shape[0], x.device, dtype=torch.float32)
        log_prob = None
        if self.kind == "policy":
            run.tab.charge(POLICY)
            run.greedy.charge(POLICY)
            logits = self.policy(x).float()
            run.greedy_plan = greedy_open(logits.detach())
            if self.estimator == "gumbel":
                run.plan = straight_through_gumbel(logits, self.temperature)
            else:
                run.plan, log_prob = explore_actions(gate_probability(logits))
        logits = self._run_graph(x, run)
        t = config.temperature(self.distill_temperature)
        task, stats = distillation(
            logits, teacher_logits, labels, t, config.label_weight, per_sample=True
        )
        if "ce" in stats:  # kd + ce, the mix the compute weight and controller were tuned on
            task = 2.0 * task
        fraction = run.tab.spent / self.static_macs
        mean_fraction = fraction.mean()
        greedy_fraction = float(run.greedy.spent.mean()) / self.static_macs
        price = budget_price(
            self.budget_multiplier, greedy_fraction - budget, self.compute_weight, self.budget_rate
        )
        if log_prob is not None:
            compute = reinforce(task, fraction, price, log_prob)
        else:
            compute = priced_compute(fraction, price)
        loss = task.mean() + compute
        self.close_tab(run.tab)
        self.last_gates = run.executed.clone()
        return loss, step_metrics(
            loss,
            compute,
            stats,
            macs_fraction=float(mean_fraction.detach()),
            greedy_macs_fraction=greedy_fraction,
            compute_price=price,
        )

    # export ------------------------------------------------------------------------------
    def export_face(self) -> GatedExport:
        """The export face: forward(x, thresholds) -> (logits, executed [N, K] int64)."""
        return GatedExport(self)


class GatedExport(ExportFace):
    """`GatedModel` with every skippable branch under `torch.cond` (ONNX: an `If` per block).

    Decisions are computed outside the conditionals from `thresholds` (a graph input), so
    export keeps them as tensors. With batch N, a branch runs when any sample needs it, and
    only on those samples (gathered inside the `If`), so every sample gets its eager result.
    """

    def __init__(self, model: GatedModel):
        super().__init__(model.thresholds)
        self.model = model
        # the MAC cap as it is now: a Python int, so the export keeps it as a constant
        self.cap = model.cap_macs()

    def forward(
        self, x: torch.Tensor, thresholds: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        model = self.model
        thr = self.thresholds_or_default(thresholds)
        run = model._new_run(x, "export", thr)
        run.left = model.allowance(self.cap, x)
        if model.kind == "policy":
            run.plan = gate_open(gate_probability(model.policy(x)), thr)
        logits = model._run_graph(x, run)
        return logits, run.executed.to(torch.int64)


def _block_name(gate: nn.Module) -> str:
    """The qualified name of the residual block a gate wraps: its lifted branch keeps the
    original module paths ('layer2.3.conv1' -> 'layer2.3')."""
    conv = next(n for n, m in gate.branch.named_modules() if isinstance(m, nn.Conv2d))
    return conv.rsplit(".", 1)[0] if "." in conv else ""
