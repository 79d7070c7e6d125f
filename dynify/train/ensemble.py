"""Fitting Zero Time Waste's geometric ensemble of exit heads on calibration outputs.

A sample that reaches exit i has paid for heads 0..i; their predictions are evidence too. Exit i
answers `sum_j<=i w[i, j] * log_softmax(head_j)` (Wolczyk et al. 2021), with non-negative
weights fitted per exit by minimising the negative log-likelihood of the calibration targets.
Fitted after training, like temperatures: no gradient reaches the network.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dynify.errors import DataError
from dynify.train.exit_outputs import ExitOutputs, one_thread

INITIAL_WEIGHT = 1.0  # exit i starts as head i alone (log-probs of a head are its logits)
INITIAL_OTHERS = 0.02


def fit_ensemble(outputs: ExitOutputs, max_iter: int = 100) -> torch.Tensor:
    """[K, K] lower-triangular ensemble weights for the K exit heads in `outputs`.

    `outputs` must hold each head's own logits (`collect_outputs(..., raw=True)`)."""
    if not outputs.raw:
        raise DataError(
            "Ensemble weights are fitted on the heads' own logits; collect the outputs with "
            "collect_outputs(..., raw=True)."
        )
    target = outputs.reference()
    log_probs = [F.log_softmax(lg.float(), -1) for lg in outputs.logits[:-1]]
    k = len(log_probs)
    weights = torch.zeros(k, k)
    with one_thread(), torch.enable_grad():
        for i in range(k):
            stack = torch.stack(log_probs[: i + 1])  # [i + 1, N, C]
            start = torch.full((i + 1,), INITIAL_OTHERS)
            start[i] = INITIAL_WEIGHT
            raw = torch.log(torch.expm1(start)).requires_grad_()  # softplus(raw) == start
            optimizer = torch.optim.LBFGS(
                [raw], lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe"
            )

            def closure(stack=stack, raw=raw, optimizer=optimizer) -> torch.Tensor:
                optimizer.zero_grad()
                mixed = (F.softplus(raw)[:, None, None] * stack).sum(0)
                loss = F.cross_entropy(mixed, target)
                loss.backward()
                return loss

            optimizer.step(closure)
            weights[i, : i + 1] = F.softplus(raw.detach())
    return weights
