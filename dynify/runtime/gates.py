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
or Gumbel for the policy); `export_module()` puts every skippable branch under `torch.cond`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from dynify.errors import StrategyError
from dynify.runtime.model import DynamicModel, JointRecipe

GATE_KINDS = ("function", "halting", "policy")
ESTIMATORS = ("reinforce", "gumbel")


# --- decision units --------------------------------------------------------------------------


def pool_feature(feature: torch.Tensor, layout: str) -> torch.Tensor:
    """[B, ...] feature -> [B, D] by global average pooling over its spatial or token axes."""
    if layout == "channels_first":
        return feature.mean(dim=tuple(range(2, feature.dim())))
    if layout == "channels_last":
        return feature.mean(dim=tuple(range(1, feature.dim() - 1)))
    if layout == "tokens":
        return feature.mean(1)
    return feature.flatten(1)


class GateFunction(nn.Module):
    """ConvNet-AIG / SkipNet gate: global pool -> linear -> ReLU -> linear -> one logit.

    The last bias starts at `open_bias` so a fresh gate is open (sigmoid(3) = 0.95): the
    converted model starts as the static one and fine-tuning learns what to close.
    """

    def __init__(self, channels: int, layout: str, hidden: int = 16, open_bias: float = 3.0):
        super().__init__()
        self.layout = layout
        self.fc1 = nn.Linear(channels, hidden)
        self.fc2 = nn.Linear(hidden, 1)
        nn.init.constant_(self.fc2.bias, open_bias)

    def forward(self, feature: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.relu(self.fc1(pool_feature(feature, self.layout)))).squeeze(1)

    def logit_one(self, feature: torch.Tensor) -> float:
        """The logit of a batch of one as a float: the same arithmetic, without module calls."""
        hidden = F.relu(
            F.linear(pool_feature(feature, self.layout), self.fc1.weight, self.fc1.bias)
        )
        return float(F.linear(hidden, self.fc2.weight, self.fc2.bias))


class HaltingUnit(nn.Module):
    """SACT's halting score of a block output: global pool -> linear -> one logit.

    Starts at sigmoid(-3) = 0.05 per block, far from halting, i.e. close to the static network.
    """

    def __init__(self, channels: int, layout: str, bias: float = -3.0):
        super().__init__()
        self.layout = layout
        self.fc = nn.Linear(channels, 1)
        nn.init.zeros_(self.fc.weight)
        nn.init.constant_(self.fc.bias, bias)

    def forward(self, feature: torch.Tensor) -> torch.Tensor:
        return self.fc(pool_feature(feature, self.layout)).squeeze(1)

    def logit_one(self, feature: torch.Tensor) -> float:
        return float(F.linear(pool_feature(feature, self.layout), self.fc.weight, self.fc.bias))


