"""The slowdown suite's text rows: skip-rnn and stop-reading on the static AG News LSTM of
`benchmarks/text_baseline.py`, attacked by token substitution.

Tokens are discrete, so there is no eps ball: the attacker may replace up to k tokens of the
text (positions holding a word, never the padding, so the text keeps its length) with any of
the vocabulary's most frequent words. The search is greedy and black-box (it needs only the
served model's cost, no gradients): per round, a seeded sample of positions times a sample of
candidate words, every substitution scored in one batched forward, the dearest kept if it costs
more than the text it replaces. The cost is what the model records (`last_macs`); for
stop-reading, ties are broken by DeepSloth's hinge on the exit scores (`dynify.exit_scores`).
Each model is fine-tuned (`dynify.finetune`) on the static model's fit part and calibrated
(`dynify.calibrate`) on its held-out part; texts of the development test split are measured.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Iterator
from typing import Any

import torch

import dynify
from benchmarks.slowdown_rows import Attacked, measure_stream
from benchmarks.text_baseline import DEFAULT_CACHE, TextSettings, static_text_model

DATASET = "agnews"
TEXT_STRATEGIES = {"skip-rnn": "skip RNN (state updates)", "stop-reading": "stop reading"}


def _ids(data: Any, rows: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    items = [data[i] for i in rows]
    return torch.stack([x for x, _ in items]), torch.tensor([int(y) for _, y in items])


def _spread(n: int, limit: int) -> list[int]:
    return list(range(n)) if not limit or limit >= n else [i * n // limit for i in range(limit)]


def cost_of(dyn) -> Any:
    """Candidates [B, T] -> [B] float: the MAC fraction each spends (higher: better for the
    attacker), plus a tie-breaker for exit cascades: minus 1e-3 x the hinge on their scores."""

    @torch.no_grad()
    def cost(ids: torch.Tensor) -> torch.Tensor:
        dyn(ids)
        spent = dyn.last_macs.double() / dyn.static_macs
        if isinstance(dyn, dynify.ExitCascade):
            scores = dynify.exit_scores(dyn, ids)
            hinge = sum(
                torch.relu(s - t).double() for s, t in zip(scores, dyn.thresholds, strict=False)
            )
            spent = spent - 1e-3 * hinge
        return spent

    return cost


@torch.no_grad()
def swap_attack(
    dyn,
    ids: torch.Tensor,
    swaps: list[int],
    seed: int,
    positions: int = 8,
    words: int = 24,
    vocab_top: int = 5000,
    vocab_size: int | None = None,
) -> dict[int, torch.Tensor]:
    """Greedy substitution of up to max(swaps) tokens per text; the texts after k rounds for
    each k in `swaps`. Ids 0 and 1 (padding, unknown) are never written or replaced."""
    cost = cost_of(dyn)
    top = min(vocab_top, vocab_size or vocab_top)
    generator = torch.Generator().manual_seed(seed)
    out: dict[int, list[torch.Tensor]] = {k: [] for k in swaps}
    for n in range(len(ids)):
        x = ids[n : n + 1].clone()
        real = torch.nonzero(x[0] > 1).squeeze(1)
        current = float(cost(x)[0])
        for r in range(1, max(swaps) + 1):
            if len(real):
                pos = real[torch.randperm(len(real), generator=generator)[:positions]]
                cand = torch.randint(2, top, (words,), generator=generator)
                batch = x.repeat(len(pos) * len(cand), 1)
                rows = torch.arange(len(batch))
                batch[rows, pos.repeat_interleave(len(cand))] = cand.repeat(len(pos))
                scores = cost(batch)
                best = int(scores.argmax())
                if float(scores[best]) > current:
                    x, current = batch[best : best + 1].clone(), float(scores[best])
            if r in out:
                out[r].append(x)
    return {k: torch.cat(v) for k, v in out.items()}


def _model(strategy: str, static, args: argparse.Namespace):
    """Convert and fine-tune `strategy` on the static model; returns (dyn, budget, seconds)."""
    example = static.test[0][0].unsqueeze(0)
    fit = static.fit
    if args.text_fit_rows and args.text_fit_rows < len(fit):
        fit = torch.utils.data.Subset(fit, range(args.text_fit_rows))
    torch.manual_seed(args.seed)
    if strategy == "skip-rnn":
        budget = args.skip_budget
        dyn = dynify.convert(static.model, "skip-rnn", example, options={"budget": budget})
        mode = "joint"
    else:
        budget = args.reading_budget
        dyn = dynify.convert(static.model, "stop-reading", example, options={"every": 5})
        mode = "heads"
    started = time.perf_counter()
    dynify.finetune(
        dyn,
        fit,
        mode=mode,
        epochs=args.text_epochs,
        batch_size=64,
        seed=args.seed,
        augment=False,
        calibration_fraction=0.0,
        progress=False,
    )
    return dyn, budget, mode, len(fit), time.perf_counter() - started


def run_text(strategy: str, args: argparse.Namespace) -> dict[str, Any]:
    """Fine-tune, calibrate and measure one text strategy clean and under token swaps."""
    start = time.perf_counter()
    settings = TextSettings()
    if getattr(args, "quick_text", False):
        settings = TextSettings(hidden=16, embed_dim=8, max_len=20, epochs=1, train_rows=200)
    static = static_text_model(DATASET, args.data, settings, args.text_cache)
    static.model.eval()
    dyn, budget, mode, fit_rows, seconds = _model(strategy, static, args)
    cal = dynify.calibrate(dyn, static.held_out, budget=budget, part="all")
    dyn.eval()
    clean_ids, clean_labels = _ids(static.test, _spread(len(static.test), args.clean_texts))
    attack_ids, attack_labels = _ids(static.test, _spread(len(static.test), args.attack_texts))
    with torch.no_grad(), dyn.static():
        static_acc = float((dyn(clean_ids).argmax(-1) == clean_labels).double().mean())
    print(f"{strategy}: calibrated to {cal.macs_fraction:.3f} ({cal.accuracy:.4f})", flush=True)
    g = {
        "window": args.window,
        "gain": args.gain,
        "passes": args.passes,
        "steady_passes": args.steady_passes,
    }
    dear = (
        "texts read to their end (the dearest a substitution can make them: it keeps the length)"
        if strategy == "stop-reading"
        else "texts that updated the state at every step"
    )
    out: dict[str, Any] = {
        "kind": "units",
        "attack": "swaps",
        "title": TEXT_STRATEGIES[strategy],
        "net": f"{DATASET} LSTM",
        "strategy": strategy,
        "options": {"budget": budget} if strategy == "skip-rnn" else {"every": 5},
        "budget": budget,
        "cap": args.text_cap if isinstance(dyn, dynify.MacCapped) else None,
        "thresholds": list(cal.thresholds),
        "calib_macs": cal.macs_fraction,
        "calib_acc": cal.accuracy,
        "static_acc": static_acc,
        "reference_name": "the static LSTM",
        "worst_case": dyn.worst_case_macs() / dyn.static_macs,
        "train_rows": fit_rows,
        "clean_images": len(clean_labels),
        "attack_images": len(attack_labels),
        "finetune_seconds": seconds,
        "guard": g,
        "rows": [],
    }
    out["setup"] = (
        f"The static AG News LSTM of `benchmarks/text_baseline.py` (1 layer of 256, 60 tokens), "
        f"converted and fine-tuned in {mode} mode for {args.text_epochs} epoch(s) on {fit_rows} "
        f"of its fit texts ({seconds:.0f} s), calibrated to a budget of {budget} of the static "
        f"MACs on its {len(static.held_out)} held-out texts (there: {cal.macs_fraction:.3f}, "
        f"{100 * cal.accuracy:.2f} %; thresholds "
        + ", ".join(f"{t:.3f}" for t in cal.thresholds)
        + f"). Static LSTM on the clean test texts: {100 * static_acc:.2f} %. Worst case per "
        f"text: {out['worst_case']:.3f} of the static MACs; 'worst': {dear}. "
        + (
            f"MAC cap {args.text_cap} (`set_mac_cap`). "
            if out["cap"] is not None
            else "No MAC cap (the strategy is not `dynify.MacCapped` here). "
        )
        + f"Guard: window {g['window']}, gain {g['gain']}, the last {g['steady_passes']} of "
        f"{g['passes']} shuffled passes, one text at a time. Attack: up to k greedy "
        f"substitutions among the {args.swap_words} candidate words (of the 5,000 most frequent) "
        f"x {args.swap_positions} word positions sampled per round, kept when they raise the "
        "cost; the padding is never touched."
    )

    def attacked() -> Iterator[Attacked]:
        t0 = time.perf_counter()
        swapped = swap_attack(
            dyn,
            attack_ids,
            args.swaps,
            args.seed,
            positions=args.swap_positions,
            words=args.swap_words,
            vocab_size=len(static.vocab),
        )
        seconds = time.perf_counter() - t0
        for k in args.swaps:
            yield "token swaps", k, 0, swapped[k], attack_labels, seconds

    clean_sets = [
        ("clean (test subset)", clean_ids, clean_labels),
        ("clean (attacked texts)", attack_ids, attack_labels),
    ]
    measure_stream(dyn, out["rows"], clean_sets, attacked(), args, budget, cap=args.text_cap)
    out["shortened"] = (
        f"Run size: {fit_rows} fine-tuning texts, {len(clean_labels)} clean and "
        f"{len(attack_labels)} attacked test texts."
    )
    out["seconds"] = time.perf_counter() - start
    return out


def add_text_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--text-cache", default=DEFAULT_CACHE, help="the static LSTMs' cache")
    parser.add_argument("--text-epochs", type=int, default=2)
    parser.add_argument("--text-fit-rows", type=int, default=0, help="0: all the fit part")
    parser.add_argument("--skip-budget", type=float, default=0.5)
    parser.add_argument("--text-cap", type=float, default=0.6, help="MacCapped text strategies")
    parser.add_argument("--reading-budget", type=float, default=0.25)
    parser.add_argument("--clean-texts", type=int, default=1000)
    parser.add_argument("--attack-texts", type=int, default=100)
    parser.add_argument("--swaps", type=int, nargs="+", default=[1, 3, 6])
    parser.add_argument("--swap-positions", type=int, default=8)
    parser.add_argument("--swap-words", type=int, default=24)
