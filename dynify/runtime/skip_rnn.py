"""SkipRNNModel: an RNN whose samples skip the state updates they do not need (Skip RNN,
Campos et al. ICLR 2018).

The pass replaces the model's `nn.LSTM` / `nn.GRU` call by a `SkipRNN` wrapper holding the
original module and a gate (a linear layer on the hidden state, then a sigmoid). Per sample, the
gate reads the state right after an update and gives delta u, the per-step growth of the
cumulative update probability: u restarts at delta after an update and grows by delta per
skipped step, and a step updates when u > 1 - threshold. So when a sample updates, the number
of steps to its next update is known (`decisions.steps_to_next_update`), and the steps in
between run nothing for it: not the cell, not the input projection, not the gate; its state
(and the layer's output at those steps) is the state of its last update. The first step always
updates (u starts at 1).

Faces, one decision rule:
- eager: per step, only the samples due to update run the stacked cell (gather, run, scatter,
  `dynify.runtime.recurrence`); a threshold above 1 (every step updates) runs the fused kernel,
  exactly the static layer; the gate runs only where its value can change a decision;
- training: every sample runs every step, the state mixed by the straight-through binary
  update (`s_t = b_t cell(s_{t-1}, x_t) + (1 - b_t) s_{t-1}`), plus a priced budget on the share
  of updates;
- export: one `torch.cond` per step (ONNX `If`) whose true branch gathers the samples due,
  under an outer `torch.cond` that runs the fused layer when every step updates.

With a MAC cap (`set_mac_cap`, the arithmetic of `dynify.runtime.mac_cap`) a sample's
allowance is the cap minus the floor (the layers around the recurrent one, the first update
and the gate after it); an update after the first runs only if its cost (the step, and the
gate after it when the gate decides) fits what is left, which it then uses up. An update that
does not fit is skipped (the state copied) and the sample stays due at the next step, so it
updates at most as often as the cap allows, whatever its input and the threshold. Every face
applies the same arithmetic, per sample and step by step, so a batch decides as its samples
alone.

Padded batches: where the rest of the network reads the layer's outputs only up to each
text's end (`dynify.frontend.sequence_reads`), the model computes each sample's length from its
inputs first (`SkipRun.limit`) and a sample never updates at a padding step, in every face: its
state after its text ends is the state of its last update, which the network does not read.
With every decision off (a threshold above 1), the samples run stretch by stretch through the
fused kernel, each up to its own length.

Inside `static()` the wrapper calls the original module: the original network, bit-exact.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from dynify.errors import StrategyError
from dynify.frontend.inputs import as_inputs
from dynify.runtime import mac_cap
from dynify.runtime.control import cond, selected
from dynify.runtime.decisions import (
    accumulate_update_probability,
    gate_decides,
    steps_to_next_update,
    steps_to_next_update_one,
    straight_through_update,
    update_boundary,
    update_probability,
    updates_every_step,
)
from dynify.runtime.mac_cap import CapHolder
from dynify.runtime.model import (
    DECIDER,
    FIXED,
    UNIT,
    CostBook,
    DynamicModel,
    ExportFace,
    JointRecipe,
    PerCallRecord,
    Tab,
)
from dynify.runtime.recurrence import (
    State,
    batch_first,
    cell_step,
    check_module,
    fast_cell_step,
    fast_path,
    gather_state,
    module_output,
    packed_weights,
    run_stretch,
    scatter_state,
    step_rows,
    zero_state,
)
from dynify.train.losses import (
    LossConfig,
    budget_price,
    distillation,
    priced_compute,
    step_metrics,
)

# The binarisation threshold training decides with (u > 0.5, the paper's rounding).
TRAIN_THRESHOLD = 0.5


# The cost book's items (`dynify.runtime.ledger`): the layers around the recurrent one and the
# first update are paid by every sample; the gate after the first update by every sample whose
# gate decides; each later update and the gate after it by the samples that make it.
AROUND = "around the recurrent layer"
FIRST_STEP = "first step"
FIRST_GATE = "gate after the first step"
LATER_STEPS = "later steps"
LATER_GATES = "gates after later steps"


def cost_book(
    static_macs: int, around_macs: int, step_macs: int, gate_macs: int, steps: int
) -> CostBook:
    """The book of a skip-rnn model: `step_macs` per update of a sample (every layer of the
    stack), `gate_macs` per gate run, over `steps` steps (no gate after the last)."""
    book = CostBook(static_macs)
    book.add(AROUND, around_macs, FIXED)
    book.add(FIRST_STEP, step_macs, FIXED)
    book.add(FIRST_GATE, gate_macs if steps > 1 else 0, DECIDER)
    book.add(LATER_STEPS, (steps - 1) * step_macs, UNIT)
    book.add(LATER_GATES, max(steps - 2, 0) * gate_macs, UNIT)
    return book


@dataclass
class SkipRun:
    """What one forward pass asks of the wrapper, and what it leaves behind."""

    mode: str  # "static" | "eager" | "train" | "export"
    thresholds: Tensor
    updates: Tensor | None = None  # [B, T] bool (train: float, straight-through)
    gates: Tensor | None = None  # [B] int64: how many times the gate ran per sample
    share: Tensor | None = None  # train: mean update share with the straight-through gradient
    cap: int | None = None  # the MAC cap (a Python int, a constant of an export), None: none
    floor: int = 0  # what a sample spends whatever it decides (`SkipRNNModel.cap_floor`)
    # [B] int64: the steps each sample runs at most (its text's length), None: every step
    limit: Tensor | None = None
    tab: Tab | None = None  # what each sample spends (`dynify.runtime.ledger`), None: no count
    extra: dict[str, Any] = field(default_factory=dict)


class RunContext(threading.local):
    """The pass in flight, per thread (see `gate_wrapper.RunContext`)."""

    run: SkipRun | None = None

    def __reduce__(self) -> tuple:
        return (type(self), ())


class SkipRNN(nn.Module):
    """The recurrent layer with Skip RNN's update gate; called like the module it replaces."""

    def __init__(self, rnn: nn.Module, *, steps: int, book: CostBook, gate_bias: float = 2.0):
        super().__init__()
        self.rnn = check_module(rnn)
        self.gate = nn.Linear(self.rnn.hidden_size, 1)
        with torch.no_grad():  # start by updating every step: the budget term lowers it
            self.gate.weight.mul_(0.1)
            self.gate.bias.fill_(gate_bias)
        self.steps = int(steps)
        self.book = book
        self.context = RunContext()

    @property
    def step_macs(self) -> int:
        """What one update of one sample costs (the book's)."""
        return self.book.macs(FIRST_STEP)

    @property
    def gate_macs(self) -> int:
        """What one run of the gate on one sample costs (the book's)."""
        return self.book.macs(FIRST_GATE)

    def charge(self, tab: Tab, updates: Tensor, gates: Tensor) -> None:
        """Charge the tab from the update flags [B, T] and the gate runs per sample [B]."""
        device = tab.spent.device
        updates, gates = updates.to(device), gates.to(device).long()
        tab.charge(FIRST_GATE, gates > 0)
        later_gates = (gates - 1).clamp(min=0).double() * self.gate_macs
        tab.charge_amount(LATER_GATES, later_gates)
        later_steps = (updates.sum(1).long() - 1).clamp(min=0).double() * self.step_macs
        tab.charge_amount(LATER_STEPS, later_steps)

    def forward(self, x: Tensor) -> Any:
        run = self.context.run
        if run is None or run.mode == "static":
            return self.rnn(x)
        xb = batch_first(self.rnn, x)
        if run.mode == "train":
            out, state = self._train(xb, run)
        elif run.mode == "export":
            out, state = self._export(xb, run)
        else:
            out, state = self._eager(xb, run)
        if run.tab is not None:
            self.charge(run.tab, run.updates, run.gates)
        return module_output(self.rnn, out, state)

    def delta(self, state: State) -> Tensor:
        """delta u [M] from the state right after an update."""
        return update_probability(self.gate(state.top).squeeze(-1))

    # --- the MAC cap (`dynify.runtime.mac_cap`) ---------------------------------------------
    def update_cost(self, t: int, gated: bool | Tensor) -> float | Tensor:
        """What an update at step t > 0 costs: the step, and the gate after it when the gate
        decides (`gate_decides`; never after the last step)."""
        if t + 1 >= self.steps:
            return float(self.step_macs)
        if isinstance(gated, Tensor):
            return gated.to(torch.float64) * self.gate_macs + self.step_macs
        return float(self.step_macs + (self.gate_macs if gated else 0))

    def update_costs(self, t: Tensor, gated: Tensor) -> Tensor:
        """`update_cost` of updates at steps `t` [M] (each > 0), float64 [M]."""
        cost = gated.to(torch.float64) * self.gate_macs + self.step_macs
        return torch.where(t + 1 >= self.steps, float(self.step_macs), cost)

    def every_step_fits(self, run: SkipRun) -> bool:
        """Whether updating at every step (no gate) fits the cap: then the fused kernel runs."""
        return run.cap is None or (self.steps - 1) * self.step_macs <= run.cap - run.floor

    def allowance(self, run: SkipRun, batch: int, device: torch.device) -> Tensor | None:
        """[B] float64: what each sample may spend beyond the floor; None without a cap."""
        if run.cap is None:
            return None
        return mac_cap.allowance(run.cap, run.floor, batch, device)

    # --- eager: update rounds, only the samples due to update run ---------------------------
    def _eager(self, xb: Tensor, run: SkipRun) -> tuple[Tensor, State]:
        """Update by update, not step by step: in round k every sample with a step left makes
        its k-th update at its own position (one gather of the inputs at those positions, one
        cell call, the gate on those rows), so a batch takes as many rounds as its busiest
        sample updates, each on every sample still due. The layer's output at step t is the
        state of the sample's last update at or before t (`_held`).

        The schedule (positions, allowances) is kept in Python numbers: a round's bookkeeping
        on a few dozen numbers costs less in Python than in tensor ops, and the gate's logits
        are decided in doubles by `steps_to_next_update_one`, which hands near-ties to the
        tensor rule, so the schedule is the tensor rule's."""
        batch, steps = xb.shape[0], xb.shape[1]
        threshold = run.thresholds[0]
        every = bool(updates_every_step(threshold))
        limits = [steps] * batch if run.limit is None else run.limit.tolist()
        if every and self.every_step_fits(run):
            out, state = self._fused_to_limits(xb, limits)
            positions = torch.arange(steps, device=xb.device)
            run.updates = positions[None, :] < torch.tensor(limits, device=xb.device)[:, None]
            run.gates = torch.zeros(batch, dtype=torch.long)
            return out, state
        use_gate = gate_decides(float(threshold))
        boundary = float(update_boundary(threshold))
        # without the gate: every step (above 1, the cap forbidding the fused kernel) or never
        ahead = 1 if every else steps + 1
        # each sample's allowance left (`mac_cap.allowance`), in Python floats as the schedule is
        left = None if run.cap is None else [float(run.cap - run.floor)] * batch
        flat_inputs = xb.reshape(batch * steps, xb.shape[2])
        # the cell's weights, looked up once for every round (None: the module's own, where a
        # gradient is asked for)
        weights = packed_weights(self.rnn) if fast_path(self.rnn, xb) else None
        pos = [0] * batch  # each sample's next update; at or past its limit: done
        tops: list[Tensor] = []  # the layer's output after each round's updates
        places: list[int] = []  # where each row of them goes in [B * T]
        # The state of the samples still running (`alive`, in batch order): every one of them
        # updates in every round unless the cap holds it back, so the state is gathered only
        # when samples finish, not per round.
        alive = list(range(batch))
        state = zero_state(self.rnn, batch, xb)
        finished: list[tuple[list[int], State]] = []
        rows, first = alive, True
        while alive:
            if left is not None and not first:  # the first update is in the floor
                rows = self._fit_cap(alive, pos, limits, left, use_gate)
            if rows:
                ts = [pos[r] for r in rows]
                flat = [r * steps + t for r, t in zip(rows, ts, strict=True)]
                if len(flat) == 1:  # one row: a slice, no index tensor
                    x_t = flat_inputs[flat[0] : flat[0] + 1]
                else:
                    x_t = flat_inputs.index_select(0, torch.tensor(flat, device=xb.device))
                if len(rows) == len(alive):
                    new = state = self._cell(x_t, state, weights)
                else:
                    where = {r: i for i, r in enumerate(alive)}
                    index = torch.tensor([where[r] for r in rows], device=xb.device)
                    new = self._cell(x_t, gather_state(state, index), weights)
                    state = scatter_state(state, index, new)
                tops.append(new.top)
                places.extend(flat)
                on = [i for i, t in enumerate(ts) if t + 1 < limits[rows[i]]]
                gaps = [ahead] * len(on)
                if use_gate and on:
                    top = new.top
                    if len(on) < len(rows):
                        top = top.index_select(0, torch.tensor(on, device=xb.device))
                    logits = self.gate(top).squeeze(-1)
                    gaps = steps_to_next_update_one(
                        logits.tolist(),
                        boundary,
                        steps,
                        lambda logits=logits: steps_to_next_update(
                            update_probability(logits), threshold, steps
                        ).tolist(),
                    )
                for r in rows:  # done, unless it has steps left
                    pos[r] = steps
                for i, gap in zip(on, gaps, strict=True):
                    pos[rows[i]] = ts[i] + gap
            keep = [i for i, r in enumerate(alive) if pos[r] < limits[r]]
            if len(keep) < len(alive):  # some samples finished: keep their final state
                done = [i for i, r in enumerate(alive) if pos[r] >= limits[r]]
                index = torch.tensor(done, device=xb.device)
                finished.append(([alive[i] for i in done], gather_state(state, index)))
                if keep:
                    state = gather_state(state, torch.tensor(keep, device=xb.device))
                alive = [alive[i] for i in keep]
            rows, first = alive, False
        final = self._final_state(finished, batch, xb)
        return self._held(run, xb, tops, places, limits, use_gate), final

    def _final_state(
        self, finished: list[tuple[list[int], State]], batch: int, xb: Tensor
    ) -> State:
        """The state [L, B, H] after each sample's last update, from the finished groups."""
        ids = [r for group, _ in finished for r in group]
        if ids == list(range(batch)):  # finished in batch order: no scatter
            parts = [s for _, s in finished]
        else:
            order = torch.tensor(ids, device=xb.device).argsort()
            parts = [s for _, s in finished]
            h = torch.cat([s.h for s in parts], 1).index_select(1, order)
            c = None if parts[0].c is None else torch.cat([s.c for s in parts], 1)
            return State(h, None if c is None else c.index_select(1, order))
        if len(parts) == 1:
            return parts[0]
        h = torch.cat([s.h for s in parts], 1)
        return State(h, None if parts[0].c is None else torch.cat([s.c for s in parts], 1))

    def _cell(self, x: Tensor, state: State, weights: list | None) -> State:
        if weights is None:
            return cell_step(self.rnn, x, state)
        return fast_cell_step(self.rnn, x, state, weights)

    def _fit_cap(
        self, rows: list[int], pos: list[int], limits: list[int], left: list[float], gated: bool
    ) -> list[int]:
        """The rows due this round whose update fits what is left of their allowance (which
        it then uses up; `mac_cap.fits` and `mac_cap.spend`, one sample at a time).

        An update that does not fit is skipped and the sample stays due at the next step. Its
        cost there is the same (`update_cost`) up to its last step, which has no gate after
        it: so it is due next at its last step if the step alone fits, else never again."""
        fit = []
        for r in rows:
            t = pos[r]
            cost = float(self.update_cost(t, gated and t + 1 < limits[r]))
            if cost <= left[r]:
                left[r] -= cost
                fit.append(r)
            elif t < limits[r] - 1 and self.step_macs <= left[r]:
                pos[r] = limits[r] - 1
            else:
                pos[r] = self.steps
        return fit

    def _held(
        self,
        run: SkipRun,
        xb: Tensor,
        tops: list[Tensor],
        places: list[int],
        limits: list[int],
        use_gate: bool,
    ) -> Tensor:
        """The layer's outputs [B, T, H] from each round's outputs and their places in
        [B * T] (one gather of rows); records the update flags (`run.updates`) and gate runs
        (`run.gates`). A sample's k-th update is in round k, so along its steps the rows of
        its updates increase: the row held at step t is the running maximum of the rows
        updated at or before t (the first step always updates)."""
        batch, steps = xb.shape[0], xb.shape[1]
        device = xb.device
        where = torch.tensor(places, device=device)
        row_of = torch.full((batch * steps,), -1, dtype=torch.long, device=device)
        row_of = row_of.index_copy(0, where, torch.arange(len(places), device=device))
        held = row_of.view(batch, steps).cummax(1).values.clamp(min=0)
        updated = row_of.view(batch, steps) >= 0
        run.updates = updated
        if use_gate:  # the gate ran after each update but a sample's last step's
            limit = torch.tensor(limits, device=device)
            before_last = torch.arange(steps, device=device)[None, :] + 1 < limit[:, None]
            run.gates = (updated & before_last).sum(1).cpu()
        else:
            run.gates = torch.zeros(batch, dtype=torch.long)
        out = torch.cat(tops).index_select(0, held.view(-1))
        return out.view(batch, steps, -1)

    def _fused_to_limits(self, xb: Tensor, limits: list[int]) -> tuple[Tensor, State]:
        """Every step of every sample up to its limit through the fused kernel: one stretch
        per distinct limit, on the samples still running (one call when all run every step).
        A sample's outputs after its limit repeat its last state."""
        batch, steps = xb.shape[0], xb.shape[1]
        if min(limits) >= steps:
            return run_stretch(self.rnn, xb, exact=True)
        state = zero_state(self.rnn, batch, xb)
        out = xb.new_zeros((batch, steps, self.rnn.hidden_size))
        start = 0
        for bound in sorted(set(limits)):
            rows = [r for r in range(batch) if limits[r] >= bound]
            index = torch.tensor(rows, device=xb.device)
            seg, rows_state = run_stretch(
                self.rnn, xb.index_select(0, index)[:, start:bound], gather_state(state, index)
            )
            out[index, start:bound] = seg
            state = scatter_state(state, index, rows_state)
            start = bound
        limit = torch.tensor(limits, device=xb.device)
        after = torch.arange(steps, device=xb.device)[None, :] >= limit[:, None]
        return torch.where(after[..., None], state.top[:, None, :], out), state

    # --- training: every step for every sample, straight-through updates -------------------
    def _train(self, xb: Tensor, run: SkipRun) -> tuple[Tensor, State]:
        batch, steps = xb.shape[0], xb.shape[1]
        boundary = float(update_boundary(TRAIN_THRESHOLD))
        state = zero_state(self.rnn, batch, xb)
        u = xb.new_ones(batch)
        limit = run.limit
        outs, decisions = [], []
        for t in range(steps):
            b = straight_through_update(u, boundary)
            if limit is not None:  # padding steps never update
                b = b * (limit > t).to(b.dtype)
            new = step_rows(self.rnn, xb[:, t], state, None)
            mix = b.view(1, -1, 1)
            h = mix * new.h + (1.0 - mix) * state.h
            c = None if state.c is None else mix * new.c + (1.0 - mix) * state.c
            state = State(h, c)
            u = accumulate_update_probability(u, b, self.delta(state))
            outs.append(state.top)
            decisions.append(b)
        updates = torch.stack(decisions, 1)
        if limit is None:
            run.share = updates.mean()
            run.updates = updates.detach() > 0.5
            run.gates = run.updates[:, :-1].sum(1)
        else:  # the share of the real steps; no gate after a sample's last step
            run.share = updates.sum() / limit.sum().clamp(min=1)
            run.updates = updates.detach() > 0.5
            positions = torch.arange(steps, device=xb.device)
            run.gates = (run.updates & (positions[None, :] + 1 < limit[:, None])).sum(1)
        return torch.stack(outs, 1), state

    # --- export: a torch.cond per step ------------------------------------------------------
    def _export(self, xb: Tensor, run: SkipRun) -> tuple[Tensor, State]:
        threshold = run.thresholds[0]
        lstm = isinstance(self.rnn, nn.LSTM)

        limit = run.limit

        def fused(xb: Tensor, threshold: Tensor) -> tuple[Tensor, ...]:
            # The padding steps run here too (the network does not read their outputs nor
            # the final state), but none is counted as an update.
            out, state = run_stretch(self.rnn, xb, exact=True)
            ones = torch.ones(xb.shape[0], xb.shape[1], dtype=torch.int64, device=xb.device)
            if limit is not None:
                positions = torch.arange(xb.shape[1], device=xb.device)
                ones = (positions[None, :] < limit[:, None]).to(torch.int64)
            return (out.contiguous(), state.h, state.c if lstm else state.h, ones)

        def stepped(xb: Tensor, threshold: Tensor) -> tuple[Tensor, ...]:
            out, state, updates = self._export_steps(xb, threshold, run)
            return (out.contiguous(), state.h, state.c if lstm else state.h, updates)

        if self.every_step_fits(run):
            operands = (xb, threshold)
            out, h, c, updates = cond(updates_every_step(threshold), fused, stepped, operands)
        else:  # the cap forbids updating at every step: the stepped loop, whatever the threshold
            out, h, c, updates = stepped(xb, threshold)
        run.updates = updates
        return out, State(h, c if lstm else None)

    def _export_steps(
        self, xb: Tensor, threshold: Tensor, run: SkipRun
    ) -> tuple[Tensor, State, Tensor]:
        batch, steps = xb.shape[0], xb.shape[1]
        left = self.allowance(run, batch, xb.device)
        boundary = update_boundary(threshold).to(xb.device)
        gated = (boundary >= 0.0) & (boundary < 1.0)  # `gate_decides`, as a tensor
        lstm = isinstance(self.rnn, nn.LSTM)
        state = zero_state(self.rnn, batch, xb)
        c0 = state.c if lstm else state.h
        due = torch.zeros(batch, dtype=torch.int64, device=xb.device)
        outs, flags = [], []
        h, c = state.h, c0
        limit = run.limit
        for t in range(steps):
            mask = due == t
            if limit is not None:  # padding steps never run
                mask = mask & (limit > t)
            if left is not None and t > 0:  # the first update is in the floor
                last = None if limit is None else limit <= t + 1
                cost = self.update_cost(t, gated if last is None else gated & ~last)
                fit = mac_cap.fits(left, cost)
                due = torch.where(mask & ~fit, t + 1, due)  # skipped: due at the next step
                mask = mask & fit
                left = mac_cap.spend(left, cost, mask)

            def update(x_t, mask, h, c, due, threshold, t=t):
                index = selected(mask)
                rows = step_rows(self.rnn, x_t, State(h, c if lstm else None), index)
                top = rows.top.index_select(0, index)
                delta = update_probability(self.gate(top).squeeze(-1))
                ahead = steps_to_next_update(delta, threshold, steps)
                due = due.index_copy(0, index, ahead + t)
                return rows.h, rows.c if lstm else rows.h, due

            def skip(x_t, mask, h, c, due, threshold):
                return h.clone(), c.clone(), due.clone()

            h, c, due = cond(mask.any(), update, skip, (xb[:, t], mask, h, c, due, threshold))
            outs.append(h[-1])
            flags.append(mask.to(torch.int64))
        return torch.stack(outs, 1), State(h, c if lstm else None), torch.stack(flags, 1)


