"""`BlockGate`, the wrapper that runs a residual branch only for the samples whose gate is open,
and the per-forward state (`GateRun`) that all wrappers of one forward pass share."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from dynify.runtime import mac_cap
from dynify.runtime.control import cond
from dynify.runtime.decisions import (
    gate_open,
    gate_open_one,
    gate_probability,
    greedy_open,
    halting_update,
    halting_update_one,
    halts_by_tensor_rule,
    sigmoid_one,
    straight_through_gumbel,
)
from dynify.runtime.ledger import CostBook, Tab

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
    # what each sample spent, charged by the wrappers (`dynify.runtime.ledger`): float64 [B],
    # float32 and straight-through in training, a Python float in scalar runs
    tab: Tab
    executed: torch.Tensor | None = None  # [B, K] bool: which gated branches ran
    plan: torch.Tensor | None = None  # policy: [B, K] run decision (float 0/1 in training)
    greedy_plan: torch.Tensor | None = None  # policy, training: the deterministic plan
    greedy: Tab | None = None  # training: what the deterministic decisions would spend
    halt: dict[int, HaltState] = field(default_factory=dict)
    # batch 1 in eager mode: decisions and costs as Python scalars (no tensor bookkeeping)
    scalar: bool = False
    thr: list[float] = field(default_factory=list)
    plan_list: list[bool] | None = None
    flags: list[bool] = field(default_factory=list)
    halt_one: dict[int, list] = field(default_factory=dict)
    train_threshold: float = 0.99
    temperature: float = 1.0
    # the MAC cap (`dynify.runtime.mac_cap`): each sample's allowance left, [B] float64 (a
    # float at batch 1), or None without a cap
    left: torch.Tensor | float | None = None


# --- the wrappers -----------------------------------------------------------------------------


def branch_item(index: int) -> str:
    """The cost book's item of gated block `index`'s branch."""
    return f"branch{index}"


def decider_item(index: int) -> str:
    """The cost book's item of gated block `index`'s decision unit (gate or halting unit)."""
    return f"gate{index}"


class RunContext(threading.local):
    """The forward pass a model's wrappers are part of: one object shared by all of them, so
    starting a pass is one assignment, not an `nn.Module.__setattr__` per block (those cost
    ~0.15 ms per forward on ResNet-44, 4 % of it at batch 1). Per thread: two threads running
    the model at once each see their own pass. A copy of the model starts with none bound."""

    run: Any = None  # GateRun, MaskExportRun or None

    def __reduce__(self) -> tuple:
        return (type(self), ())


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
        book: CostBook,
        decider: nn.Module | None = None,
        group: int = -1,
    ):
        super().__init__()
        self.index = index
        self.kind = kind
        self.branch = branch
        self.shortcut = shortcut
        self.decider = decider
        # the model's cost book, holding this block's items `branch_item` and `decider_item`
        self.book = book
        self.branch_item = branch_item(index)
        self.decider_item = decider_item(index) if decider is not None else None
        self.group = group  # halting: the stage's index (its threshold)
        self.context = RunContext()  # GatedModel shares one among all its wrappers
        # Set by the pass when the block's join was followed by a ReLU: the wrapper applies it,
        # and a skipped identity block whose input is a ReLU's output returns it untouched.
        self.relu_after = False
        self.skip_returns_entry = False

    @property
    def branch_macs(self) -> int:
        """What running the branch costs one sample (the cost book's)."""
        return self.book.macs(self.branch_item)

    @property
    def decider_macs(self) -> int:
        """What the block's decision unit costs one sample; 0 for the policy's blocks."""
        return 0 if self.decider_item is None else self.book.macs(self.decider_item)

    def extra_repr(self) -> str:
        relu = ", relu_after=True" if self.relu_after else ""
        return f"index={self.index}, kind={self.kind}, branch_macs={self.branch_macs}{relu}"

    def _out(self, joined: torch.Tensor) -> torch.Tensor:
        return torch.relu(joined) if self.relu_after else joined

    def _short(self, entry: torch.Tensor) -> torch.Tensor:
        # `.forward`, not `__call__`: a GraphModule's call wrapper costs ~10 us per block at
        # batch 1, which the original network does not pay (hooks on the modules inside fire)
        return entry if self.shortcut is None else self.shortcut.forward(entry)

    def forward(self, entry: torch.Tensor) -> torch.Tensor:
        run = self.context.run
        if run is None or run.mode == "static":
            return self._out(self.branch.forward(entry) + self._short(entry))
        if run.mode == "train":
            return self._out(self._train(entry, run))
        if run.scalar:
            return self._one(entry, run)
        mask = self._decide(entry, run)
        if run.left is not None:
            mask = self._cap(entry, run, mask)
        if mask is None:  # every sample runs: the static computation, no gathering
            run.executed[:, self.index] = True
            run.tab.charge(self.branch_item)
            return self._out(self.branch(entry) + self._short(entry))
        run.executed[:, self.index] = mask
        if run.mode == "export":
            return self._out(self._export(entry, mask))
        run.tab.charge(self.branch_item, mask)
        out = self._short(entry)
        index = torch.nonzero(mask).squeeze(1)
        if index.numel() == entry.shape[0]:
            return self._out(self.branch(entry) + out)
        if index.numel():
            out = out.index_add(0, index, self.branch(entry.index_select(0, index)))
        return self._out(out)

    def _one(self, entry: torch.Tensor, run: GateRun) -> torch.Tensor:
        """Batch 1, the latency case: the same rules on Python scalars, one sync per gate."""
        if self.kind == "function":
            threshold = run.thr[self.index]
            go = threshold > 1.0
            if not go:
                run.tab.charge(self.decider_item)
                go = gate_open_one(self.decider.logit_one(entry), threshold)
        elif self.kind == "policy":
            go = True if run.plan_list is None else run.plan_list[self.index]
        else:
            go = self._halt_one(entry, run)
        if go and run.left is not None:
            if self.branch_macs <= run.left:
                run.left -= self.branch_macs
            else:  # the cap: the branch does not fit what is left of the allowance
                go = False
                if self.kind == "halting":
                    self._force_halt_one(entry, run)
        run.flags[self.index] = go
        if go:
            run.tab.charge(self.branch_item)
            return self._out(self.branch.forward(entry) + self._short(entry))
        return entry if self.skip_returns_entry else self._out(self._short(entry))

    def _halt_one(self, entry: torch.Tensor, run: GateRun) -> bool:
        threshold = run.thr[self.group]
        if threshold > 1.0:
            return True
        # [cumulative score, halted, ACT mix so far, the stage's halting logits (for ties)]
        state = run.halt_one.setdefault(self.group, [0.0, False, None, []])
        cum, halted, acc, logits = state
        if halted:
            return False
        run.tab.charge(self.decider_item)
        logit = self.decider.logit_one(entry)
        logits.append(logit)
        new_cum, stop, weight = halting_update_one(
            cum, sigmoid_one(logit), threshold, lambda: halts_by_tensor_rule(logits, threshold)
        )
        state[:3] = [new_cum, stop, entry * weight if acc is None else acc + entry * weight]
        return not stop

    def _force_halt_one(self, entry: torch.Tensor, run: GateRun) -> None:
        """The cap halts the sample here: its entry takes the remainder, as a halt would."""
        state = run.halt_one.setdefault(self.group, [0.0, False, None, []])
        cum, _, acc = state[:3]
        weight = 1.0 - cum
        state[:3] = [1.0, True, entry * weight if acc is None else acc + entry * weight]

    def _cap(self, entry: torch.Tensor, run: GateRun, mask: torch.Tensor | None) -> torch.Tensor:
        """The decisions under the MAC cap: a branch runs only where it fits the allowance
        (`dynify.runtime.mac_cap`); halting samples it stops halt here."""
        go = mac_cap.fits(run.left, self.branch_macs)
        if self.kind == "halting":
            state = self._halt_state(entry, run)
            forced = ~state.halted & ~go
            weight = torch.where(forced, 1.0 - state.cum, torch.zeros_like(state.cum))
            state.acc = state.acc + _expand(weight.to(entry.dtype), entry) * entry
            state.cum = torch.where(forced, torch.ones_like(state.cum), state.cum)
            state.halted = state.halted | forced
            mask = ~state.halted
        else:
            mask = go if mask is None else mask & go
        run.left = mac_cap.spend(run.left, self.branch_macs, mask)
        return mask

    # eager and export decisions: a bool mask [B], or None when everything runs
    def _decide(self, entry: torch.Tensor, run: GateRun) -> torch.Tensor | None:
        eager = run.mode == "eager"
        if self.kind == "function":
            threshold = run.thresholds[self.index]
            if eager and float(threshold) > 1.0:
                return None
            run.tab.charge(self.decider_item)
            return gate_open(gate_probability(self.decider(entry)), threshold)
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
            return None  # no unit runs (with a cap, `_cap` keeps the stage's halting state)
        state = self._halt_state(entry, run)
        active = ~state.halted
        if run.mode == "export":  # every sample scores; the halted ones weigh nothing
            h = gate_probability(self.decider(entry))
            if run.left is not None:  # as eager, where a threshold above 1 runs no unit
                h = torch.where(threshold > 1.0, torch.zeros_like(h), h)
            self._halt_all(entry, h, threshold, state)
            return ~state.halted
        if not bool(active.any()):  # the whole batch has halted: skip without bookkeeping
            return active
        index = torch.nonzero(active).squeeze(1)
        sub = entry.index_select(0, index)
        h = gate_probability(self.decider(sub))
        run.tab.charge_rows(self.decider_item, index)
        new_cum, stop, weight = halting_update(state.cum.index_select(0, index), h, threshold)
        weight = weight.to(entry.dtype)
        state.acc = state.acc.index_add(0, index, _expand(weight, sub) * sub)
        state.cum = state.cum.index_copy(0, index, new_cum)
        state.halted = state.halted.index_copy(0, index, stop)
        return ~state.halted

    @staticmethod
    def _halt_all(entry: torch.Tensor, h: torch.Tensor, threshold, state: HaltState) -> None:
        """ACT over the whole batch (export, training): halted samples keep their state."""
        state.cum, stop, weight = halting_update(state.cum, h, threshold, ~state.halted)
        state.acc = state.acc + _expand(weight.to(entry.dtype), entry) * entry
        state.halted = state.halted | stop

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

        return cond(mask.any(), run_some, skip, (entry, mask))

    def _train(self, entry: torch.Tensor, run: GateRun) -> torch.Tensor:
        """Every sample runs the branch; a straight-through 0/1 weight scales it.

        Decision units read a detached entry: otherwise the compute term's gradient reaches the
        backbone through the gate inputs and trains the features to close the gates (it
        diverged within ten steps on a pretrained ResNet-32).
        """
        branch, short = self.branch(entry), self._short(entry)
        if self.kind == "function":
            logits = self.decider(entry.detach()).float()
            weight = straight_through_gumbel(logits, run.temperature)
            run.tab.charge(self.decider_item)
            greedy = greedy_open(logits.detach())
        elif self.kind == "policy":
            weight = run.plan[:, self.index]
            greedy = run.greedy_plan[:, self.index]
        else:
            self._halt_train(entry, run)
            return branch + short  # halted samples' later outputs are ignored by the mix
        run.executed[:, self.index] = weight.detach() > 0.5
        run.greedy.charge(self.branch_item, greedy)
        run.tab.charge(self.branch_item, weight)
        return _expand(weight.to(branch.dtype), branch) * branch + short

    def _halt_train(self, entry: torch.Tensor, run: GateRun) -> torch.Tensor:
        """ACT with the training threshold; returns the straight-through 'still running' weight."""
        state = self._halt_state(entry, run)
        active = ~state.halted
        h = gate_probability(self.decider(entry.detach()))
        run.tab.charge(self.decider_item, active.float())
        self._halt_all(entry, h, run.train_threshold, state)
        running = (~state.halted).float()
        # The mass still running, 1 - sum h, unclamped so the compute gradient never vanishes
        # on a saturated stage (the clamped cumulative score has none).
        state.raw = h if state.raw is None else state.raw + h
        soft = 1.0 - state.raw
        weight = running + soft - soft.detach()
        run.executed[:, self.index] = ~state.halted
        run.tab.charge(self.branch_item, weight)
        run.greedy.charge(self.branch_item, running)
        return weight


class HaltMix(nn.Module):
    """End of a halting stage: halted samples take the ACT mix, the others the last output."""

    def __init__(self, group: int):
        super().__init__()
        self.group = group
        self.context = RunContext()

    def forward(self, last: torch.Tensor) -> torch.Tensor:
        run = self.context.run
        if run is None or run.mode == "static":
            return last
        if run.scalar:
            state = run.halt_one.get(self.group)
            return state[2] if state is not None and state[1] else last
        state = run.halt.get(self.group)
        if state is None or state.acc is None:  # halting was off (threshold > 1)
            return last
        return torch.where(_expand(state.halted, last), state.acc, last)


def _expand(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return values.reshape(values.shape[0], *([1] * (like.dim() - 1)))
