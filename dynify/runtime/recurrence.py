"""The step runtime of the recurrent strategies (skip-rnn, stop-reading): an `nn.LSTM` / `nn.GRU`
run step by step with its own weights, for the samples that need each step.

A fused RNN call computes every step of every sample. The temporal strategies decide per sample
and step whether to run the cell, so they need three things, all on the module's own parameters
(read at each call, so fine-tuning and `load_state_dict` are seen):
- `step_rows`: one step of the stacked cell for a subset of the batch (gather, run, scatter),
  with the input projection computed for those rows and that step only (`torch.lstm_cell` /
  `torch.gru_cell` project the one input they are given);
- `run_stretch`: a stretch of consecutive steps every sample runs, through the fused kernel
  with an initial state (the fastest way to run many steps);
- the conversions between the module's layout (`batch_first` or not; `(h, c)` or `h`) and the
  batch-first sequence and `[L, B, H]` states the strategies work on.

FlopCounterMode counts a cell step as its two matmuls (input and hidden projections) and the
fused CPU LSTM by the same formula (`dynify.frontend.cost`), so one step of one sample costs
`RecurrentLayer.step_macs` whichever way it ran.
"""

from __future__ import annotations

import weakref
from typing import NamedTuple

import torch
from torch import Tensor, nn

from dynify.errors import StrategyError
from dynify.frontend.sequence_reads import SequenceRead, read_lengths
from dynify.runtime.control import tracing

RecurrentModule = nn.LSTM | nn.GRU


class State(NamedTuple):
    """The recurrent state of a batch: h [L, B, H], and c [L, B, H] for an LSTM (else None)."""

    h: Tensor
    c: Tensor | None

    @property
    def top(self) -> Tensor:
        """The last layer's hidden state [B, H]: the layer's output at this step."""
        return self.h[-1]


def check_module(rnn: nn.Module) -> RecurrentModule:
    """The module, if the step runtime can run it; else an error saying what to use."""
    if not isinstance(rnn, RecurrentModule):
        raise StrategyError(
            f"The step runtime runs nn.LSTM and nn.GRU, got {type(rnn).__name__}; use one of "
            "those (an nn.RNN or a custom cell is not supported)."
        )
    if rnn.bidirectional:
        raise StrategyError(
            "The step runtime runs uni-directional layers only; use bidirectional=False."
        )
    if isinstance(rnn, nn.LSTM) and rnn.proj_size:
        raise StrategyError("LSTMs with proj_size are not supported; use proj_size=0.")
    return rnn


def zero_state(rnn: RecurrentModule, batch: int, like: Tensor) -> State:
    """The initial state the module starts from when called without one: zeros."""
    h = like.new_zeros((rnn.num_layers, batch, rnn.hidden_size))
    return State(h, torch.zeros_like(h) if isinstance(rnn, nn.LSTM) else None)


def _weights(
    rnn: RecurrentModule, layer: int
) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
    bias = rnn.bias
    return (
        getattr(rnn, f"weight_ih_l{layer}"),
        getattr(rnn, f"weight_hh_l{layer}"),
        getattr(rnn, f"bias_ih_l{layer}") if bias else None,
        getattr(rnn, f"bias_hh_l{layer}") if bias else None,
    )


def cell_step(rnn: RecurrentModule, x: Tensor, state: State) -> State:
    """One step of the stacked cell for every row of `x` [M, F] and `state` ([L, M, H]).

    Dropout between layers is not applied (the module's `dropout` acts only in training, and
    the step runtime runs the layer as evaluated)."""
    hs, cs = [], []
    inp = x
    for layer in range(rnn.num_layers):
        w_ih, w_hh, b_ih, b_hh = _weights(rnn, layer)
        if state.c is None:
            h = torch.gru_cell(inp, state.h[layer], w_ih, w_hh, b_ih, b_hh)
            hs.append(h)
        else:
            h, c = torch.lstm_cell(inp, (state.h[layer], state.c[layer]), w_ih, w_hh, b_ih, b_hh)
            hs.append(h)
            cs.append(c)
        inp = h
    if len(hs) == 1:  # one layer: a view, no copy
        return State(hs[0].unsqueeze(0), cs[0].unsqueeze(0) if cs else None)
    return State(torch.stack(hs), torch.stack(cs) if cs else None)


