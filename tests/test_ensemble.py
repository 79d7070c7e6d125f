"""Zero Time Waste's ensemble of exit heads: fitted weights help, and every runtime (batched,
single-sample, calibration's simulation, ONNX Runtime, the artifact) answers alike."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dynify
from dynify.errors import DataError
from dynify.export.onnx import write_onnx
from dynify.train.calibrate import ExitOutputs, calibrate, collect_outputs, simulate
from dynify.train.ensemble import fit_ensemble
from tests.conftest import TinyResNet, randomize_bn


def _noisy_heads(n: int = 3000, heads: int = 4, seed: int = 0) -> ExitOutputs:
    """Heads that each see the label through independent noise: together they know more."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 10, (n,), generator=generator)
    signal = F.one_hot(labels, 10).float() * 1.5
    logits = [signal + torch.randn(n, 10, generator=generator) for _ in range(heads)]
    return ExitOutputs([*logits, signal * 10], labels, [1, 2, 3, 4, 10], 10)


def _nll_and_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> tuple[float, float]:
    return float(F.cross_entropy(logits, labels)), float(
        (logits.argmax(-1) == labels).float().mean()
    )


def test_fitted_ensemble_beats_each_head_alone():
    fit, held_out = _noisy_heads(seed=0), _noisy_heads(seed=1)
    weights = fit_ensemble(fit)
    assert torch.equal(weights, weights.tril()) and bool((weights >= 0).all())
    log_probs = [F.log_softmax(lg, -1) for lg in held_out.logits[:-1]]
    for i in range(1, len(log_probs)):
        mixed = sum(weights[i, j] * log_probs[j] for j in range(i + 1))
        nll, acc = _nll_and_accuracy(mixed, held_out.labels)
        nll_alone, acc_alone = _nll_and_accuracy(held_out.logits[i], held_out.labels)
        assert nll < nll_alone and acc > acc_alone + 0.02, i  # on data it was not fitted on


def test_ensemble_needs_the_heads_own_logits():
    outputs = _noisy_heads(n=100)
    outputs.raw = False
    with pytest.raises(DataError, match="raw=True"):
        fit_ensemble(outputs)


def _ensembled(exits: int = 3) -> tuple[nn.Module, dynify.DynamicModel, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = randomize_bn(TinyResNet())
    dyn = dynify.convert(model, "early-exit", torch.zeros(1, 3, 16, 16), options={"exits": exits})
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for head in dyn.heads:
            w = head.classifier.weight
            w.copy_(torch.randn(w.shape, generator=generator) * 3.0)
    x = torch.randn(600, 3, 16, 16, generator=generator)
    with torch.no_grad():
        y = (model(x) * 20 + torch.randn(600, 5, generator=generator)).argmax(-1)
    return model, dyn.eval(), x, y


def test_calibrate_with_ensemble_every_runtime_path_agrees():
    _, dyn, x, y = _ensembled()
    with torch.no_grad():
        raw = dyn.exit_logits(x)
    result = calibrate(dyn, (x[:400], y[:400]), budget=0.6, ensemble=True)
    assert dyn.ensembled and result.macs_fraction <= 0.6 + 1e-9
    held_out = collect_outputs(dyn, (x[400:], y[400:]))
    assert not held_out.raw
    with torch.no_grad():
        expected = dyn.combine(dyn.exit_logits(x[400:], raw=True))
        assert all(torch.allclose(a, b) for a, b in zip(held_out.logits, expected, strict=True))
        assert not torch.allclose(held_out.logits[1], raw[1][400:])  # exits answer differently
        out = dyn(x[400:])  # batched, per-sample gather/scatter
        exits, macs = dyn.last_exit.clone(), dyn.last_macs.clone()
        alone = [dyn(x[i : i + 1]) for i in range(400, 440)]  # the batch-1 path
    acc, mean_macs, sim_exits = simulate(dyn, held_out)
    assert torch.equal(sim_exits, exits) and len(set(exits.tolist())) >= 2
    assert mean_macs == pytest.approx(float(macs.double().mean()) / dyn.static_macs, 1e-12)
    assert acc == pytest.approx(float((out.argmax(-1) == y[400:]).double().mean()), abs=1e-12)
    rows = torch.stack([expected[int(e)][i] for i, e in enumerate(exits.tolist())])
    torch.testing.assert_close(out, rows)
    torch.testing.assert_close(torch.cat(alone), out[:40], atol=1e-5, rtol=1e-5)


def test_ensemble_survives_onnx_and_the_artifact(tmp_path):
    _, dyn, x, y = _ensembled(exits=2)
    calibrate(dyn, (x[:400], y[:400]), budget=0.6, ensemble=True)
    cases = [[0.0, 0.0], list(dyn.thresholds.tolist()), [0.6, 0.7], [1.01, 0.0], [1.01, 1.01]]
    result = write_onnx(
        dyn.export_face(),
        x[:2],
        tmp_path / "ensemble.onnx",
        inputs=[x[:1], x[:16]],
        thresholds_list=cases,
        reference=dyn,
    )
    assert result.report.ok, str(result.report)
    dynify.save(dyn, tmp_path / "e.dyn")
    loaded = dynify.load(tmp_path / "e.dyn", model=TinyResNet())
    assert torch.equal(loaded.ensemble, dyn.ensemble)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x[400:]), dyn(x[400:]))
