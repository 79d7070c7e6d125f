"""Benchmarks of the spatial strategies (issue 6): writes the numbers in benchmarks/spatial.md.

    python benchmarks/spatial.py latency --models resnet18 resnet50      # masked-block latency
    python benchmarks/spatial.py cifar --data ../shared/data             # accuracy vs MACs

`latency`: torchvision ResNets with random weights at 224x224, batch 1. Every maskable block gets
a fixed random mask of the given density (region: exactly round(d * tiles) tiles; pixel: a
smooth random blob mask, thresholded at the d-quantile, as learned masks are spatially
coherent). Dense branch and sparse wrapper are timed interleaved, block by block, on the same
captured block inputs, and the medians are summed over the masked blocks; the whole network is
timed the same way. Ratios are within one run, so machine load affects both sides alike.

`cifar`: the pretrained CIFAR ResNets on the JPEG CIFAR-10 of ../shared/data: spatial masks
trained with Gumbel straight-through + sparsity + distillation, and the resolution cascade with
per-resolution batch norm, each calibrated on a held-out part of `train` and reported on `test`.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import dynify
from dynify.runtime.spatial_masks import SpatialMaskModel

DENSITIES = (1.0, 0.5, 0.25, 0.1)


def _timer(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def fixed_masks(dyn: SpatialMaskModel, density: float, seed: int) -> list[torch.Tensor]:
    """One [1, h, w] bool mask per wrapper, with a MAC-weighted density of `density`.

    Region: random tiles; the blocks are visited from the coarsest tiles to the finest, each
    carrying its rounding error over to the next (a 7x7 map is one tile at tile 7, all on or all
    off), so the finest maps absorb what the coarse ones could not realize and the MAC-weighted
    density lands on the target. Pixel: a smooth random blob mask thresholded at the
    d-quantile, since learned masks are spatially coherent and random pixels dilate to nearly
    everything.
    """
    gen = torch.Generator().manual_seed(seed)
    wrappers = dyn.wrappers
    masks: list[torch.Tensor] = [torch.empty(0)] * len(wrappers)
    carry = 0.0  # MACs still owed to (or over) the target

    def tile_macs(k: int) -> float:
        h, w = wrappers[k].units()
        return wrappers[k].branch_macs / (h * w)

    for k in sorted(range(len(wrappers)), key=tile_macs, reverse=True):
        wrapper = wrappers[k]
        h, w = wrapper.units()
        if dyn.granularity == "region":
            unit = tile_macs(k)
            wanted = density * wrapper.branch_macs + carry
            count = max(0, min(h * w, int(wanted / unit + 0.5)))
            carry = wanted - count * unit
            flat = torch.zeros(h * w, dtype=torch.bool)
            flat[torch.randperm(h * w, generator=gen)[:count]] = True
            masks[k] = flat.view(1, h, w)
        else:
            low = torch.rand(1, 1, max(2, h // 8), max(2, w // 8), generator=gen)
            smooth = F.interpolate(low, size=(h, w), mode="bicubic", align_corners=False)[0]
            if density >= 1.0:
                masks[k] = torch.ones(1, h, w, dtype=torch.bool)
            elif density <= 0.0:
                masks[k] = torch.zeros(1, h, w, dtype=torch.bool)
            else:
                masks[k] = smooth < torch.quantile(smooth.flatten(), density)
    return masks


def realized_density(dyn: SpatialMaskModel, masks: list[torch.Tensor]) -> float:
    """The MAC-weighted share of the masked blocks' work that `masks` keep."""
    kept = sum(
        float(m.float().mean()) * w.branch_macs for m, w in zip(masks, dyn.wrappers, strict=True)
    )
    return kept / sum(w.branch_macs for w in dyn.wrappers)


def _cpu_timer(fn) -> tuple[float, float]:
    """(wall seconds, this thread's CPU seconds) of one call."""
    wall, cpu = time.perf_counter(), time.thread_time()
    fn()
    return time.perf_counter() - wall, time.thread_time() - cpu


