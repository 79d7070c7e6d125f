"""Decision rules, written once: pure tensor functions that every face of a strategy applies.

The eager forward, the `torch.cond` export face and calibration's simulation on collected logits
all call these, so a decision cannot drift between them. Batch-1 paths decide in Python floats
(a handful of tensor ops on ten numbers cost more to dispatch than to compute); they go through
`decide_one`, which hands a value too close to call back to the tensor rule (`FLOAT32_TIE`).

Conventions shared by every strategy: a threshold of 0 is the cheapest behaviour, one above 1
the static network's. Exits leave when their score reaches the threshold (`score >= t`); gates
and mask units run when their probability clears one minus it (`p > 1 - t`).

A score that is not a number (NaN or infinite logits, from NaN, infinite or huge inputs) is a
decision, not a comparison that silently fails: it counts as certain (score 1), so the sample
leaves at the first exit it reaches that is switched on (threshold <= 1), and a forced exit
(threshold 0, e.g. the one a `mac_cap` sets) fires for every input. No input can make a sample
spend more than the cap.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

POLICIES = ("confidence", "entropy", "patience")
# Batch-1 paths decide in Python floats (double); a value closer than this to its boundary is
# settled by the float32 tensor rule, so both paths always take the same decision.
FLOAT32_TIE = 1e-5
# A threshold above every score in [0, 1]: the unit never fires (the static network's work).
NEVER = 1.01

# --- exits -------------------------------------------------------------------------------------


def exit_scores(logits: Tensor, temperature: Tensor | float, kind: str) -> Tensor:
    """Certainty of each sample's prediction, in [0, 1], for the exit policy `kind`: normalised
    entropy for "entropy", max softmax otherwise (patience adds its agreement rule on top).
    Not-a-number scores are 1 (see the module's docstring)."""
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if kind == "entropy":
        entropy = -(probs * torch.log(probs.clamp_min(1e-12))).sum(-1)
        classes = probs.shape[-1]
        score = 1.0 - entropy / math.log(classes) if classes > 1 else torch.ones_like(entropy)
    else:
        score = probs.max(-1).values
    return torch.where(torch.isnan(score), torch.ones_like(score), score)


def reaches(scores: Tensor, threshold: Tensor | float) -> Tensor:
    """The exit rule: a sample leaves when its score reaches the threshold."""
    return scores >= threshold


def agreement_streak(prediction: Tensor, previous: Tensor, streak: Tensor) -> Tensor:
    """Patience (PABEE): how many exits in a row, this one included, predicted this class.

    Before the first exit `previous` is -1 and `streak` 0, so the first exit's streak is 1.
    """
    return torch.where(prediction == previous, streak + 1, torch.ones_like(streak))


def start_streak(batch: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """(previous prediction, streak) before the first exit: no prediction (-1), streak 0."""
    previous = torch.full((batch,), -1, dtype=torch.long, device=device)
    return previous, torch.zeros_like(previous)


def exit_decision(
    logits: Tensor,
    temperature: Tensor | float,
    threshold: Tensor | float,
    kind: str,
    patience: int,
    state: tuple[Tensor, Tensor] | None = None,
) -> tuple[Tensor, tuple[Tensor, Tensor] | None]:
    """Which samples leave at this exit (bool [N]), and the patience state after it.

    `state` is `(previous prediction, streak)` for the patience policy (`start_streak` before
    the first exit), None for the others (which keep no history).
    """
    leave = reaches(exit_scores(logits, temperature, kind), threshold)
    if kind != "patience":
        return leave, state
    previous, streak = state if state is not None else start_streak(len(logits), logits.device)
    prediction = logits.argmax(-1)
    streak = agreement_streak(prediction, previous, streak)
    return leave & (streak >= patience), (prediction, streak)


def exits_taken(
    scores: Tensor, allowed: Tensor, thresholds: Tensor, only: range | None = None
) -> Tensor:
    """The exit each sample takes from precomputed scores [K, N] (K: runs to the end).

    `allowed` [K, N] is the patience condition (all True for the other policies); `only`
    restricts the rule to some exits (the others never fire). The first exit that fires wins.
    """
    k, n = scores.shape
    index = torch.full((n,), k, dtype=torch.long, device=scores.device)
    t = thresholds.float()
    for j in reversed(only if only is not None else range(k)):
        index = torch.where(reaches(scores[j], t[j]) & allowed[j], j, index)
    return index


def patience_allowed(predictions: Tensor, patience: int) -> Tensor:
    """[K, N] bool from every exit's predictions [K, N]: has the streak reached `patience`."""
    previous, streak = start_streak(predictions.shape[1], predictions.device)
    allowed = []
    for prediction in predictions:
        streak = agreement_streak(prediction, previous, streak)
        previous = prediction
        allowed.append(streak >= patience)
    return torch.stack(allowed)


def ensemble_logits(weights: Tensor, log_probs: Sequence[Tensor]) -> Tensor:
    """`sum_j weights[j] * log_probs[j]` over the heads so far (a row of ZTW's ensemble)."""
    mixed = weights[0] * log_probs[0]
    for j in range(1, len(log_probs)):
        mixed = mixed + weights[j] * log_probs[j]
    return mixed


# --- gates, halting units, mask units ----------------------------------------------------------


def gate_probability(logits: Tensor) -> Tensor:
    """A decision unit's logits -> the probability that its gate (or mask position) is open."""
    return torch.sigmoid(logits.float())


def gate_open(prob: Tensor, threshold: Tensor | float) -> Tensor:
    """A gate (or a mask unit, or a policy's plan entry) runs its work when p > 1 - threshold;
    a threshold above 1 runs it whatever p (NaN included), as the eager shortcut does."""
    above = torch.as_tensor(threshold, device=prob.device) > 1.0
    return (prob > 1.0 - threshold) | above


def greedy_open(logits: Tensor) -> Tensor:
    """The deterministic decision training prices its compute by: the gate rule at the default
    threshold 0.5, taken on the logit (positive = open) so no rounding of the sigmoid enters."""
    return logits > 0.0


def halting_update(
    cum: Tensor, h: Tensor, threshold: Tensor | float, active: Tensor | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """One step of ACT's halting (Graves 2016; SACT): (new cumulative score, halts now, weight).

    A sample halts once its cumulative score, capped at 1, reaches the threshold; the output it
    halts on weighs the remainder 1 - cum, the others weigh h. `active` (bool [N]) masks the
    samples that had halted before: they neither halt again nor weigh anything, and keep cum.
    """
    capped = torch.clamp(cum + h, max=1.0)
    stop = capped >= threshold
    weight = torch.where(stop, 1.0 - cum, h)
    if active is None:
        return capped, stop, weight
    return torch.where(active, capped, cum), stop & active, weight * active


def straight_through_gumbel(logits: Tensor, temperature: float = 1.0) -> Tensor:
    """A hard 0/1 sample per gate with the gradient of its relaxed sigmoid (binary
    Gumbel-softmax, Jang et al. 2017): how gates, policies and mask units learn to decide."""
    u = torch.rand_like(logits).clamp(1e-6, 1 - 1e-6)
    noise = torch.log(u) - torch.log1p(-u)  # the difference of two Gumbels is logistic
    soft = torch.sigmoid((logits + noise) / temperature)
    hard = (soft > 0.5).to(soft.dtype)
    return hard + soft - soft.detach()


# --- batch 1 in Python floats -----------------------------------------------------------------


def decide_one(value: float, boundary: float, strict: bool, exact: Callable[[], bool]) -> bool:
    """`value > boundary` (strict) or `>=`, in doubles, unless the two are within
    `FLOAT32_TIE`: then `exact()`, the float32 tensor rule, decides (the tie rule)."""
    if abs(value - boundary) < FLOAT32_TIE:
        return exact()
    return value > boundary if strict else value >= boundary


def exit_score_one(logits: Sequence[float], temperature: float, kind: str) -> float:
    """`exit_scores` of one sample, in Python floats (double precision, within ~1e-7 of the
    float32 tensor rule: `decide_one` settles scores that close to a threshold)."""
    if len(logits) < 2:
        return 1.0  # one class: nothing to be unsure about
    top = max(logits)
    shifted = [(value - top) / temperature for value in logits]
    total = sum(math.exp(value) for value in shifted)
    if kind != "entropy":
        score = 1.0 / total
    else:
        log_total = math.log(total)
        entropy = -sum(math.exp(value - log_total) * (value - log_total) for value in shifted)
        score = 1.0 - entropy / math.log(len(logits))
    return 1.0 if math.isnan(score) else score


def leaves_one(
    logits: Tensor, temperature: float, threshold: float, kind: str, temperature_t: Tensor
) -> bool:
    """`exit_decision` for a batch of one without patience, decided in Python floats.

    `temperature` and `threshold` are the float32 buffers' values as floats; `temperature_t` is
    the buffer entry itself, for the tensor rule on a tie.
    """
    score = exit_score_one(logits.tolist()[0], temperature, kind)
    return decide_one(
        score,
        threshold,
        strict=False,
        exact=lambda: float(exit_scores(logits, temperature_t, kind)[0]) >= threshold,
    )


def sigmoid_one(x: float) -> float:
    """Sigmoid of a Python float (double precision)."""
    return 1.0 / (1.0 + math.exp(-x)) if x > -700.0 else 0.0


def gate_open_one(logit: float, threshold: float, exact: Callable[[], bool] | None = None) -> bool:
    """`gate_open(gate_probability(logit), threshold)` in Python floats. On a tie, `exact()`
    decides, by default the tensor rule on the float32 values (logits and thresholds come from
    float32 tensors, so rebuilding them is exact)."""
    if exact is None:
        exact = lambda: bool(gates_open_tensor([logit], [threshold])[0])  # noqa: E731
    return decide_one(sigmoid_one(logit), 1.0 - threshold, strict=True, exact=exact)


def gates_open_one(logits: Sequence[float], thresholds: Sequence[float]) -> list[bool]:
    """`gate_open_one` for several gates of one sample (a policy's plan). A tie anywhere hands
    the whole plan to the tensor rule, as one [K] tensor like the batched path."""
    probs = [sigmoid_one(v) for v in logits]
    if any(abs(p - (1.0 - t)) < FLOAT32_TIE for p, t in zip(probs, thresholds, strict=True)):
        return gates_open_tensor(logits, thresholds).tolist()
    return [p > 1.0 - t or t > 1.0 for p, t in zip(probs, thresholds, strict=True)]


def gates_open_tensor(logits: Sequence[float], thresholds: Sequence[float]) -> Tensor:
    """The tensor rule on float32 values given as Python floats (the tie case)."""
    prob = gate_probability(torch.tensor(list(logits), dtype=torch.float32))
    return gate_open(prob, torch.tensor(list(thresholds), dtype=torch.float32))


def halting_update_one(
    cum: float, h: float, threshold: float, exact: Callable[[], bool] | None = None
) -> tuple[float, bool, float]:
    """`halting_update` for one sample in Python floats. With `exact` (the tensor rule's stop
    decision, `halts_by_tensor_rule`), a cumulative score within `FLOAT32_TIE` of the threshold
    is settled by it."""
    capped = min(cum + h, 1.0)
    if exact is None:
        stop = capped >= threshold
    else:
        stop = decide_one(capped, threshold, strict=False, exact=exact)
    return capped, stop, (1.0 - cum) if stop else h


def halts_by_tensor_rule(logits: Sequence[float], threshold: float) -> bool:
    """Whether the float32 tensor rule halts a sample after the stage's halting logits so far
    (float32 values as Python floats): `halting_update` replayed step by step, for the tie case."""
    thr = torch.tensor(threshold, dtype=torch.float32)
    cum = torch.zeros(1)
    stop = torch.zeros(1, dtype=torch.bool)
    for logit in logits:
        cum, stop, _ = halting_update(cum, gate_probability(torch.tensor([logit])), thr)
    return bool(stop[0])


# --- widths ------------------------------------------------------------------------------------


def width_index(logits: Tensor, threshold: Tensor | float) -> Tensor:
    """The width each sample runs (int64 [N], 0 the narrowest) from a width gate's logits [N, W]:
    the gate's distribution over widths read at quantile `threshold`, i.e. the number of widths
    j < W-1 whose cumulative probability P(width <= j) is below it. 0 always picks the narrowest,
    anything above 1 the full width, 0.5 the median width. A non-finite score is a decision: the
    cumulative probabilities count as reached (1), so the sample runs the narrowest width
    unless the threshold asks for full width everywhere."""
    cumulative = torch.cumsum(torch.softmax(logits.float(), dim=-1), dim=-1)[..., :-1]
    cumulative = torch.nan_to_num(cumulative, nan=1.0).clamp(max=1.0)
    return (cumulative < threshold).sum(-1).to(torch.int64)


def straight_through_choice(logits: Tensor, temperature: float = 1.0) -> Tensor:
    """A hard one-hot sample [N, W] of a categorical choice with the gradient of its relaxed
    softmax (Gumbel-softmax, Jang et al. 2017): how width gates learn to choose."""
    return torch.nn.functional.gumbel_softmax(logits.float(), tau=temperature, hard=True)


def width_index_one(logits: Sequence[float], threshold: float, exact: Callable[[], int]) -> int:
    """`width_index` of one sample in Python floats (a batch of one: the tensor ops cost more
    to dispatch than to compute). A cumulative probability within `FLOAT32_TIE` of the
    threshold, or a non-finite logit, is settled by `exact()`, the tensor rule."""
    if not all(math.isfinite(v) for v in logits):
        return exact()
    top = max(logits)
    weights = [math.exp(v - top) for v in logits]
    total = sum(weights)
    cumulative, count = 0.0, 0
    for w in weights[:-1]:
        cumulative += w / total
        value = min(cumulative, 1.0)
        if abs(value - threshold) < FLOAT32_TIE:
            return exact()
        count += value < threshold
    return count


# --- skip-rnn: the cumulative update probability (Campos et al. 2018) ---------------------------


def update_probability(logits: Tensor) -> Tensor:
    """Skip RNN's delta u: the per-step growth of the update probability, from the gate's logit
    on the state at the last update. Not a number counts as 1 (update at the next step)."""
    delta = torch.sigmoid(logits.float())
    return torch.where(torch.isnan(delta), torch.ones_like(delta), delta)


def update_boundary(threshold: Tensor | float) -> Tensor:
    """The value the cumulative update probability must exceed for a step to update:
    1 - threshold (a threshold of 0: never after the first step; above 1: every step)."""
    return 1.0 - torch.as_tensor(threshold, dtype=torch.float32)


def updates_every_step(threshold: Tensor | float) -> Tensor:
    """True when the threshold makes every step update whatever the gate says (above 1)."""
    return update_boundary(threshold) < 0.0


def gate_decides(threshold: float) -> bool:
    """Whether the gate's value can change a decision at this threshold (in (0, 1]); outside
    it the schedule is known without running the gate."""
    boundary = float(update_boundary(threshold))
    return 0.0 <= boundary < 1.0


def steps_to_next_update(delta: Tensor, threshold: Tensor | float, limit: int) -> Tensor:
    """Skip RNN's binarised gate, as the number of steps from an update to the next (int64).

    After an update the cumulative probability is delta, and it grows by delta per skipped step
    (capped at 1): u_{t+j} = min(j * delta, 1). The next update is the first j >= 1 with
    u_{t+j} > 1 - threshold, i.e. floor((1 - threshold) / delta) + 1, known as soon as the
    update happens, so the skipped steps run nothing. A threshold of 0 or less never updates
    again (limit + 1), one above 1 updates every step (1); `limit` caps the count (the steps
    left), so the division never overflows an integer.
    """
    boundary = update_boundary(threshold).to(delta.device)
    # delta counts as at least 1e-30 (a sigmoid that underflowed): above a boundary > 0 the
    # ratio exceeds `limit` (never again), at boundary 0 (threshold 1) the next step updates; a
    # negative boundary (threshold above 1) clamps the ratio to 0: the next step.
    ratio = (boundary / delta.clamp_min(1e-30)).clamp(0.0, float(limit))
    steps = torch.floor(ratio) + 1.0
    steps = torch.where(boundary >= 1.0, float(limit + 1), steps)
    return steps.to(torch.int64)


def straight_through_update(u: Tensor, boundary: float) -> Tensor:
    """Training: the binary update decision (u > boundary) forward, the identity backward
    (straight-through, as in Skip RNN)."""
    hard = (u > boundary).to(u.dtype)
    return hard + u - u.detach()


def accumulate_update_probability(u: Tensor, update: Tensor, delta: Tensor) -> Tensor:
    """Skip RNN's recursion: after an update the probability restarts at delta, after a skip
    it grows by delta (capped at 1)."""
    return update * delta + (1.0 - update) * (u + torch.minimum(delta, 1.0 - u))


def steps_to_next_update_one(
    logits: Sequence[float], boundary: float, limit: int, exact: Callable[[], list[int]]
) -> list[int]:
    """`steps_to_next_update(update_probability(logits), threshold, limit)` in Python doubles,
    for a boundary (1 - threshold, as its float32 value) in [0, 1), where the gate decides.

    The eager loop decides a step's schedule this way: a dozen tensor ops on a few numbers per
    step cost more than the step's cell. A ratio boundary / delta within `FLOAT32_TIE`
    (relative) of a whole number, where float32 and double could floor differently, hands the
    step to the tensor rule (`exact()`), so both paths always schedule alike.
    """
    steps = []
    for logit in logits:
        delta = 1.0 if math.isnan(logit) else sigmoid_one(logit)
        ratio = boundary / max(delta, 1e-30)
        if ratio >= limit + 1.0:
            steps.append(limit + 1)
            continue
        if abs(ratio - round(ratio)) < FLOAT32_TIE * max(1.0, ratio):
            return exact()
        steps.append(math.floor(min(ratio, float(limit))) + 1)
    return steps
