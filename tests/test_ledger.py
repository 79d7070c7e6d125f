"""The cost ledger (`dynify.runtime.ledger`): the book a pass builds from the front end's MACs,
and the per-forward tab the wrappers charge.

The contract tests check every strategy's `last_macs` against FlopCounterMode; here: the
ledger's own arithmetic (charging with masks, rows and weights, the floor, the worst case, exit
costs), that tabs are per forward and per thread, and that each strategy that keeps its books
in the ledger derives its figures from it.
"""

from __future__ import annotations

import json
import threading

import pytest
import torch

import dynify
from dynify.errors import StrategyError
from dynify.export.bench import threshold_cases
from dynify.runtime.ledger import DECIDER, FIXED, UNIT, CostBook, mega
from tests.test_contract import converted, variants

LEDGER_STRATEGIES = (
    "early-exit",
    "block-gates",
    "spatial-masks",
    "resolution",
    "dynamic-conv",
    "frame-exit",
    "dynamic-width",
    "skip-rnn",
    "stop-reading",
)


def small_book() -> CostBook:
    book = CostBook(1000)
    book.add("rest", 400, FIXED)
    book.add("gate0", 10, DECIDER)
    book.add("branch0", 300, UNIT)
    book.add("gate1", 20, DECIDER)
    book.add("branch1", 300, UNIT, dearest=450)  # halo'd tiles can cost more than dense
    return book


# --- the book -------------------------------------------------------------------------------


def test_book_derives_floor_worst_case_and_exit_costs():
    book = small_book()
    assert book.fixed_macs() == 400
    assert book.floor() == 430  # every unit skipped, every decision unit charged
    assert book.worst_case_macs() == 400 + 10 + 300 + 20 + 450
    assert book.cumulative([["rest", "gate0"], ["branch0", "gate1"], ["branch1"]]) == [
        410,
        730,
        1030,
    ]
    assert book.columns(300) == {"MACs": "0.0 M", "of static": "0.300"}
    assert book.columns(2_345_678, "branch MACs", 2) == {
        "branch MACs": "2.35 M",
        "of static": "2345.678",
    }
    assert mega(1_250_000, 3) == "1.250 M"


def test_book_refuses_inconsistent_items():
    book = small_book()
    with pytest.raises(StrategyError, match="already"):
        book.add("rest", 1, FIXED)
    with pytest.raises(StrategyError, match="dearest"):
        book.add("cheap", 10, UNIT, dearest=5)
    with pytest.raises(StrategyError, match="dearest"):
        book.add("negative", -1, UNIT)
    with pytest.raises(StrategyError, match="role"):
        book.add("odd", 1, "sometimes")


def test_book_round_trips_through_json():
    book = small_book()
    again = CostBook.from_dict(json.loads(json.dumps(book.to_dict())))
    assert again.to_dict() == book.to_dict()
    assert again.worst_case_macs() == book.worst_case_macs() and again.floor() == book.floor()


# --- the tab --------------------------------------------------------------------------------


def test_tab_charges_every_sample_masks_rows_and_amounts():
    book = small_book()
    tab = book.tab(4)
    assert tab.macs().tolist() == [400] * 4  # every sample starts at the fixed cost
    tab.charge("gate0")
    tab.charge("branch0", torch.tensor([True, False, True, False]))
    tab.charge_rows("gate1", torch.tensor([1, 3]))
    tab.charge_amount("branch1", torch.tensor([0, 75, 150, 450]))
    assert tab.macs().tolist() == [710, 505, 860, 880]
    assert tab.spent.dtype == torch.float64


def test_tab_charges_are_exact_for_large_counts():
    """float64 holds every MAC count a network has: a 20-GMAC model's tab is exact."""
    book = CostBook(20 * 10**9)
    book.add("rest", 19_999_999_999, FIXED)
    book.add("unit", 3, UNIT)
    tab = book.tab(2)
    tab.charge("unit", torch.tensor([True, False]))
    assert tab.macs().tolist() == [20_000_000_002, 19_999_999_999]


def test_tab_with_float_weights_is_differentiable():
    """Training charges straight-through weights: the compute term's gradient flows."""
    book = small_book()
    weight = torch.tensor([0.25, 1.0], requires_grad=True)
    tab = book.tab(2, dtype=torch.float32)
    tab.charge("branch0", weight)
    tab.spent.sum().backward()
    assert weight.grad.tolist() == [300.0, 300.0]
    assert tab.macs().tolist() == [475, 700]


def test_scalar_tab_charges_python_floats():
    book = small_book()
    tab = book.tab(1, scalar=True)
    tab.charge("gate0")
    tab.charge("branch0", False)
    tab.charge("branch1", True)
    assert tab.spent == 710.0 and tab.macs().tolist() == [710]
    tab.charge_amount("branch1", 150)  # a part of a unit, as a Python number
    assert tab.spent == 860.0 and tab.macs().tolist() == [860]


def test_tab_refuses_unknown_items_and_integer_masks():
    tab = small_book().tab(2)
    with pytest.raises(KeyError):
        tab.charge("nothing")
    with pytest.raises(StrategyError, match="charge_rows"):
        tab.charge("branch0", torch.tensor([0, 1]))
    with pytest.raises(StrategyError, match="no item"):
        tab.charge_amount("nothing", torch.tensor([1, 2]))


# --- the strategies keep their books in the ledger ------------------------------------------


