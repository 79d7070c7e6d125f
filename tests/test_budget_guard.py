"""BudgetGuard: the windowed mean cost is pulled back under budget, clean traffic untouched."""

from __future__ import annotations

import threading

import pytest
import torch

import dynify
from dynify.errors import StrategyError
from tests.conftest import TinyResNet, randomize_bn
from tests.test_early_exit import trained_heads


@pytest.fixture
def dyn():
    torch.manual_seed(0)
    model = randomize_bn(TinyResNet())
    x = torch.randn(1, 3, 16, 16)
    return trained_heads(dynify.convert(model, example_input=x)).eval()


def batches(count: int, size: int = 8, seed: int = 1):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(size, 3, 16, 16, generator=generator) for _ in range(count)]


@torch.no_grad()
def test_clean_traffic_keeps_the_calibrated_thresholds(dyn):
    dyn.set_thresholds(0.5)  # these inputs cost ~0.48 of the static MACs
    guard = dynify.BudgetGuard(dyn, budget=0.6, window=64)
    calibrated = dyn.thresholds.clone()
    for x in batches(20):
        out = guard(x)
        assert out.shape == (8, 5)
    assert guard.level == 0.0
    assert torch.equal(dyn.thresholds, calibrated)
    assert guard.mean_cost < 0.6


@torch.no_grad()
def test_traffic_forced_to_the_end_is_pulled_back_within_budget(dyn):
    dyn.set_thresholds(1.01)  # unreachable: every sample runs to the end (1.006 of static)
    guard = dynify.BudgetGuard(dyn, budget=0.5, window=64)
    costs = []
    for x in batches(60):
        guard(x)
        costs += (dyn.last_macs.double() / dyn.static_macs).tolist()
    assert costs[0] > 1.0
    assert guard.level > 0.0
    assert sum(costs[-64:]) / 64 <= 0.55
    assert guard.mean_cost <= 0.55
    assert torch.all(dyn.thresholds < 1.01)


@torch.no_grad()
def test_guard_relaxes_to_the_calibrated_thresholds_after_an_attack(dyn):
    dyn.set_thresholds(0.5)
    guard = dynify.BudgetGuard(dyn, budget=0.5, window=32)
    guard.observe([dyn.static_macs] * 64)  # a burst of samples that ran to the end
    assert guard.level > 0.0
    assert torch.all(dyn.thresholds < 0.5)
    for x in batches(60):
        guard(x)
    assert guard.level == 0.0
    assert torch.equal(dyn.thresholds, torch.full_like(dyn.thresholds, 0.5))


@torch.no_grad()
def test_concurrent_calls_update_the_guard_as_sequential_ones(dyn):
    """Every call costs the same (same input, unreachable thresholds never reached before the
    level moves them), so the final level is order-independent: a lost update would change it."""
    x = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    calls, threads = 40, 4

    def run(guard: dynify.BudgetGuard, count: int) -> None:
        for _ in range(count):
            guard.observe([dyn.static_macs])

    sequential = dynify.BudgetGuard(dyn, budget=0.5, window=16, gain=0.5, thresholds=[1.01] * 3)
    run(sequential, calls * threads)
    expected = sequential.level
    concurrent = dynify.BudgetGuard(dyn, budget=0.5, window=16, gain=0.5, thresholds=[1.01] * 3)
    workers = [threading.Thread(target=run, args=(concurrent, calls)) for _ in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert concurrent.level == pytest.approx(expected, abs=1e-12)
    # and through the model's forward from several threads at once
    concurrent.reset()
    seen: list[tuple[int, int]] = []

    def serve() -> None:
        for _ in range(calls):
            concurrent(x)
            seen.append((int(dyn.last_macs.numel()), threading.get_ident()))

    workers = [threading.Thread(target=serve) for _ in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert len(seen) == calls * threads
    assert concurrent.level > 0.0
    assert concurrent.mean_cost is not None and 0.0 < concurrent.mean_cost <= 1.01


def test_guard_refuses_bad_settings(dyn):
    for kwargs in ({"budget": 0.0}, {"budget": float("nan")}, {"gain": -1.0}, {"window": 0}):
        with pytest.raises(StrategyError):
            dynify.BudgetGuard(dyn, **{"budget": 0.5, **kwargs})
    with pytest.raises(StrategyError):
        dynify.BudgetGuard(torch.nn.Linear(2, 2), budget=0.5)


def test_guard_thresholds_follow_observed_costs_for_exported_serving(dyn):
    """Serving an exported graph: costs come from its decisions, thresholds go to its input."""
    dyn.set_thresholds(0.5)
    guard = dynify.BudgetGuard(dyn, budget=0.5, window=8)
    assert torch.equal(guard.thresholds, torch.full((3,), 0.5))
    exit_macs = torch.tensor(dyn.exit_macs())
    guard.observe(exit_macs[torch.full((8,), dyn.num_exits)])  # 8 samples ran to the end
    assert torch.all(guard.thresholds < 0.5)
    assert guard.mean_cost == pytest.approx(exit_macs[-1].item() / dyn.static_macs)