class SkipRNNModel(CapHolder, DynamicModel):
    """The rewritten graph (`gm`) whose recurrent layer is a `SkipRNN` wrapper.

    With a MAC cap (`set_mac_cap`, `dynify.runtime.mac_cap`) an update runs only if it fits
    what is left of the sample's allowance (see the module docstring). `static()` ignores it.
    """

    strategy = "skip-rnn"
    takes_extra_input = True
    optional_state = ("budget_multiplier", "mac_cap")
    # [B, T] bool: the steps each sample of the last forward updated at (per thread)
    last_updates = PerCallRecord()
    # [B] int64: the steps each sample of the last forward could update at: its text's length
    # where the network reads only up to it (padding steps never update), else T
    last_lengths = PerCallRecord()

    def __init__(
        self,
        gm: torch.fx.GraphModule,
        *,
        layer: str,
        book: CostBook,
        reads: nn.Module | None = None,
        threshold: float = 0.5,
        budget: float = 0.5,
        distill_temperature: float = 2.0,
        compute_weight: float = 4.0,
        budget_rate: float = 0.01,
        static_macs: int,
        input_shape: tuple[int, ...],
        num_classes: int,
    ):
        super().__init__(
            static_macs=static_macs,
            input_shape=input_shape,
            num_classes=num_classes,
            thresholds=[threshold],
            book=book,
        )
        self.gm = gm
        self.layer = layer
        # ReadLengths: each sample's steps to run from the inputs; None: every step
        self.reads = reads
        self.budget = float(budget)
        self.distill_temperature = float(distill_temperature)
        self.compute_weight = float(compute_weight)
        self.budget_rate = float(budget_rate)
        self.register_buffer("budget_multiplier", torch.zeros((), dtype=torch.float64))
        self.init_mac_cap()

    @property
    def wrapper(self) -> SkipRNN:
        return next(m for m in self.gm.modules() if isinstance(m, SkipRNN))

    @property
    def joint_recipe(self) -> JointRecipe:  # type: ignore[override]
        """The gate learns with Adam (SGD barely moves a fresh linear gate); the RNN's gradient
        is clipped, as recurrent networks are trained."""
        return JointRecipe(new_parts="adam", new_lr=0.01, clip_grad_norm=5.0)

    @property
    def fixed_macs(self) -> int:
        """What the layers around the recurrent one cost (the book's)."""
        return self.book.macs(AROUND)

    def cap_floor(self) -> int:
        """What a sample spends whatever it decides, the gate charged (the book's floor): the
        layers around the recurrent one, the first update (every sample makes it) and the
        gate after it."""
        return self.book.floor()

    def _capped(self, run: SkipRun, cap: int | None) -> SkipRun:
        run.cap, run.floor = cap, self.cap_floor()
        return run

    def describe(self) -> list[dict[str, str]]:
        w = self.wrapper
        return [
            {
                "layer": self.layer,
                "cell": type(w.rnn).__name__,
                "steps": str(w.steps),
                **self.book.columns(w.steps * w.step_macs, "RNN MACs", 2),
                "step MACs": f"{w.step_macs / 1e6:.3f} M",
                "gate MACs": str(w.gate_macs),
                "threshold": f"{float(self.thresholds[0]):.3f}",
            }
        ]

    def last_decisions(self) -> Tensor:
        """[N, T] int64: 1 where a sample updated its state at that step."""
        if self.last_updates is None:
            raise StrategyError("No dynamic forward has run in this thread yet.")
        return self.last_updates.long()

    def update_share(self) -> float:
        """The share of the real steps (`last_lengths`: padding steps excluded, as they never
        update) the last forward's samples updated at."""
        return float(self.last_decisions().double().sum() / self.last_lengths.sum().clamp(min=1))

    def _record(self, run: SkipRun, batch: int, device: torch.device) -> None:
        self.last_updates = run.updates
        steps = self.wrapper.steps
        full = torch.full((batch,), steps, dtype=torch.long, device=device)
        self.last_lengths = full if run.limit is None else run.limit.long()

    def _run_graph(self, args: tuple[Tensor, ...], run: SkipRun) -> Tensor:
        """The rewritten graph on the model's inputs; outside static mode each sample's
        steps to run are computed first, from the inputs (`run.limit`)."""
        if self.reads is not None and run.mode != "static":
            run.limit = self.reads(*args)
        context = self.wrapper.context
        context.run = run
        try:
            return self.gm(*args)
        finally:
            context.run = None

    def forward(self, x: Tensor | tuple[Tensor, Tensor], extra: Tensor | None = None) -> Tensor:
        """Logits [N, C]; `extra`: the lengths or padding mask of a model converted with them
        (also accepted as `forward((x, extra))`)."""
        args = self.input_args(x, extra)
        x = args[0]
        batch, steps = x.shape[0], self.wrapper.steps
        if self._static:
            out = self._run_graph(args, SkipRun("static", self.thresholds))
            self.record_static(batch, x.device)
            self.last_updates = torch.ones(batch, steps, dtype=torch.bool)
            self.last_lengths = torch.full((batch,), steps, dtype=torch.long)
            return out
        run = self._capped(SkipRun("eager", self.thresholds), self.cap_macs())
        run.tab = self.open_tab(batch, x.device)
        out = self._run_graph(args, run)
        self.close_tab(run.tab)
        self._record(run, batch, x.device)
        return out

    def training_loss(
        self,
        x: Tensor,
        teacher_logits: Tensor | None = None,
        labels: Tensor | None = None,
        config: LossConfig | None = None,
    ) -> tuple[Tensor, dict[str, float]]:
        """Distillation (+ CE on labels) under straight-through update decisions, plus the
        budget term: price x share of updates, the price a PI controller on the distance of
        the share (of the binary decisions) from the budget (`budget_price`)."""
        args = self.input_args(x)
        config = config or LossConfig()
        budget = self.budget if config.budget is None else float(config.budget)
        if teacher_logits is None:
            with torch.no_grad(), self.static():
                teacher_logits = self(*args)
        run = SkipRun("train", self.thresholds)
        run.tab = self.open_tab(args[0].shape[0], args[0].device)
        logits = self._run_graph(args, run)
        t = config.temperature(self.distill_temperature)
        task, stats = distillation(logits, teacher_logits, labels, t, config.label_weight)
        share = float(run.share.detach())
        price = budget_price(
            self.budget_multiplier, share - budget, self.compute_weight, self.budget_rate
        )
        compute = priced_compute(run.share.reshape(1), price)
        loss = task + compute
        self.close_tab(run.tab)
        self._record(run, args[0].shape[0], args[0].device)
        return loss, step_metrics(
            loss,
            compute,
            stats,
            update_share=share,
            macs_fraction=float(self.last_macs.double().mean()) / self.static_macs,
            compute_price=price,
        )

    def export_face(self) -> SkipRNNExport:
        """forward(x, thresholds) -> (logits, updates [N, T] int64)."""
        return SkipRNNExport(self)


class SkipRNNExport(ExportFace):
    """`SkipRNNModel` with one `torch.cond` per step (ONNX `If`); see the module docstring."""

    def __init__(self, model: SkipRNNModel):
        super().__init__(model.thresholds)
        self.model = model
        self.extra_input_name = None if model.extra_input is None else model.extra_input.name
        # the MAC cap as it is now: a Python int, so the export keeps it as a constant
        self.cap = model.cap_macs()

    def forward(
        self, x: Tensor | tuple[Tensor, Tensor], thresholds: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """`x`: the input, or the pair (ids, lengths / mask) of a model converted with them
        (exported as a second graph input)."""
        run = SkipRun("export", self.thresholds_or_default(thresholds))
        self.model._capped(run, self.cap)
        x, extra = as_inputs(x)
        logits = self.model._run_graph((x,) if extra is None else (x, extra), run)
        return logits, run.updates.to(torch.int64)