# --- the eager step kernel: weights laid out once for the CPU's GEMM -----------------------
# rnn -> (the parameters' versions and storages, per layer (W_ih, W_hh, b_ih, b_hh) with each
# W stored column-major: W^T contiguous, viewed back as W). A matmul against the contiguous W^T
# runs markedly faster on one CPU thread than against the module's row-major W (which
# `torch.lstm_cell`'s `linear` transposes in place), for the same values and MACs.
_PACKED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _parameters(rnn: RecurrentModule) -> list[Tensor]:
    return [getattr(rnn, name) for name in rnn._flat_weights_names]


def packed_weights(
    rnn: RecurrentModule,
) -> list[tuple[Tensor, Tensor, Tensor | None, Tensor | None]]:
    """The module's weights laid out for `fast_cell_step` (detached), rebuilt whenever a
    parameter changed (its storage or its version: fine-tuning, `load_state_dict`)."""
    params = _parameters(rnn)
    key = tuple([p._version for p in params] + [p.data_ptr() for p in params])
    hit = _PACKED.get(rnn)
    if hit is not None and hit[0] == key:
        return hit[1]
    layers = []
    with torch.no_grad():
        for layer in range(rnn.num_layers):
            w_ih, w_hh, b_ih, b_hh = _weights(rnn, layer)
            layers.append(
                (
                    w_ih.t().contiguous().t(),
                    w_hh.t().contiguous().t(),
                    None if b_ih is None else b_ih.detach(),
                    None if b_hh is None else b_hh.detach(),
                )
            )
    _PACKED[rnn] = (key, layers)
    return layers


def fast_path(rnn: RecurrentModule, x: Tensor) -> bool:
    """Whether `fast_cell_step` / the cell loop of `run_stretch` may run: no gradient is asked
    for (the packed weights are detached copies) and nothing traces the call (an export)."""
    if torch.compiler.is_compiling() or torch.jit.is_tracing():
        return False
    asks_grad = x.requires_grad or any(p.requires_grad for p in _parameters(rnn))
    return not (torch.is_grad_enabled() and asks_grad)


def _lstm_gates(gates: Tensor, c: Tensor) -> tuple[Tensor, Tensor]:
    hidden = c.shape[-1]
    sig_if = gates[:, : 2 * hidden].sigmoid()
    g = gates[:, 2 * hidden : 3 * hidden].tanh()
    c = torch.addcmul(sig_if[:, hidden:] * c, sig_if[:, :hidden], g)
    h = gates[:, 3 * hidden :].sigmoid().mul_(c.tanh())
    return h, c


def _gru_gates(gi: Tensor, gh: Tensor, h: Tensor) -> Tensor:
    hidden = h.shape[-1]
    rz = (gi[:, : 2 * hidden] + gh[:, : 2 * hidden]).sigmoid_()
    n = torch.addcmul(gi[:, 2 * hidden :], rz[:, :hidden], gh[:, 2 * hidden :]).tanh_()
    return torch.addcmul(n, rz[:, hidden:], h - n)  # (1 - z) n + z h


