"""Temperature scaling (Guo et al. 2017): one temperature per exit, so that exit scores are
comparable probabilities before thresholds are chosen on them."""

from __future__ import annotations

import math

import torch

from dynify.train.exit_outputs import ExitOutputs


def fit_temperature(logits: torch.Tensor, targets: torch.Tensor) -> float:
    """The T minimising the NLL of softmax(logits / T) (golden-section search over log T).

    The NLL is convex in 1/T, hence unimodal in log T, so the search finds the optimum.
    """
    logits = logits.double()

    def nll(log_t: float) -> float:
        return float(torch.nn.functional.cross_entropy(logits / math.exp(log_t), targets))

    lo, hi = math.log(0.05), math.log(20.0)
    ratio = (math.sqrt(5) - 1) / 2
    a, b = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
    fa, fb = nll(a), nll(b)
    for _ in range(40):
        if fa < fb:
            hi, b, fb = b, a, fa
            a = hi - ratio * (hi - lo)
            fa = nll(a)
        else:
            lo, a, fa = a, b, fb
            b = lo + ratio * (hi - lo)
            fb = nll(b)
    return float(math.exp((lo + hi) / 2))


def fit_temperatures(outputs: ExitOutputs) -> list[float]:
    """One temperature per exit head (the final classifier keeps its own)."""
    targets = outputs.reference()
    return [fit_temperature(lg, targets) for lg in outputs.logits[:-1]]