class PolicyNetwork(nn.Module):
    """BlockDrop's policy: a small CNN on the downsampled image emits one logit per block."""

    def __init__(
        self, input_shape: Sequence[int], num_blocks: int, size: int = 16, width: int = 16
    ):
        super().__init__()
        if len(input_shape) != 3:
            raise StrategyError(
                f"The policy gate reads an image [C, H, W]; this model's input is "
                f"{list(input_shape)}. Use --gate function or --gate halting instead."
            )
        channels, height, _ = input_shape
        self.size = min(size, height)
        self.features = nn.Sequential(
            nn.Conv2d(channels, width, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(2 * width),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(1),
        )
        self.fc = nn.Linear(2 * width, num_blocks)
        nn.init.zeros_(self.fc.weight)
        nn.init.constant_(self.fc.bias, 3.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.size or x.shape[-2] != self.size:
            x = F.adaptive_avg_pool2d(x, self.size)
        return self.fc(self.features(x))


# --- per-forward state ------------------------------------------------------------------------


@dataclass
class HaltState:
    """ACT bookkeeping of one halting stage for the whole batch."""

    cum: torch.Tensor  # [B] cumulative halting score, capped at 1
    halted: torch.Tensor  # [B] bool
    acc: torch.Tensor | None = None  # [B, ...] the halting-weighted mix of outputs so far
    raw: torch.Tensor | None = None  # training: the unclamped sum of halting scores


@dataclass
class GateRun:
    """What the wrappers of one forward pass share."""

    mode: str  # "static" | "eager" | "train" | "export"
    thresholds: torch.Tensor
    macs: torch.Tensor  # [B] float: MACs spent per sample (train: straight-through)
    executed: torch.Tensor  # [B, K] bool: which gated branches ran
    plan: torch.Tensor | None = None  # policy: [B, K] run decision (float 0/1 in training)
    greedy_plan: torch.Tensor | None = None  # policy, training: the deterministic plan
    greedy_macs: torch.Tensor | None = None  # training: MACs of the deterministic decisions
    halt: dict[int, HaltState] = field(default_factory=dict)
    # batch 1 in eager mode: decisions and costs as Python scalars (no tensor bookkeeping)
    scalar: bool = False
    thr: list[float] = field(default_factory=list)
    plan_list: list[bool] | None = None
    flags: list[bool] = field(default_factory=list)
    extra_macs: float = 0.0
    halt_one: dict[int, list] = field(default_factory=dict)
    train_threshold: float = 0.99
    temperature: float = 1.0
    gate_probs: list[torch.Tensor] = field(default_factory=list)


def straight_through_gumbel(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Binary Gumbel-softmax, hard in the forward pass, soft gradient (Jang et al. 2017)."""
    u = torch.rand_like(logits).clamp(1e-6, 1 - 1e-6)
    noise = torch.log(u) - torch.log1p(-u)  # the difference of two Gumbels is logistic
    soft = torch.sigmoid((logits + noise) / temperature)
    hard = (soft > 0.5).to(soft.dtype)
    return hard + soft - soft.detach()


def _cond(pred: torch.Tensor, true_fn: Callable, false_fn: Callable, operands: tuple) -> Any:
    """`torch.cond` under export/compile (kept as control flow), a Python `if` in eager."""
    if torch.compiler.is_exporting() or torch.compiler.is_compiling():
        return torch.cond(pred, true_fn, false_fn, operands)
    return true_fn(*operands) if bool(pred) else false_fn(*operands)


# --- the wrappers -----------------------------------------------------------------------------


class BlockGate(nn.Module):
    """A residual block whose branch runs only for the samples whose gate is open.

    `branch` and `shortcut` are the lifted arms (GraphModules sharing the original parameters);
    `shortcut` is None for an identity shortcut. `decider` is the block's GateFunction
    (function), HaltingUnit (halting) or None (policy: the plan comes from the GateRun).
    """

    def __init__(
        self,
        index: int,
        kind: str,
        branch: nn.Module,
        shortcut: nn.Module | None,
        *,
        branch_macs: int,
        decider: nn.Module | None = None,
        decider_macs: int = 0,
        group: int = -1,
    ):
        super().__init__()
        self.index = index
        self.kind = kind
        self.branch = branch
        self.shortcut = shortcut
        self.decider = decider
        self.branch_macs = int(branch_macs)
        self.decider_macs = int(decider_macs)
        self.group = group  # halting: the stage's index (its threshold)
        self.run: GateRun | None = None

    def extra_repr(self) -> str:
        return f"index={self.index}, kind={self.kind}, branch_macs={self.branch_macs}"

    def _short(self, entry: torch.Tensor) -> torch.Tensor:
        return entry if self.shortcut is None else self.shortcut(entry)

    def forward(self, entry: torch.Tensor) -> torch.Tensor:
        run = self.run
        if run is None or run.mode == "static":
            return self.branch(entry) + self._short(entry)
        if run.mode == "train":
            return self._train(entry, run)
        if run.scalar:
            return self._one(entry, run)
        mask = self._decide(entry, run)
        if mask is None:  # every sample runs: the static computation, no gathering
            run.executed[:, self.index] = True
            run.macs += self.branch_macs
            return self.branch(entry) + self._short(entry)
        run.executed[:, self.index] = mask
        if run.mode == "export":
            return self._export(entry, mask)
        run.macs += mask.to(run.macs.dtype) * self.branch_macs
        out = self._short(entry)
        index = torch.nonzero(mask).squeeze(1)
        if index.numel() == entry.shape[0]:
            return self.branch(entry) + out
        if index.numel():
            out = out.index_add(0, index, self.branch(entry.index_select(0, index)))
        return out

    def _one(self, entry: torch.Tensor, run: GateRun) -> torch.Tensor:
        """Batch 1, the latency case: the same rules on Python scalars, one sync per gate."""
        if self.kind == "function":
            threshold = run.thr[self.index]
            go = threshold > 1.0
            if not go:
                run.extra_macs += self.decider_macs
                go = _sigmoid(self.decider.logit_one(entry)) > 1.0 - threshold
        elif self.kind == "policy":
            go = True if run.plan_list is None else run.plan_list[self.index]
        else:
            go = self._halt_one(entry, run)
        run.flags[self.index] = go
        if go:
            run.extra_macs += self.branch_macs
            return self.branch.forward(entry) + self._short(entry)
        return self._short(entry)

    def _halt_one(self, entry: torch.Tensor, run: GateRun) -> bool:
        threshold = run.thr[self.group]
        if threshold > 1.0:
            return True
        state = run.halt_one.setdefault(self.group, [0.0, False, None])
        cum, halted, acc = state
        if halted:
            return False
        run.extra_macs += self.decider_macs
        h = _sigmoid(self.decider.logit_one(entry))
        new_cum = min(cum + h, 1.0)
        stop = new_cum >= threshold
        weight = (1.0 - cum) if stop else h
        state[:] = [new_cum, stop, entry * weight if acc is None else acc + entry * weight]
        return not stop

    # eager and export decisions: a bool mask [B], or None when everything runs
    def _decide(self, entry: torch.Tensor, run: GateRun) -> torch.Tensor | None:
        eager = run.mode == "eager"
        if self.kind == "function":
            threshold = run.thresholds[self.index]
            if eager and float(threshold) > 1.0:
                return None
            run.macs += self.decider_macs
            return torch.sigmoid(self.decider(entry).float()) > 1.0 - threshold
        if self.kind == "policy":
            return None if run.plan is None else run.plan[:, self.index]
        return self._halt_decide(entry, run)

    def _halt_state(self, entry: torch.Tensor, run: GateRun) -> HaltState:
        """The stage's halting state, started at its first gated block."""
        if self.group not in run.halt:
            batch = entry.shape[0]
            run.halt[self.group] = HaltState(
                cum=entry.new_zeros(batch, dtype=torch.float32),
                halted=torch.zeros(batch, dtype=torch.bool, device=entry.device),
                acc=torch.zeros_like(entry),
            )
        return run.halt[self.group]

    def _halt_decide(self, entry: torch.Tensor, run: GateRun) -> torch.Tensor | None:
        """Score block l's output (this block's entry); halted samples skip the rest of the stage."""
        threshold = run.thresholds[self.group]
        if run.mode == "eager" and float(threshold) > 1.0:
            return None
        state = self._halt_state(entry, run)
        active = ~state.halted
        if run.mode == "export":
            h = torch.sigmoid(self.decider(entry).float())
            new_cum = torch.clamp(state.cum + h, max=1.0)
            stop = (new_cum >= threshold) & active
            weight = torch.where(stop, 1.0 - state.cum, h) * active
            state.acc = state.acc + _expand(weight.to(entry.dtype), entry) * entry
            state.cum = torch.where(active, new_cum, state.cum)
            state.halted = state.halted | stop
            return ~state.halted
        if not bool(active.any()):  # the whole batch has halted: skip without bookkeeping
            return active
        index = torch.nonzero(active).squeeze(1)
        sub = entry.index_select(0, index)
        h = torch.sigmoid(self.decider(sub).float())
        run.macs.index_add_(
            0, index, torch.full_like(h, float(self.decider_macs), dtype=run.macs.dtype)
        )
        old = state.cum.index_select(0, index)
        new_cum = torch.clamp(old + h, max=1.0)
        stop = new_cum >= threshold
        weight = torch.where(stop, 1.0 - old, h).to(entry.dtype)
        state.acc = state.acc.index_add(0, index, _expand(weight, sub) * sub)
        state.cum = state.cum.index_copy(0, index, new_cum)
        state.halted = state.halted.index_copy(0, index, stop)
        return ~state.halted

    def _export(self, entry: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The branch under `torch.cond`: skipped entirely when no sample needs it.

        Batch 1: the predicate is the sample's own decision. Batch N: the predicate is "any
        sample runs"; inside, the running samples are gathered (nonzero), the branch runs on
        them alone and its output is scattered back, so each sample gets its own result.
        """

        def run_some(entry: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
            index = torch.nonzero(mask).squeeze(1)
            # the predicate guarantees a non-empty gather; export needs to be told so
            torch._check(index.shape[0] >= 1)
            torch._check(index.shape[0] <= entry.shape[0])
            return self._short(entry).index_add(0, index, self.branch(entry.index_select(0, index)))

        def skip(entry: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
            return self._short(entry).clone()

        return _cond(mask.any(), run_some, skip, (entry, mask))

    def _train(self, entry: torch.Tensor, run: GateRun) -> torch.Tensor:
        """Every sample runs the branch; a straight-through 0/1 weight scales it.

        Decision units read a detached entry: otherwise the compute term's gradient reaches the
        backbone through the gate inputs and trains the features to close the gates (it
        diverged within ten steps on a pretrained ResNet-32).
        """
        branch, short = self.branch(entry), self._short(entry)
        if self.kind == "function":
            logits = self.decider(entry.detach()).float()
            run.gate_probs.append(torch.sigmoid(logits))
            weight = straight_through_gumbel(logits, run.temperature)
            run.macs = run.macs + self.decider_macs
            greedy = logits.detach() > 0.0
        elif self.kind == "policy":
            weight = run.plan[:, self.index]
            greedy = run.greedy_plan[:, self.index]
        else:
            self._halt_train(entry, run)
            return branch + short  # halted samples' later outputs are ignored by the mix
        run.executed[:, self.index] = weight.detach() > 0.5
        run.greedy_macs += greedy.to(run.greedy_macs.dtype) * self.branch_macs
        run.macs = run.macs + weight * self.branch_macs
        return _expand(weight.to(branch.dtype), branch) * branch + short

    def _halt_train(self, entry: torch.Tensor, run: GateRun) -> torch.Tensor:
        """ACT with the training threshold; returns the straight-through 'still running' weight."""
        state = self._halt_state(entry, run)
        active = ~state.halted
        h = torch.sigmoid(self.decider(entry.detach()).float())
        run.gate_probs.append(h)
        run.macs = run.macs + active.float() * self.decider_macs
        new_cum = torch.clamp(state.cum + h, max=1.0)
        stop = (new_cum >= run.train_threshold) & active
        weight = torch.where(stop, 1.0 - state.cum, h) * active
        state.acc = state.acc + _expand(weight.to(entry.dtype), entry) * entry
        state.cum = torch.where(active, new_cum, state.cum)
        state.halted = state.halted | stop
        running = (~state.halted).float()
        # The mass still running, 1 - sum h, unclamped so the compute gradient never vanishes
        # on a saturated stage (the clamped cumulative score has none).
        state.raw = h if state.raw is None else state.raw + h
        soft = 1.0 - state.raw
        weight = running + soft - soft.detach()
        run.executed[:, self.index] = ~state.halted
        run.macs = run.macs + weight * self.branch_macs
        run.greedy_macs += running.to(run.greedy_macs.dtype) * self.branch_macs
        return weight


class HaltMix(nn.Module):
    """End of a halting stage: halted samples take the ACT mix, the others the last output."""

    def __init__(self, group: int):
        super().__init__()
        self.group = group
        self.run: GateRun | None = None

    def forward(self, last: torch.Tensor) -> torch.Tensor:
        run = self.run
        if run is None or run.mode == "static":
            return last
        if run.scalar:
            state = run.halt_one.get(self.group)
            return state[2] if state is not None and state[1] else last
        state = run.halt.get(self.group)
        if state is None or state.acc is None:  # halting was off (threshold > 1)
            return last
        return torch.where(_expand(state.halted, last), state.acc, last)


def _sigmoid(x: float) -> float:
    """Sigmoid of a Python float (double precision; the batched path's float32 result can only
    differ within ~1e-7 of a threshold)."""
    return 1.0 / (1.0 + math.exp(-x)) if x > -700.0 else 0.0


def _expand(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return values.reshape(values.shape[0], *([1] * (like.dim() - 1)))


# --- the model --------------------------------------------------------------------------------


class GatedModel(DynamicModel):
    """The rewritten graph (`gm`) with `gate_<k>` wrappers, plus the policy network if any."""

    strategy = "block-gates"

    def __init__(
        self,
        gm: torch.fx.GraphModule,
        *,
        kind: str,
        gate_names: Sequence[str],
        fixed_macs: int,
        thresholds: Sequence[float],
        policy: nn.Module | None = None,
        policy_macs: int = 0,
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
        super().__init__(static_macs=static_macs, input_shape=input_shape, num_classes=num_classes)
        if kind not in GATE_KINDS:
            raise StrategyError(f"Unknown gate kind '{kind}'; choose one of {GATE_KINDS}.")
        if estimator not in ESTIMATORS:
            raise StrategyError(f"Unknown estimator '{estimator}'; choose one of {ESTIMATORS}.")
        self.gm = gm
        self.kind = kind
        self.gate_names = list(gate_names)  # the join node each gate replaced
        self.policy = policy
        self.policy_macs = int(policy_macs)
        self.fixed_macs = int(fixed_macs)
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
        self.register_buffer("thresholds", torch.tensor(list(thresholds), dtype=torch.float32))
        self.last_gates: torch.Tensor | None = None

    # structure ---------------------------------------------------------------------------
    @property
    def gates(self) -> list[BlockGate]:
        return [m for m in self.gm.children() if isinstance(m, BlockGate)]

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

    def min_macs(self) -> int:
        """MACs of a sample that skips every block it may (decision units included)."""
        deciders = sum(g.decider_macs for g in self.gates if g.kind == "function")
        return self.fixed_macs + self.policy_macs + deciders

    def describe(self) -> list[dict[str, str]]:
        """One row per gated block for tables."""
        rows = []
        for gate, name in zip(self.gates, self.gate_names, strict=True):
            t = self.thresholds[gate.group if self.kind == "halting" else gate.index]
            rows.append(
                {
                    "gate": str(gate.index),
                    "join": name,
                    "branch MACs": f"{gate.branch_macs / 1e6:.2f} M",
                    "of static": f"{gate.branch_macs / self.static_macs:.3f}",
                    "shortcut": "identity" if gate.shortcut is None else "runs alone",
                    "threshold": f"{float(t):.3f}",
                }
            )
        return rows

    def set_thresholds(self, thresholds: Sequence[float] | float) -> None:
        k = len(self.thresholds)
        values = (
            [float(thresholds)] * k if isinstance(thresholds, int | float) else list(thresholds)
        )
        if len(values) != k:
            raise ValueError(f"expected {k} thresholds, got {len(values)}")
        self.thresholds.copy_(torch.tensor(values))

    # running -----------------------------------------------------------------------------
    def _bind(self, run: GateRun | None) -> None:
        for module in self._wrappers():
            module.run = run

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
            macs=torch.full((batch,), float(self.fixed_macs), dtype=torch.float64),
            executed=torch.zeros(batch, self.num_gates, dtype=torch.bool, device=x.device),
            train_threshold=1.0 - self.epsilon,
            temperature=self.temperature,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        batch = x.shape[0]
        if self._static:
            out = self._run_graph(x, self._new_run(x, "static", self.thresholds))
            self.last_macs = torch.full((batch,), self.static_macs, dtype=torch.long)
            self.last_gates = torch.ones(batch, self.num_gates, dtype=torch.bool)
            return out
        if batch == 1:
            return self._forward_one(x)
        run = self._new_run(x, "eager", self.thresholds)
        if self.kind == "policy" and bool((self.thresholds <= 1.0).any()):
            run.macs += self.policy_macs
            probs = torch.sigmoid(self.policy(x).float())
            run.plan = probs > 1.0 - self.thresholds
        out = self._run_graph(x, run)
        self.last_macs = run.macs.round().long()
        self.last_gates = run.executed.clone()
        return out

    def _forward_one(self, x: torch.Tensor) -> torch.Tensor:
        thr = self.thresholds.tolist()
        run = GateRun(
            mode="eager",
            thresholds=self.thresholds,
            macs=torch.zeros(1, dtype=torch.float64),
            executed=torch.zeros(1, 0, dtype=torch.bool),
            scalar=True,
            thr=thr,
            flags=[True] * self.num_gates,
        )
        if self.kind == "policy" and min(thr) <= 1.0:
            run.extra_macs += self.policy_macs
            probs = torch.sigmoid(self.policy(x).float())[0]
            run.plan_list = (probs > 1.0 - self.thresholds).tolist()
        out = self._run_graph(x, run)
        self.last_macs = torch.tensor([round(self.fixed_macs + run.extra_macs)], dtype=torch.long)
        self.last_gates = torch.tensor([run.flags], dtype=torch.bool)
        return out

    def gate_probabilities(self, x: torch.Tensor) -> torch.Tensor:
        """[B, K] each gate's open probability (policy, function) with every block run."""
        self.check_input(x)
        if self.kind == "policy":
            return torch.sigmoid(self.policy(x).float())
        run = self._new_run(x, "train", self.thresholds)
        self._run_graph(x, run)
        probs = torch.stack(run.gate_probs, 1)
        return probs if self.kind == "function" else probs.cumsum(1).clamp(max=1.0)

    # training ----------------------------------------------------------------------------
    def training_loss(
        self,
        x: torch.Tensor,
        teacher_logits: torch.Tensor | None,
        labels: torch.Tensor | None = None,
        budget: float | None = None,
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """Distillation (+ CE on labels) under sampled decisions, plus a compute term.

        function / halting: straight-through Gumbel (halting: ACT's deterministic scores, a
        straight-through 'still running' weight) plus `price * mean MAC fraction`, where the
        price follows the distance of the deterministic decisions' MACs from the budget. policy: REINFORCE as in BlockDrop (Bernoulli actions with exploration,
        batch-mean baseline; the reward is minus the sample's distillation loss minus a cost
        term whose sign follows the batch's distance to the budget), or Gumbel.
        """
        self.check_input(x)
        budget = self.budget if budget is None else float(budget)
        if teacher_logits is None:  # fine-tuning with the backbone frozen: it is the teacher
            with torch.no_grad(), self.static():
                teacher_logits = self(x)
        run = self._new_run(x, "train", self.thresholds)
        run.greedy_macs = run.macs.clone()
        run.macs = run.macs.float()
        log_prob = None
        if self.kind == "policy":
            run.macs = run.macs + self.policy_macs
            run.greedy_macs += self.policy_macs
            logits = self.policy(x).float()
            run.greedy_plan = logits.detach() > 0.0
            if self.estimator == "gumbel":
                run.plan = straight_through_gumbel(logits, self.temperature)
            else:
                probs = torch.sigmoid(logits)
                explore = 0.9 * probs + 0.1 * (1 - probs)  # BlockDrop's alpha-bounded sampling
                actions = torch.bernoulli(explore.detach())
                run.plan = actions
                log_prob = (
                    actions * torch.log(explore.clamp_min(1e-6))
                    + (1 - actions) * torch.log((1 - explore).clamp_min(1e-6))
                ).sum(1)
            run.gate_probs.append(torch.sigmoid(logits))
        logits = self._run_graph(x, run)
        t = self.distill_temperature
        kd = (
            F.kl_div(
                F.log_softmax(logits / t, -1),
                F.log_softmax(teacher_logits.detach() / t, -1),
                reduction="none",
                log_target=True,
            ).sum(-1)
            * t
            * t
        )
        task = kd
        ce = None
        if labels is not None:
            ce = F.cross_entropy(logits, labels, reduction="none")
            task = task + ce
        fraction = run.macs / self.static_macs
        mean_fraction = fraction.mean()
        # The price of compute is a PI controller on the distance between the budget and what
        # the deterministic (inference) decisions would spend: proportional plus integral (dual
        # ascent on the budget constraint), so it keeps pushing until the mean sits on budget.
        greedy_fraction = float(run.greedy_macs.mean()) / self.static_macs
        gap = greedy_fraction - budget
        multiplier = float(self.budget_multiplier)
        self.budget_multiplier.fill_(max(-10.0, min(10.0, multiplier + self.budget_rate * gap)))
        price = self.compute_weight * gap + multiplier
        if log_prob is not None:
            reward = -task.detach() - price * fraction.detach()
            advantage = reward - reward.mean()
            compute = -(advantage * log_prob).mean()
        else:
            compute = price * mean_fraction
        loss = task.mean() + compute
        self.last_macs = run.macs.detach().round().long()
        self.last_gates = run.executed.clone()
        metrics = {
            "loss": float(loss.detach()),
            "distill": float(kd.mean().detach()),
            "compute": float(compute.detach()),
            "macs_fraction": float(mean_fraction.detach()),
            "greedy_macs_fraction": greedy_fraction,
            "compute_price": price,
        }
        if ce is not None:
            metrics["ce"] = float(ce.mean().detach())
        return loss, metrics

    # export ------------------------------------------------------------------------------
    def export_module(self) -> nn.Module:
        """The export face: forward(x, thresholds) -> (logits, executed [N, K] int64)."""
        return GatedExport(self)


class GatedExport(nn.Module):
    """`GatedModel` with every skippable branch under `torch.cond` (ONNX: an `If` per block).

    Decisions are computed outside the conditionals from `thresholds` (a graph input), so
    export keeps them as tensors. With batch N, a branch runs when any sample needs it, and
    only on those samples (gathered inside the `If`), so every sample gets its eager result.
    """

    def __init__(self, model: GatedModel):
        super().__init__()
        self.model = model
        self.register_buffer("thresholds", model.thresholds.detach().clone())

    @property
    def num_exits(self) -> int:  # the number of threshold entries, for generic export code
        return len(self.thresholds)

    def forward(
        self, x: torch.Tensor, thresholds: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        model = self.model
        thr = (self.thresholds if thresholds is None else thresholds).to(torch.float32)
        run = model._new_run(x, "export", thr)
        if model.kind == "policy":
            run.plan = torch.sigmoid(model.policy(x).float()) > 1.0 - thr
        logits = model._run_graph(x, run)
        return logits, run.executed.to(torch.int64)
