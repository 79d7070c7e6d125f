"""The step runtime's stretches and cells: the loop of cells on packed weights equals the fused
kernel to float rounding with the same MACs, runs where it pays (an LSTM's short stretches at
batch 1 and 2), and the fused kernel stays the module's own call where exactness is asked."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from dynify.runtime import recurrence
from dynify.runtime.recurrence import State, cells_pay, fast_cell_step, run_cells, run_stretch


def module(cell: type, layers: int, batch_first: bool = True) -> nn.Module:
    torch.manual_seed(0)
    return cell(6, 10, num_layers=layers, batch_first=batch_first).eval()


def start(rnn: nn.Module, batch: int) -> State:
    g = torch.Generator().manual_seed(1)
    h = torch.randn(rnn.num_layers, batch, rnn.hidden_size, generator=g)
    c = torch.randn(rnn.num_layers, batch, rnn.hidden_size, generator=g)
    return State(h, c if isinstance(rnn, nn.LSTM) else None)


@pytest.mark.parametrize("cell", [nn.LSTM, nn.GRU])
@pytest.mark.parametrize("layers", [1, 2])
def test_cells_equal_the_fused_kernel_with_the_same_macs(cell, layers):
    rnn = module(cell, layers)
    x = torch.randn(3, 5, 6)
    state = start(rnn, 3)
    with torch.no_grad():
        with FlopCounterMode(display=False) as fused_count:
            out, final = run_stretch(rnn, x, state, exact=True)
        with FlopCounterMode(display=False) as cell_count:
            out2, final2 = run_cells(rnn, x, state)
        step = fast_cell_step(rnn, x[:, 0], state)
        ref = recurrence.cell_step(rnn, x[:, 0], state)
    assert (out - out2).abs().max() <= 1e-5
    assert (final.h - final2.h).abs().max() <= 1e-5
    if final.c is not None:
        assert (final.c - final2.c).abs().max() <= 1e-5
    assert (step.h - ref.h).abs().max() <= 1e-6
    assert cell_count.get_total_flops() == fused_count.get_total_flops()


def test_packed_weights_follow_the_parameters():
    rnn = module(nn.LSTM, 1)
    x, state = torch.randn(2, 6), start(rnn, 2)
    with torch.no_grad():
        before = fast_cell_step(rnn, x, state).h
        rnn.weight_hh_l0.mul_(2.0)  # an in-place update (an optimizer step) bumps the version
        after = fast_cell_step(rnn, x, state).h
        ref = recurrence.cell_step(rnn, x, state).h
    assert not torch.allclose(before, after)
    assert (after - ref).abs().max() <= 1e-6


def test_short_lstm_stretches_at_small_batches_run_as_cells_else_fused():
    lstm, gru = module(nn.LSTM, 1), module(nn.GRU, 1)
    assert cells_pay(lstm, 1, 5) and cells_pay(lstm, 2, 6)
    assert not cells_pay(lstm, 1, 12) and not cells_pay(lstm, 8, 5)
    assert not cells_pay(gru, 1, 5)  # the fused GRU has no fixed cost to save

    calls = []

    class Count(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            if func is torch.lstm:
                calls.append(args[0].shape)
            return func(*args, **(kwargs or {}))

    x = torch.randn(1, 5, 6)
    with torch.no_grad(), Count():
        cells, _ = run_stretch(lstm, x, None)
        fused, _ = run_stretch(lstm, x, None, exact=True)
        whole, _ = run_stretch(lstm, torch.randn(4, 5, 6), None)
    assert len(calls) == 2  # the exact call and the batch of 4
    assert (cells - fused).abs().max() <= 1e-5
    with torch.no_grad():
        assert torch.equal(fused, lstm(x)[0])  # exact: the module's own kernel
    assert whole.shape == (4, 5, 10)


def test_a_gradient_asked_for_runs_the_module_weights():
    rnn = module(nn.LSTM, 1).train()
    x = torch.randn(1, 4, 6)
    out, _ = run_stretch(rnn, x, None)
    out.sum().backward()
    assert rnn.weight_ih_l0.grad is not None and rnn.weight_ih_l0.grad.abs().sum() > 0


@pytest.mark.parametrize("cell", [nn.LSTM, nn.GRU])
def test_cells_run_a_stretch_of_no_rows(cell):
    """A batch narrowed to nobody (every sample jumped or stopped) runs to empty outputs."""
    rnn = cell(8, 12, num_layers=2, batch_first=True)
    x = torch.zeros(0, 3, 8)
    h = torch.zeros(2, 0, 12)
    out, state = run_cells(rnn, x, State(h, torch.zeros_like(h) if cell is nn.LSTM else None))
    assert out.shape == (0, 3, 12) and state.h.shape == (2, 0, 12)