def fast_cell_step(
    rnn: RecurrentModule, x: Tensor, state: State, weights: list | None = None
) -> State:
    """`cell_step` on the packed weights (`packed_weights`, or `weights` a caller looked up
    once for many steps): the same cell calls and matmuls (so the same MACs) on a layout the
    CPU's GEMM runs faster; equal to float rounding. Without `weights`, falls back to
    `cell_step` where a gradient is asked for or the call is traced (`fast_path`)."""
    if weights is None:
        if not fast_path(rnn, x):
            return cell_step(rnn, x, state)
        weights = packed_weights(rnn)
    hs, cs = [], []
    inp = x
    for layer, (w_ih, w_hh, b_ih, b_hh) in enumerate(weights):
        if state.c is None:
            h = torch.gru_cell(inp, state.h[layer], w_ih, w_hh, b_ih, b_hh)
        else:
            h, c = torch.lstm_cell(inp, (state.h[layer], state.c[layer]), w_ih, w_hh, b_ih, b_hh)
            cs.append(c)
        hs.append(h)
        inp = h
    if len(hs) == 1:
        return State(hs[0].unsqueeze(0), cs[0].unsqueeze(0) if cs else None)
    return State(torch.stack(hs), torch.stack(cs) if cs else None)


def gather_state(state: State, index: Tensor) -> State:
    """The rows `index` of a state."""
    c = None if state.c is None else state.c.index_select(1, index)
    return State(state.h.index_select(1, index), c)


def scatter_state(state: State, index: Tensor, rows: State) -> State:
    """`state` with rows `index` replaced by `rows`."""
    c = None if state.c is None else state.c.index_copy(1, index, rows.c)
    return State(state.h.index_copy(1, index, rows.h), c)


def step_rows(rnn: RecurrentModule, x_t: Tensor, state: State, index: Tensor | None) -> State:
    """One step for the rows `index` of the batch (None: every row): gather their input [M, F]
    and state, run the cell, scatter the new state back; the other rows keep theirs."""
    if index is None:
        return cell_step(rnn, x_t, state)
    rows = cell_step(rnn, x_t.index_select(0, index), gather_state(state, index))
    return scatter_state(state, index, rows)


# The fused CPU LSTM (oneDNN) has a fixed cost of about 0.3 ms a call on one thread (hidden
# 256), which a loop of cells does not pay; each cell step costs more than a fused step. The
# loop is faster up to about 6 steps at batch 1 and 2 (measured on one thread, batch 1: 3 steps
# 0.20 against 0.32 ms, 5 steps 0.29 against 0.34 ms, 8 steps 0.46 against 0.41 ms). The fused
# GRU has no such fixed cost: a GRU stretch always runs fused.
CELL_LOOP_MAX_BATCH = 2
CELL_LOOP_MAX_STEPS = 6


def cells_pay(rnn: RecurrentModule, batch: int, steps: int) -> bool:
    """Whether a stretch of `steps` steps on `batch` rows runs faster as a loop of cells (the
    input projection of the whole stretch one GEMM) than as one fused call: an LSTM's short
    stretches at batch 1 or 2. Under export the batch may be data-dependent (the rows a
    conditional gathered): the fused kernel, which any batch runs."""
    if tracing():
        return False
    short = batch <= CELL_LOOP_MAX_BATCH and steps <= CELL_LOOP_MAX_STEPS
    return short and isinstance(rnn, nn.LSTM)


def run_cells(rnn: RecurrentModule, x: Tensor, state: State) -> tuple[Tensor, State]:
    """Consecutive steps for every row as a loop of cells on the packed weights: the first
    layer's input projection of the whole stretch is one GEMM, then per step the hidden
    projection and the gates. The same matmuls (and MACs) as the fused kernel."""
    batch, steps = x.shape[0], x.shape[1]
    hs, cs = [], []
    inp = x
    for layer, (w_ih, w_hh, b_ih, b_hh) in enumerate(packed_weights(rnn)):
        h = state.h[layer]
        c = None if state.c is None else state.c[layer]
        flat = inp.reshape(batch * steps, inp.shape[2])
        zeros = w_ih.new_zeros(w_ih.shape[0])
        b_ih = zeros if b_ih is None else b_ih
        b_hh = zeros if b_hh is None else b_hh
        outs = []
        if c is None:
            gi = torch.addmm(b_ih, flat, w_ih.t()).view(batch, steps, w_ih.shape[0])
            for t in range(steps):
                h = _gru_gates(gi[:, t], torch.addmm(b_hh, h, w_hh.t()), h)
                outs.append(h)
        else:
            gi = torch.addmm(b_ih + b_hh, flat, w_ih.t()).view(batch, steps, w_ih.shape[0])
            for t in range(steps):
                h, c = _lstm_gates(torch.addmm(gi[:, t], h, w_hh.t()), c)
                outs.append(h)
            cs.append(c)
        hs.append(h)
        inp = torch.stack(outs, 1)
    c_n = torch.stack(cs) if cs else None
    return inp, State(torch.stack(hs), c_n)