def ledger_params() -> list:
    return [
        pytest.param(s, o, id="-".join([s, *(str(v) for v in o.values())]))
        for s in LEDGER_STRATEGIES
        for o in variants(s)
    ]


def model(strategy: str, options: dict) -> dynify.DynamicModel:
    case = converted(strategy, json.dumps(options, sort_keys=True))
    case.dyn.set_thresholds(case.mixed)
    return case.dyn


@pytest.mark.parametrize("strategy,options", ledger_params())
def test_worst_case_and_floor_come_from_the_book(strategy, options):
    """Every cost figure the model reports is the book's: the worst case, the MAC cap's floor,
    a cascade's exit costs (the first is the floor, the last the worst case)."""
    dyn = model(strategy, options)
    book = dyn.book
    assert book.items and book.static_macs == dyn.static_macs
    assert dyn.costs() == list(book.items.values())  # the public face of the book
    assert dyn.worst_case_macs() == book.worst_case_macs()
    assert book.fixed_macs() <= book.floor() <= book.worst_case_macs()
    if isinstance(dyn, dynify.MacCapped):
        assert dyn.cap_floor() == book.floor()
    if isinstance(dyn, dynify.PerSampleExits):  # a text may finish before exit 0: its head
        assert book.floor() < dyn.exit_macs()[0]  # is not a cost every sample pays
        assert dyn.exit_macs()[-1] == book.worst_case_macs()
    elif isinstance(dyn, dynify.ExitCascade):
        assert dyn.exit_macs()[0] == book.floor()
        assert dyn.exit_macs()[-1] == book.worst_case_macs()


@pytest.mark.parametrize("strategy,options", ledger_params())
def test_the_cheapest_thresholds_spend_the_floor_and_no_sample_more_than_the_worst(
    strategy, options
):
    """Threshold 0 (every exit taken first, every gate shut, no mask unit active): every
    sample spends exactly the book's floor, whatever it is. The exceptions: halting gates,
    whose floor charges every halting unit while a halted sample pays only its stage's first;
    the patience policy, which cannot leave before `patience` exits agree; skip-rnn, whose
    rule at 0 (never update again) needs no gate, so a sample pays the fixed cost alone;
    frame-exit's gates, whose floor charges every gate while a clip leaving after its first
    frames pays the first gate alone; and stop-reading, whose exit costs are each text's own
    (a text leaves at exit 0 if it reaches it, else at the original classifier). At every forcing threshold, no sample spends more
    than the book's worst case."""
    case = converted(strategy, json.dumps(options, sort_keys=True))
    dyn, x = case.dyn, case.x
    try:
        with torch.no_grad():
            dyn.set_thresholds(0.0)
            dyn(x)
            spent = dyn.last_macs
            if options.get("gate") == "halting":
                assert (spent <= dyn.book.floor()).all() and (spent >= dyn.book.fixed_macs()).all()
            elif options.get("policy") == "patience":
                assert (spent > dyn.book.floor()).all()
            elif strategy == "skip-rnn":
                assert spent.tolist() == [dyn.book.fixed_macs()] * len(spent)
            elif strategy == "frame-exit" and options.get("policy") == "gate":
                assert spent.tolist() == [dyn.exit_macs()[0]] * len(x)
            elif isinstance(dyn, dynify.PerSampleExits):
                macs, available = dyn.sample_exit_costs(x)
                assert spent.tolist() == torch.where(available[0], macs[0], macs[-1]).tolist()
            else:
                assert spent.tolist() == [dyn.book.floor()] * len(x)
            for _, thresholds in threshold_cases(dyn):
                dyn.set_thresholds(thresholds)
                dyn(x)
                assert int(dyn.last_macs.max()) <= dyn.book.worst_case_macs()
    finally:
        dyn.set_thresholds(case.mixed)


@pytest.mark.parametrize("strategy,options", ledger_params())
def test_the_book_is_rebuilt_from_the_plan_and_is_not_state(strategy, options, tmp_path):
    """The book is plain data: not in the state dict (artifacts written before it load
    unchanged), and loading rebuilds the same book from the stored plan."""
    dyn = model(strategy, options)
    assert not any("book" in key for key in dyn.state_dict())
    path = dynify.save(dyn, tmp_path / "model.dyn")
    loaded = dynify.load(path, model=converted(strategy, json.dumps(options, sort_keys=True)).model)
    assert loaded.book.to_dict() == dyn.book.to_dict()


def test_tabs_are_per_thread():
    """Two threads running one spatial-mask model at once (its wrappers share one pass state,
    tab included) each get the MACs of their own inputs."""
    dyn = model("spatial-masks", {"granularity": "region"})
    inputs = [dyn.random_input(3, torch.Generator().manual_seed(s)) * (s + 1) for s in range(2)]
    with torch.no_grad():
        expected = []
        for x in inputs:
            dyn(x)
            expected.append(dyn.last_macs.tolist())
    assert expected[0] != expected[1]
    errors: list[str] = []
    barrier = threading.Barrier(2)

    def serve(i: int) -> None:
        barrier.wait()
        with torch.no_grad():
            for _ in range(20):
                dyn(inputs[i])
                if dyn.last_macs.tolist() != expected[i]:
                    errors.append(f"thread {i}: {dyn.last_macs.tolist()}")

    threads = [threading.Thread(target=serve, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[:3]