@torch.no_grad()
def latency(
    model_name: str,
    granularity: str,
    tile: int,
    reps: int,
    seed: int,
    densities: tuple[float, ...] = DENSITIES,
) -> dict:
    import torchvision

    torch.manual_seed(seed)
    model = getattr(torchvision.models, model_name)().eval()
    x = torch.randn(1, 3, 224, 224)
    dyn = dynify.convert(
        model, "spatial-masks", x, options={"granularity": granularity, "tile": tile}
    ).eval()
    feats: list[torch.Tensor] = []
    hooks = [w.register_forward_pre_hook(lambda m, a: feats.append(a[0])) for w in dyn.wrappers]
    with dyn.static():
        dyn(x)
    for h in hooks:
        h.remove()
    rows = []
    cases = [(d, False) for d in densities] + [(1.0, True)]
    for density, fallback in cases:
        masks = fixed_masks(dyn, density, seed)
        dense_t, sparse_t, err = 0.0, 0.0, 0.0
        dense_cpu, sparse_cpu = 0.0, 0.0
        # blocks whose mask is neither all on nor all off: the sparse path proper
        partial = {"dense_cpu": 0.0, "sparse_cpu": 0.0, "macs": 0, "active_macs": 0.0}
        for wrapper, feat, mask in zip(dyn.wrappers, feats, masks, strict=True):
            wrapper.dense_when_full = fallback
            wrapper.fixed_mask = mask
            sparse = lambda w=wrapper, f=feat: w(f)  # noqa: E731
            dense = lambda w=wrapper, f=feat: w.branch(f)  # noqa: E731
            dense(), sparse()
            td, ts, cd, cs = [], [], [], []
            for _ in range(reps):
                wall, cpu = _cpu_timer(dense)
                td.append(wall)
                cd.append(cpu)
                wall, cpu = _cpu_timer(sparse)
                ts.append(wall)
                cs.append(cpu)
            dense_t += statistics.median(td)
            sparse_t += statistics.median(ts)
            dense_cpu += statistics.median(cd)
            sparse_cpu += statistics.median(cs)
            if 0 < int(mask.sum()) < mask.numel():
                partial["dense_cpu"] += statistics.median(cd)
                partial["sparse_cpu"] += statistics.median(cs)
                partial["macs"] += wrapper.branch_macs
                partial["active_macs"] += float(mask.float().mean()) * wrapper.branch_macs
            err = max(err, float((wrapper(feat) - wrapper.dense_masked(feat, mask)).abs().max()))
        block_macs = sum(w.branch_macs for w in dyn.wrappers)
        spent = 0
        for wrapper, feat in zip(dyn.wrappers, feats, strict=True):
            wrapper(feat)
            spent += int(wrapper.last_macs.sum())  # a forced mask: no mask-unit MACs
        dyn.set_fixed_masks(masks)
        for w in dyn.wrappers:
            w.dense_when_full = fallback
        full_d, full_s, cpu_d, cpu_s = [], [], [], []
        for _ in range(max(3, reps // 3)):
            with dyn.static():
                wall, cpu = _cpu_timer(lambda: dyn(x))
            full_d.append(wall)
            cpu_d.append(cpu)
            wall, cpu = _cpu_timer(lambda: dyn(x))
            full_s.append(wall)
            cpu_s.append(cpu)
        rows.append(
            {
                "density": density,
                "dense_fallback": fallback,
                "blocks_dense_ms": 1e3 * dense_t,
                "blocks_sparse_ms": 1e3 * sparse_t,
                "speedup": dense_t / sparse_t,
                "blocks_dense_cpu_ms": 1e3 * dense_cpu,
                "blocks_sparse_cpu_ms": 1e3 * sparse_cpu,
                "cpu_speedup": dense_cpu / sparse_cpu,
                "macs_fraction": spent / block_macs,
                "realized_density": realized_density(dyn, masks),
                "partial_blocks": sum(0 < int(m.sum()) < m.numel() for m in masks),
                "partial_density": partial["active_macs"] / max(partial["macs"], 1),
                "partial_cpu_speedup": partial["dense_cpu"] / partial["sparse_cpu"]
                if partial["sparse_cpu"]
                else float("nan"),
                "net_dense_ms": 1e3 * statistics.median(full_d),
                "net_dynamic_ms": 1e3 * statistics.median(full_s),
                "net_dense_cpu_ms": 1e3 * statistics.median(cpu_d),
                "net_dynamic_cpu_ms": 1e3 * statistics.median(cpu_s),
                "max_abs_err_vs_dense_masked": err,
            }
        )
        print(json.dumps({"model": model_name, "granularity": granularity, **rows[-1]}), flush=True)
        dyn.set_fixed_masks(None)
    skipped = [s["join"] for s in dyn.spec["plan"]["skipped"]]
    return {
        "model": model_name,
        "granularity": granularity,
        "tile": tile,
        "tiles": [w.tile for w in dyn.wrappers],
        "masked_blocks": len(dyn.wrappers),
        "skipped_blocks": skipped,
        "masked_share_of_macs": sum(w.branch_macs for w in dyn.wrappers) / dyn.static_macs,
        "rows": rows,
    }


# --- CIFAR-10 (JPEG) ------------------------------------------------------------------------

WEIGHTS = {
    "cifar_resnet20": "resnet20-12fca82f.th",
    "cifar_resnet32": "resnet32-d509ac18.th",
    "cifar_resnet44": "resnet44-014dd654.th",
}
CACHE = Path("/tmp/dynify_cifar10_uint8.pt")
# Confidences pile up near 1: resolve the end of the range finely.
FINE_THRESHOLDS = [i / 100 for i in range(0, 100, 2)] + [0.95, 0.98, 0.99, 0.995, 0.999, 1.0, 1.01]


def load_cifar(data: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """uint8 tensors of the JPEG CIFAR-10 train and test splits, decoded once and cached."""
    from dynify.train.data import load_dataset, to_tensor_dataset

    if CACHE.exists():
        return torch.load(CACHE, weights_only=True)
    archive = Path(data) / "cifar10-jpeg.zip"
    out = {}
    for split in ("train", "test"):
        ds = to_tensor_dataset(load_dataset(archive, split=f"cifar10/{split}"))
        out[split] = (ds.images, ds.targets)
    torch.save(out, CACHE)
    return out


def _norm(images: torch.Tensor) -> torch.Tensor:
    from dynify.train.data import IMAGENET_MEAN, IMAGENET_STD, normalize_batch

    return normalize_batch(images, IMAGENET_MEAN, IMAGENET_STD)


def _batches(images, labels, size):
    for i in range(0, len(images), size):
        yield _norm(images[i : i + size]), labels[i : i + size]


@torch.no_grad()
def _logits(fn, images, size=500) -> torch.Tensor:
    return torch.cat([fn(x) for x, _ in _batches(images, torch.zeros(len(images)), size)])


def _accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return float((logits.argmax(-1) == labels).float().mean())


def cascade_curve(low, full, labels, low_frac, thresholds):
    """Accuracy and MAC fraction of the resolution cascade at each threshold, from logits."""
    conf = torch.softmax(low, -1).amax(-1)
    rows = []
    for t in thresholds:
        done = conf >= t
        pred = torch.where(done, low.argmax(-1), full.argmax(-1))
        macs = low_frac + (~done).float().mean() * 1.0
        rows.append(
            {
                "threshold": float(t),
                "accuracy": float((pred == labels).float().mean()),
                "macs_fraction": float(macs),
                "exit_low": float(done.float().mean()),
            }
        )
    return rows


def choose_threshold(rows, static_acc, margin):
    """The cheapest threshold whose accuracy is within `margin` of the static model's."""
    ok = [r for r in rows if r["accuracy"] >= static_acc - margin]
    return min(ok, key=lambda r: r["macs_fraction"]) if ok else rows[-1]


def _latency_ms(fns: dict, images, reps: int) -> dict[str, float]:
    """Mean batch-1 latency per function over the same images, interleaved per image.

    Wall-clock, and the CPU time of this thread (`cpu_*`: with one torch thread, the work
    done, insensitive to other processes preempting us on a shared machine).
    """
    times = {k: [] for k in fns}
    cpu = {k: [] for k in fns}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # batch-1 latency on one core; thread time then counts all work
    with torch.no_grad():
        for i in range(reps):
            x = _norm(images[i : i + 1])
            for k, fn in fns.items():
                fn(x)  # warm (first call per shape builds caches)
                start = time.thread_time()
                times[k].append(_timer(lambda fn=fn, x=x: fn(x)))
                cpu[k].append(time.thread_time() - start)
    torch.set_num_threads(threads)
    out = {k: 1e3 * statistics.mean(v) for k, v in times.items()}
    out.update({f"cpu_{k}": 1e3 * statistics.mean(v) for k, v in cpu.items()})
    return out


@torch.no_grad()
def adapt_bn(model: torch.nn.Module, images: torch.Tensor) -> torch.nn.Module:
    """A copy of `model` whose BN running statistics are exact averages over `images`."""
    import copy

    model = copy.deepcopy(model)
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None
    model.train()
    for x, _ in _batches(images, torch.zeros(len(images)), 250):
        model(x)
    for bn in bns:
        bn.momentum = 0.1
    return model.eval()


def joint_resolution(static, teacher, fit_x, fit_y, cal_x, cal_y, test_x, test_y, thresholds, args):
    """Joint fine-tuning of the shared weights for both resolutions, against a static model
    fine-tuned with the same images, epochs, optimiser and loss (the fair baseline).

    Both start from the BN-adapted static network; batch-norm statistics stay frozen in both
    (eval mode), their affine parameters train. The dynamic model distils both resolutions
    (per-resolution BN and classifier for the low one); the static one distils its logits.
    """
    import copy

    from dynify.train.losses import distillation

    start = time.perf_counter()
    baseline = copy.deepcopy(static).eval()
    dyn = dynify.convert(static, "resolution", torch.zeros(1, 3, 32, 32)).eval()
    dyn.recalibrate_low_bn(x for x, _ in _batches(fit_x[-2000:], fit_y, 250))
    dyn.train()
    runs = {
        "static": (baseline, lambda x, t, y: distillation(baseline(x), t, y, 4.0, 0.5)[0]),
        "cascade": (dyn, lambda x, t, y: dyn.training_loss(x, t, y)[0]),
    }
    for model, loss_fn in runs.values():
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.SGD(params, lr=args.joint_lr, momentum=0.9, weight_decay=5e-4)
        steps = args.joint_epochs * ((len(fit_x) + 127) // 128)
        step = 0
        for epoch in range(args.joint_epochs):
            order = torch.randperm(len(fit_x), generator=torch.Generator().manual_seed(epoch))
            for i in range(0, len(fit_x), 128):
                idx = order[i : i + 128]
                for group in opt.param_groups:
                    group["lr"] = args.joint_lr * 0.5 * (1 + math.cos(math.pi * step / steps))
                loss = loss_fn(_norm(fit_x[idx]), teacher[idx], fit_y[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
                step += 1
    dyn.eval()
    base_test, base_cal = _logits(baseline, test_x), _logits(baseline, cal_x)
    low_test, low_cal = _logits(dyn.low_logits, test_x), _logits(dyn.low_logits, cal_x)
    full_test, full_cal = _logits(dyn.net, test_x), _logits(dyn.net, cal_x)
    low_frac = dyn.low_macs / dyn.static_macs
    cal_rows = cascade_curve(low_cal, full_cal, cal_y, low_frac, thresholds)
    pick = choose_threshold(cal_rows, _accuracy(base_cal, cal_y), args.margin)
    test_rows = cascade_curve(low_test, full_test, test_y, low_frac, thresholds)
    out = {
        "finetuned_static_test_accuracy": _accuracy(base_test, test_y),
        "joint_full_test_accuracy": _accuracy(full_test, test_y),
        "joint_low_test_accuracy": _accuracy(low_test, test_y),
        "chosen_on_calibration": pick,
        "test_at_chosen": next(r for r in test_rows if r["threshold"] == pick["threshold"]),
        "test_curve": [r for k, r in enumerate(test_rows) if k % 5 == 0 or r["threshold"] >= 0.9],
        "images": len(fit_x),
        "epochs": args.joint_epochs,
        "seconds": time.perf_counter() - start,
    }
    print("joint resolution", {k: v for k, v in out.items() if k != "test_curve"}, flush=True)
    return out


def run_cifar(args) -> list[dict]:
    from dynify.train.data import TensorImageDataset, split_dataset
    from dynify.zoo import build_model

    start = time.perf_counter()
    data = load_cifar(args.data)
    print(f"data ready in {time.perf_counter() - start:.0f}s", flush=True)
    train_x, train_y = data["train"]
    test_x, test_y = data["test"]
    if args.test_images:  # smoke runs only; reported figures use the whole test split
        test_x, test_y = test_x[: args.test_images], test_y[: args.test_images]
    fit, cal = split_dataset(TensorImageDataset(train_x, train_y), 0.1, seed=0)
    fit_idx = torch.as_tensor(fit.indices)[
        torch.randperm(len(fit), generator=torch.Generator().manual_seed(0))
    ]
    cal_idx = torch.as_tensor(cal.indices)
    if args.test_images:
        cal_idx = cal_idx[: args.test_images]
    kd_idx = fit_idx[: args.train_images]
    results = []
    for name in args.models:
        t0 = time.perf_counter()
        weights = str(Path(args.data) / "pretrained" / WEIGHTS[name])
        original, _ = build_model(name, weights=weights)
        original.eval()
        res: dict = {"model": name}
        res["original_test_accuracy"] = _accuracy(_logits(original, test_x), test_y)
        # The fine-tuned static baseline: batch-norm statistics re-estimated on JPEG `train`
        # (the JPEG images shift them); every dynamic model is converted from this one.
        static = adapt_bn(original, train_x[fit_idx[-args.bn_images :]])
        test_full = _logits(static, test_x)
        cal_full = _logits(static, train_x[cal_idx])
        res["static_test_accuracy"] = _accuracy(test_full, test_y)
        res["static_cal_accuracy"] = _accuracy(cal_full, train_y[cal_idx])
        teacher = _logits(static, train_x[kd_idx])
        print(
            name,
            "static",
            res["static_test_accuracy"],
            f"{time.perf_counter() - t0:.0f}s",
            flush=True,
        )

        if args.joint_only:
            res["resolution"] = {
                "joint": joint_resolution(
                    static,
                    teacher,
                    train_x[kd_idx],
                    train_y[kd_idx],
                    train_x[cal_idx],
                    train_y[cal_idx],
                    test_x,
                    test_y,
                    FINE_THRESHOLDS,
                    args,
                )
            }
            results.append(res)
            Path(args.out).write_text(json.dumps({"partial": True, "results": results}, indent=2))
            continue

        # --- resolution cascade ---
        dyn = dynify.convert(static, "resolution", torch.zeros(1, 3, 32, 32)).eval()
        low_frac = dyn.low_macs / dyn.static_macs
        res["resolution"] = {"low_macs_fraction": low_frac, "variants": {}}
        shared = lambda x, net=static: net(F.avg_pool2d(x, 2))  # noqa: E731
        recal_batches = (x for x, _ in _batches(train_x[fit_idx[-2000:]], train_y, 250))
        cal_x = train_x[cal_idx]
        lows = {"shared_bn": (_logits(shared, test_x), _logits(shared, cal_x))}
        dyn.recalibrate_low_bn(recal_batches)
        lows["recalibrated_bn"] = (_logits(dyn.low_logits, test_x), _logits(dyn.low_logits, cal_x))
        for p in dyn.net.parameters():
            p.requires_grad_(False)
        dyn.train()
        opt = torch.optim.Adam(dyn.low_parameters(), lr=2e-3)
        kd_x, kd_y = train_x[kd_idx], train_y[kd_idx]
        for i in range(0, len(kd_idx), 128):
            x = _norm(kd_x[i : i + 128])
            loss, stats = dyn.training_loss(x, teacher[i : i + 128], kd_y[i : i + 128])
            opt.zero_grad()
            loss.backward()
            opt.step()
        dyn.eval()
        lows["finetuned_bn"] = (_logits(dyn.low_logits, test_x), _logits(dyn.low_logits, cal_x))
        thresholds = [i / 100 for i in range(0, 101, 2)] + [1.01]
        for key, (low, cal_low) in lows.items():
            cal_rows = cascade_curve(cal_low, cal_full, train_y[cal_idx], low_frac, thresholds)
            pick = choose_threshold(cal_rows, res["static_cal_accuracy"], args.margin)
            test_rows = cascade_curve(low, test_full, test_y, low_frac, thresholds)
            chosen = next(r for r in test_rows if r["threshold"] == pick["threshold"])
            res["resolution"]["variants"][key] = {
                "low_test_accuracy": _accuracy(low, test_y),
                "chosen_on_calibration": pick,
                "test_at_chosen": chosen,
                "test_curve": [*test_rows[::5], test_rows[-1]],
            }
            print(name, "resolution", key, _accuracy(low, test_y), chosen, flush=True)
        if name in args.joint_models:
            res["resolution"]["joint"] = joint_resolution(
                static,
                teacher,
                train_x[kd_idx],
                train_y[kd_idx],
                train_x[cal_idx],
                train_y[cal_idx],
                test_x,
                test_y,
                thresholds,
                args,
            )
        pick = res["resolution"]["variants"]["finetuned_bn"]["chosen_on_calibration"]
        dyn.set_thresholds(pick["threshold"])
        correct, spent = 0, 0
        with torch.no_grad():
            for x, y in _batches(test_x, test_y, 500):
                correct += int((dyn(x).argmax(-1) == y).sum())
                spent += int(dyn.last_macs.sum())
        res["resolution"]["eager_check"] = {
            "accuracy": correct / len(test_y),
            "macs_fraction": spent / len(test_y) / dyn.static_macs,
        }
        print(
            name,
            "resolution eager",
            res["resolution"]["eager_check"],
            f"{time.perf_counter() - t0:.0f}s",
            flush=True,
        )
        latency_fns = {"static": static, "resolution": dyn}

        # --- spatial masks ---
        res["spatial_masks"] = {}
        mask_idx = fit_idx[: min(args.mask_train_images, args.train_images)]
        for gran in args.mask_granularities:
            sm = dynify.convert(
                static,
                "spatial-masks",
                torch.zeros(1, 3, 32, 32),
                options={
                    "granularity": gran,
                    "tile": 4,
                    "budget": args.mask_budget,
                    "sparsity_weight": 10.0,
                },
            )
            for p in sm.parameters():
                p.requires_grad_(False)
            for p in sm.mask_parameters():
                p.requires_grad_(True)
            sm.train()
            opt = torch.optim.Adam(sm.mask_parameters(), lr=args.mask_lr)
            trace = []
            mx, my, mt = train_x[mask_idx], train_y[mask_idx], teacher[: len(mask_idx)]
            for i in range(0, len(mask_idx), 32):
                x = _norm(mx[i : i + 32])
                loss, stats = sm.training_loss(x, mt[i : i + 32], my[i : i + 32])
                opt.zero_grad()
                loss.backward()
                opt.step()
                trace.append(stats["density"])
            sm.eval()
            rows = []
            for t in args.mask_thresholds:
                sm.set_thresholds(t)
                correct, spent, dens = 0, 0, 0.0
                with torch.no_grad():
                    for x, y in _batches(test_x, test_y, 250):
                        correct += int((sm(x).argmax(-1) == y).sum())
                        spent += int(sm.last_macs.sum())
                        dens += float(sm.densities().mean(1).sum())
                rows.append(
                    {
                        "threshold": t,
                        "accuracy": correct / len(test_y),
                        "macs_fraction": spent / len(test_y) / sm.static_macs,
                        "mean_density": dens / len(test_y),
                    }
                )
                print(name, "masks", gran, rows[-1], flush=True)
            res["spatial_masks"][gran] = {
                "masked_blocks": sm.num_masks,
                "masked_share_of_macs": 1 - sm.fixed_macs / sm.static_macs,
                "train_density_first_last": [trace[0], trace[-1]],
                "test": rows,
            }
            sm.set_thresholds(0.5)
            latency_fns[f"masks_{gran}"] = sm
        res["latency_ms_batch1"] = _latency_ms(latency_fns, test_x, args.latency_images)
        res["seconds"] = time.perf_counter() - t0
        print(name, "latency", res["latency_ms_batch1"], flush=True)
        results.append(res)
        Path(args.out).write_text(json.dumps({"partial": True, "results": results}, indent=2))
    return results


def _joint_lines(joint: dict) -> list[str]:
    """Markdown for the joint fine-tuning comparison of the resolution cascade."""
    lines: list[str] = []
    c = joint["test_at_chosen"]
    lines += [
        "",
        f"Joint fine-tuning ({joint['images']} images x {joint['epochs']} epochs, "
        f"{joint['seconds']:.0f} s for both runs): fine-tuned static "
        f"{joint['finetuned_static_test_accuracy']:.2%}; cascade full path "
        f"{joint['joint_full_test_accuracy']:.2%}, low path "
        f"{joint['joint_low_test_accuracy']:.2%}; at the threshold chosen on "
        f"calibration ({c['threshold']:.2f}): {c['accuracy']:.2%} at "
        f"{c['macs_fraction']:.3f} of the MACs ({c['exit_low']:.1%} exit low).",
        "",
        "| threshold | test acc | MACs | exit at low res |",
        "|---|---|---|---|",
    ]
    for c in joint["test_curve"]:
        lines.append(
            f"| {c['threshold']:.2f} | {c['accuracy']:.2%} | "
            f"{c['macs_fraction']:.3f} | {c['exit_low']:.1%} |"
        )
    return lines


def _partial_cell(row: dict) -> str:
    """The blocks neither all on nor all off (runs before session 5 did not record them)."""
    if not row.get("partial_blocks"):
        return "-"
    return (
        f"{row['partial_blocks']}, {row['partial_density']:.2f}, {row['partial_cpu_speedup']:.2f}x"
    )


def render(latency_json: str | None, cifar_json: str | None) -> str:
    """Markdown tables of the results (what benchmarks/spatial.md shows)."""
    lines: list[str] = []
    if latency_json:
        data = json.loads(Path(latency_json).read_text())
        for res in data["results"]:
            lines += [
                f"#### {res['model']}, {res['granularity']} masks "
                f"({res['masked_blocks']} masked blocks = {res['masked_share_of_macs']:.0%} of "
                f"the MACs; tiles {sorted(set(res['tiles']))}; skipped {res['skipped_blocks']})",
                "",
                "| density (realized) | block MACs | masked blocks dense / sparse, CPU ms | "
                "speed-up CPU (wall) | ideal 1/MACs | partially masked blocks: count, "
                "density, speed-up | whole net dense / dynamic, CPU ms |",
                "|---|---|---|---|---|---|---|",
            ]
            for r in res["rows"]:
                for key in ("blocks_dense", "blocks_sparse", "net_dense", "net_dynamic"):
                    r.setdefault(f"{key}_cpu_ms", r[f"{key}_ms"])  # wall-only older runs
                r.setdefault("cpu_speedup", r["speedup"])
                name = f"{r['density']:.2f} ({r['realized_density']:.2f})"
                if r["dense_fallback"]:
                    name += ", dense fallback"
                lines.append(
                    f"| {name} | {r['macs_fraction']:.2f} | {r['blocks_dense_cpu_ms']:.1f} / "
                    f"{r['blocks_sparse_cpu_ms']:.1f} | **{r['cpu_speedup']:.2f}x** "
                    f"({r['speedup']:.2f}x) | {1 / max(r['macs_fraction'], 1e-9):.2f}x | "
                    f"{_partial_cell(r)} | "
                    f"{r['net_dense_cpu_ms']:.1f} / {r['net_dynamic_cpu_ms']:.1f} |"
                )
            lines.append("")
    if cifar_json:
        data = json.loads(Path(cifar_json).read_text())
        for res in data["results"]:
            if "variants" not in res["resolution"]:  # a --joint-only run
                lines += [f"#### {res['model']}", ""]
                lines += [
                    f"Static: original weights {res['original_test_accuracy']:.2%}, BN-adapted "
                    f"{res['static_test_accuracy']:.2%} on test."
                ]
                lines += [*_joint_lines(res["resolution"]["joint"]), ""]
                continue
            lines += [
                f"#### {res['model']}",
                "",
                f"Static: original weights {res['original_test_accuracy']:.2%}, BN-adapted "
                f"(the baseline below) {res['static_test_accuracy']:.2%} on test.",
                "",
                "| resolution variant | low-res test acc | threshold (chosen on calib.) | "
                "test acc | MACs | exit at low res |",
                "|---|---|---|---|---|---|",
            ]
            for key, v in res["resolution"]["variants"].items():
                c = v["test_at_chosen"]
                lines.append(
                    f"| {key} | {v['low_test_accuracy']:.2%} | {c['threshold']:.2f} | "
                    f"{c['accuracy']:.2%} | {c['macs_fraction']:.3f} | {c['exit_low']:.1%} |"
                )
            lines += ["", "Resolution cascade (fine-tuned low BN + head), test curve:", ""]
            lines += ["| threshold | test acc | MACs | exit at low res |", "|---|---|---|---|"]
            for c in res["resolution"]["variants"]["finetuned_bn"]["test_curve"]:
                lines.append(
                    f"| {c['threshold']:.2f} | {c['accuracy']:.2%} | {c['macs_fraction']:.3f} | "
                    f"{c['exit_low']:.1%} |"
                )
            if res["resolution"].get("joint"):
                lines += _joint_lines(res["resolution"]["joint"])
            e = res["resolution"]["eager_check"]
            lines += [
                "",
                f"Eager cascade at the chosen threshold (real forward, real `last_macs`): "
                f"{e['accuracy']:.2%}, MACs {e['macs_fraction']:.3f}.",
                "",
                "| spatial masks | threshold | test acc | MACs (real, incl. halo/mask units) | "
                "mean density |",
                "|---|---|---|---|---|",
            ]
            for gran, v in res["spatial_masks"].items():
                for r in v["test"]:
                    lines.append(
                        f"| {gran} ({v['masked_blocks']} blocks, {v['masked_share_of_macs']:.0%} "
                        f"of MACs) | {r['threshold']:.2f} | {r['accuracy']:.2%} | "
                        f"{r['macs_fraction']:.3f} | {r['mean_density']:.2f} |"
                    )
            lat = res["latency_ms_batch1"]
            names = [k for k in lat if not k.startswith("cpu_")]
            lines += [
                "",
                "Batch-1 latency, mean over test images, CPU ms (wall ms): "
                + ", ".join(f"{k} {lat['cpu_' + k]:.2f} ({lat[k]:.2f})" for k in names),
                "",
            ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    lat = sub.add_parser("latency")
    lat.add_argument("--models", nargs="+", default=["resnet18", "resnet50"])
    lat.add_argument("--granularities", nargs="+", default=["region", "pixel"])
    lat.add_argument("--tile", type=int, default=8)
    lat.add_argument(
        "--densities",
        nargs="+",
        type=float,
        default=list(DENSITIES),
        help="target mask densities (region tiles round: see the realized column)",
    )
    lat.add_argument("--reps", type=int, default=15)
    lat.add_argument("--threads", type=int, default=1)
    lat.add_argument("--out", default="/tmp/spatial_latency.json")
    cif = sub.add_parser("cifar")
    cif.add_argument("--data", default="../shared/data")
    cif.add_argument("--models", nargs="+", default=["cifar_resnet32", "cifar_resnet44"])
    cif.add_argument("--train-images", type=int, default=5000, help="KD images per model")
    cif.add_argument("--mask-train-images", type=int, default=3000)
    cif.add_argument("--mask-granularities", nargs="+", default=["pixel", "region"])
    cif.add_argument("--latency-images", type=int, default=100)
    cif.add_argument("--mask-budget", type=float, default=0.5)
    cif.add_argument("--mask-lr", type=float, default=0.05)
    cif.add_argument("--bn-images", type=int, default=2000)
    cif.add_argument("--joint-models", nargs="*", default=["cifar_resnet44"])
    cif.add_argument("--joint-epochs", type=int, default=2)
    cif.add_argument("--joint-lr", type=float, default=0.001)
    cif.add_argument("--joint-only", action="store_true", help="static baseline + joint only")
    cif.add_argument("--mask-thresholds", nargs="+", type=float, default=[0.5, 0.3])
    cif.add_argument("--margin", type=float, default=0.002, help="accuracy slack on calibration")
    cif.add_argument("--test-images", type=int, default=0, help="0: all (smoke runs only)")
    cif.add_argument("--threads", type=int, default=2)
    cif.add_argument("--out", default="/tmp/spatial_cifar.json")
    rep = sub.add_parser("report")
    rep.add_argument("--latency")
    rep.add_argument("--cifar")
    args = parser.parse_args(argv)
    if args.command == "report":
        print(render(args.latency, args.cifar))
        return
    torch.set_num_threads(args.threads)
    results = []
    if args.command == "latency":
        for model in args.models:
            for granularity in args.granularities:
                results.append(
                    latency(model, granularity, args.tile, args.reps, 0, tuple(args.densities))
                )
    else:
        results = run_cifar(args)
    meta = {"torch": torch.__version__, "threads": torch.get_num_threads(), "argv": sys.argv}
    Path(args.out).write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    print("wrote", args.out)


if __name__ == "__main__":
    main()
