"""skip-rnn's eager forward runs by update rounds (every sample's k-th update in one cell
call); it must decide, cost and output exactly what the step-by-step loop it replaced did.
That loop is kept here, as the reference, and both run on random models: LSTM and GRU, one and
two layers, either layout, with and without each text's length, with and without a MAC cap,
across thresholds."""

from __future__ import annotations

import types

import pytest
import torch
from torch import Tensor, nn

import dynify
from dynify.runtime.decisions import (
    gate_decides,
    steps_to_next_update,
    steps_to_next_update_one,
    update_boundary,
    update_probability,
    updates_every_step,
)
from dynify.runtime.recurrence import (
    State,
    cell_step,
    gather_state,
    scatter_state,
    zero_state,
)
from dynify.runtime.skip_rnn import SkipRNN, SkipRNNModel
from tests.test_sequence_frontend import LastToken

VOCAB, STEPS = 40, 12


def reference_eager(self: SkipRNN, xb: Tensor, run) -> tuple[Tensor, State]:
    """The step-by-step eager loop: per time step, the samples due run the cell."""
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
    never = [1 if every else steps + 1] * batch
    left = None if run.cap is None else [float(run.cap - run.floor)] * batch
    inputs = xb.transpose(0, 1)
    state = zero_state(self.rnn, batch, xb)
    due: list[list[int]] = [[] for _ in range(steps)]
    due[0] = list(range(batch))
    flags = [[False] * steps for _ in range(batch)]
    gates = [0] * batch
    outs = []
    for t in range(steps):
        rows = [r for r in sorted(due[t]) if t < limits[r]]
        if rows and left is not None and t > 0:
            fit, late = [], []
            for r in rows:
                cost = float(self.update_cost(t, use_gate and t + 1 < limits[r]))
                if cost <= left[r]:
                    left[r] -= cost
                    fit.append(r)
                else:
                    late.append(r)
            if late and t + 1 < steps:
                due[t + 1].extend(late)
            rows = fit
        if rows:
            if len(rows) == batch:
                new = cell_step(self.rnn, inputs[t], state)
                state = new
            else:
                index = torch.tensor(rows, device=xb.device)
                new = cell_step(
                    self.rnn, inputs[t].index_select(0, index), gather_state(state, index)
                )
                state = scatter_state(state, index, new)
            for r in rows:
                flags[r][t] = True
            going_on = [i for i, r in enumerate(rows) if t + 1 < limits[r]]
            if going_on:
                if len(going_on) < len(rows):
                    top = new.top.index_select(0, torch.tensor(going_on, device=xb.device))
                else:
                    top = new.top
                on_rows = [rows[i] for i in going_on]
                if use_gate:
                    logits = self.gate(top).squeeze(-1)
                    ahead = steps_to_next_update_one(
                        logits.tolist(),
                        boundary,
                        steps,
                        lambda logits=logits: steps_to_next_update(
                            update_probability(logits), threshold, steps
                        ).tolist(),
                    )
                    for r in on_rows:
                        gates[r] += 1
                else:
                    ahead = never
                for r, j in zip(on_rows, ahead, strict=False):
                    if t + j < steps:
                        due[t + j].append(r)
        outs.append(state.top)
    run.updates = torch.tensor(flags, dtype=torch.bool)
    run.gates = torch.tensor(gates, dtype=torch.long)
    return torch.stack(outs, 1), state


class MeanReader(nn.Module):
    """Reads every step's output (the mean over time): no text length to stop at."""

    def __init__(self, cell=nn.LSTM, layers=1, batch_first=True):
        super().__init__()
        self.batch_first = batch_first
        self.emb = nn.Embedding(VOCAB, 8)
        self.rnn = cell(8, 12, num_layers=layers, batch_first=batch_first)
        self.fc = nn.Linear(12, 3)

    def forward(self, ids):
        e = self.emb(ids)
        out, _ = self.rnn(e if self.batch_first else e.transpose(0, 1))
        return self.fc(out.mean(1 if self.batch_first else 0))


def texts(batch: int, seed: int) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(1, VOCAB, (batch, STEPS), generator=g)
    lengths = torch.randint(1, STEPS + 1, (batch,), generator=g)
    x[torch.arange(STEPS)[None, :] >= lengths[:, None]] = 0
    return x


def converted(model: nn.Module, seed: int) -> SkipRNNModel:
    torch.manual_seed(seed)
    model = model.eval()
    dyn = dynify.convert(model, "skip-rnn", texts(1, 0), options={}).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        dyn.wrapper.gate.weight.copy_(torch.randn(1, 12, generator=g) * 3.0)
        dyn.wrapper.gate.bias.fill_(float(torch.randn((), generator=g)))
    return dyn


def forward_with(dyn: SkipRNNModel, x: Tensor, eager) -> dict[str, Tensor]:
    """Logits, decisions, MACs and the recurrent layer's own outputs of one forward."""
    seen = {}

    def keep(module, args, output):
        out, state = output
        seen["out"] = out
        seen["h"] = state[0] if isinstance(state, tuple) else state
        seen["c"] = state[1] if isinstance(state, tuple) else state

    wrapper = dyn.wrapper
    wrapper._eager = types.MethodType(eager, wrapper)
    hook = wrapper.register_forward_hook(keep)
    try:
        with torch.no_grad():
            logits = dyn(x)
    finally:
        hook.remove()
        del wrapper._eager
    return {
        "logits": logits,
        "decisions": dyn.last_decisions().clone(),
        "macs": dyn.last_macs.clone(),
        **seen,
    }


CASES = [
    (LastToken, nn.LSTM, 1, True),
    (LastToken, nn.GRU, 2, False),
    (LastToken, nn.LSTM, 2, True),
    (MeanReader, nn.LSTM, 1, True),
    (MeanReader, nn.GRU, 1, False),
    (MeanReader, nn.LSTM, 2, False),
]


@pytest.mark.parametrize("reader,cell,layers,batch_first", CASES)
@pytest.mark.parametrize("cap", [None, 0.55, 0.8])
def test_update_rounds_equal_the_step_by_step_loop(reader, cell, layers, batch_first, cap):
    rounds = SkipRNN._eager
    compared = 0
    for seed in range(3):
        dyn = converted(reader(cell, layers, batch_first), seed)
        dyn.set_mac_cap(cap)
        x = texts(9, seed + 10)
        for threshold in (0.0, 0.15, 0.4, 0.6, 0.85, 1.0, 1.01):
            dyn.set_thresholds(threshold)
            new = forward_with(dyn, x, rounds)
            ref = forward_with(dyn, x, reference_eager)
            assert torch.equal(new["decisions"], ref["decisions"]), (seed, threshold)
            assert torch.equal(new["macs"], ref["macs"]), (seed, threshold)
            for key in ("logits", "out", "h", "c"):
                assert (new[key] - ref[key]).abs().max() <= 1e-5, (key, seed, threshold)
            compared += int(new["decisions"].sum() < new["decisions"].numel())
    assert compared  # some forwards skipped steps