def run_stretch(
    rnn: RecurrentModule, x: Tensor, state: State | None = None, *, exact: bool = False
) -> tuple[Tensor, State]:
    """Consecutive steps for every row: `x` [B, S, F] batch-first, from `state` (None: zeros).
    Returns the outputs [B, S, H] and the state after the last step.

    Through the fused kernel, exactly the module's own call from zeros; or, at the sizes
    where it pays (`cells_pay`) and unless `exact` asks for the module's own kernel, as a
    loop of cells (`run_cells`, equal to float rounding)."""
    if state is None:
        state = zero_state(rnn, x.shape[0], x)
    if not exact and cells_pay(rnn, x.shape[0], x.shape[1]) and fast_path(rnn, x):
        return run_cells(rnn, x, state)
    inp = x if rnn.batch_first else x.transpose(0, 1)
    # The module's own kernel call, without `nn.RNNBase.forward`'s refresh of its weight list
    # (an attribute write, which torch.export refuses inside a torch.cond branch).
    weights = [getattr(rnn, name) for name in rnn._flat_weights_names]
    args = (weights, rnn.bias, rnn.num_layers, rnn.dropout, rnn.training, False, rnn.batch_first)
    if state.c is None:
        out, final = torch.gru(inp, state.h, *args)
    else:
        out, h, c = torch.lstm(inp, (state.h, state.c), *args)
        final = (h, c)
    out = out if rnn.batch_first else out.transpose(0, 1)
    if isinstance(final, tuple):
        return out, State(final[0], final[1])
    return out, State(final, None)


def batch_first(rnn: RecurrentModule, x: Tensor) -> Tensor:
    """The module's input as [B, T, F]."""
    return x if rnn.batch_first else x.transpose(0, 1)


def module_output(
    rnn: RecurrentModule, out: Tensor, state: State
) -> tuple[Tensor, Tensor | tuple[Tensor, Tensor]]:
    """What the module's own call returns, from batch-first outputs [B, T, H] and the final
    state: `(output, h_n)` for a GRU, `(output, (h_n, c_n))` for an LSTM, in its layout."""
    out = out if rnn.batch_first else out.transpose(0, 1)
    if state.c is None:
        return out, state.h
    return out, (state.h, state.c)


__all__ = [
    "RecurrentModule",
    "State",
    "batch_first",
    "cell_step",
    "cells_pay",
    "check_module",
    "fast_cell_step",
    "gather_state",
    "module_output",
    "run_cells",
    "run_stretch",
    "scatter_state",
    "step_rows",
    "zero_state",
]


class ReadLengths(nn.Module):
    """Steps each sample must run for the rest of the network's answer: the lifted graph of
    the operand with which the network reads the RNN's output sequence (a gather index, a
    padding factor, a fill condition; `dynify.frontend.sequence_reads`), called on the
    model's inputs, turned into int64 [B] in [1, steps]."""

    def __init__(self, operand: nn.Module, read: SequenceRead, steps: int):
        super().__init__()
        self.operand = operand
        self.read = read
        self.steps = int(steps)

    def forward(self, *inputs: Tensor) -> Tensor:
        value = self.operand(*inputs)
        return read_lengths(self.read, value, self.steps, inputs[0].shape[0])


def full_lengths(batch: int, steps: int, like: Tensor) -> Tensor:
    """Every sample runs every step: int64 [B] of `steps`."""
    return torch.full((batch,), steps, dtype=torch.long, device=like.device)


__all__ += ["ReadLengths", "full_lengths"]
