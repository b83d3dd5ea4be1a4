"""Check this project on a CUDA GPU with one command: tests, speed, numerics, resume, step 1.

    python benchmarks/gpu_check.py                         # the full check (under 10 min on one modern GPU)
    python benchmarks/gpu_check.py --skip-peer --skip-step1  # the quick figures only (a minute or two)
    python benchmarks/gpu_check.py --device cpu --quick    # tiny sizes on the CPU (CI; about a minute)

Writes one JSON file (default <data-dir>/benchmarks/gpu_check.json; --out elsewhere) and prints a
short table of:

- device: torch.cuda's name and compute capability, what ``--precision auto`` picks there;
- tests: the tests marked ``cuda`` (``pytest -m cuda``; they skip without a GPU);
- throughput: training steps (forward, backward, Lamb/Lookahead) on --dataset (aflow__Egap) at fp32
  and bf16: samples/s, the share of a square matmul's FLOP rate of that dtype measured in the same
  process, and the peak of ``torch.cuda.max_memory_allocated`` (the process's peak RSS on the CPU);
- fused Lamb: ``crabnet.training.optim.fused_adam_probe``, PyTorch's fused Adam kernel against the foreach path;
- attention: the captured weights (written out, float32 softmax) times V against the output of
  ``scaled_dot_product_attention`` in the same layers, fp32, real query rows, after a short training;
- resume: a training of N epochs against one interrupted after N/2 (its state saved by ``fit``) and
  resumed, at the precision ``auto`` picks: the largest difference of any weight, and that of a
  second uninterrupted run (how deterministic the device is at all);
- step 1: ``get_training_attention.py`` (up to 50 epochs, epoch capture with attribution) into a
  scratch data dir: wall seconds, epochs run, validation MAE of the saved model (fp32), test MAE;
- peer: ``benchmarks/peer.py --device cuda`` against the ``crabnet`` 2.0.8 package, when its scratch
  virtualenv exists or can be made (skipped with a note otherwise, e.g. without network).

``--quick`` shrinks everything (a few hundred rows, 2 epochs, 3 timed steps; step 1 runs 2 epochs
on those rows; no peer) so that the script itself can be checked on a CPU. ``--device cuda`` on a
machine without a CUDA GPU stops with one ``error:`` line and exit code 2. Exit code 1 when a part
failed (its error is in the JSON), else 0.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

import throughput as tp  # noqa: E402  (benchmarks/throughput.py)
import torch  # noqa: E402

from crabnet.data import CompositionData, batch_size_for, load_dataset  # noqa: E402
from crabnet.errors import DataError  # noqa: E402
from crabnet.fetch import dataset_dir  # noqa: E402
from crabnet.training.checkpoint import checkpoint_path, load_checkpoint  # noqa: E402
from crabnet.training.evaluate import mae, predict  # noqa: E402
from crabnet.training.loop import fit  # noqa: E402
from crabnet.training.model import CrabNet, attend  # noqa: E402
from crabnet.training.optim import fused_adam_probe  # noqa: E402
from crabnet.training.recipe import Scaler, build_model, make_recipe, resolve_precision  # noqa: E402
from crabnet.utils import atomic_path, seed_everything  # noqa: E402

DATASET = "aflow__Egap"
QUICK_ROWS = {"train": 320, "val": 96, "test": 96}  # --quick: the first rows of each split
QUICK_MODEL = {"d_model": 64, "n_heads": 4, "d_ff": 128, "head_dims": (64, 32)}  # --quick: a small model


class _Stop(Exception):
    """Raised by the resume check's callback to interrupt a training."""


def device_info(device: torch.device) -> dict:
    """Name, capability and software versions of ``device``; what ``--precision auto`` picks there."""
    info = {
        "device": str(device),
        "torch": torch.__version__,
        "cuda_runtime": torch.version.cuda,
        "auto_precision": resolve_precision("auto", device),
        "python": platform.python_version(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(
            name=torch.cuda.get_device_name(device),
            capability=list(torch.cuda.get_device_capability(device)),
            memory_gb=round(props.total_memory / 2**30, 1),
            multiprocessors=props.multi_processor_count,
            cudnn=torch.backends.cudnn.version(),
            device_count=torch.cuda.device_count(),
        )
    else:
        info.update(name=platform.processor() or platform.machine(), capability=None, threads=torch.get_num_threads())
    return info


def run_cuda_tests(timeout: int) -> dict:
    """``pytest -m cuda`` on the test files that mark tests ``cuda``, in a subprocess; counts from its summary.

    Only those files are collected: faster, and a module elsewhere that fails to import stops nothing.
    """
    files = sorted(str(f.relative_to(ROOT)) for f in (ROOT / "tests").glob("test_*.py") if "mark.cuda" in f.read_text())
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider", *files]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, check=False)
    counts = dict.fromkeys(("passed", "failed", "skipped", "errors"), 0)
    summary = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
    for n, what in re.findall(r"(\d+) (passed|failed|skipped|errors?)", summary):
        counts["errors" if what.startswith("error") else what] = int(n)
    out = {
        "command": " ".join(cmd[1:]),
        "returncode": proc.returncode,
        **counts,
        "summary": summary,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    if proc.returncode not in (0, 5):  # 5: nothing collected
        out["error"] = f"pytest exited {proc.returncode}"
        out["output_tail"] = (proc.stdout + proc.stderr)[-4000:]
    return out


def throughput(
    train: CompositionData, device: torch.device, steps: int, matmul_n: int, batch_size: int, model_cfg: dict
) -> dict:
    """Samples/s, share of the matmul peak and peak memory of training steps at fp32 and bf16."""
    out = {
        "batch_size": batch_size,
        "steps": steps,
        "rows": len(train),
        "model": model_cfg or "published size",
        "real_slots": round(float((train.elements > 0).mean()), 3),
    }
    for prec in ("fp32", "bf16"):
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        dt, flops = tp.measure(("mat2vec", train.width), train, batch_size, device, steps, prec, model_cfg)
        memory = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else 0  # before the matmul's
        peak = tp.matmul_peak(device, matmul_n, 5, torch.bfloat16 if prec == "bf16" else torch.float32)
        row = {
            "ms_per_step": round(dt * 1e3, 2),
            "samples_per_s": round(batch_size / dt, 1),
            "gflop_per_step": round(flops / 1e9, 2),
            "tflops": round(flops / dt / 1e12, 3),
            "matmul_peak_tflops": round(peak / 1e12, 2),
            "share_of_matmul_peak": round(flops / dt / peak, 4),
        }
        if device.type == "cuda":
            row["max_memory_allocated_mb"] = round(memory / 2**20, 1)
        else:
            row["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
        out[prec] = row
    return out


def _max_weight_diff(a: CrabNet, b: CrabNet) -> float:
    """The largest absolute difference of any weight or buffer of two models."""
    sa, sb = a.state_dict(), b.state_dict()
    return max(float((sa[k].float() - sb[k].float()).abs().max()) if sa[k].numel() else 0.0 for k in sa)


def resume_check(
    splits: dict[str, CompositionData], device: torch.device, epochs: int, seed: int, workdir: Path, model_cfg: dict
) -> tuple[dict, CrabNet]:
    """N epochs uninterrupted (twice) against N/2 epochs, stop, resume from fit's saved state.

    Returns:
        ``(figures, the first uninterrupted model)``.
    """
    precision = resolve_precision("auto", device)
    recipe = make_recipe("immi", epochs=epochs, max_batch_size=1024, early_stop=0)  # step 1's batch size
    half = max(1, epochs // 2)

    def run(name: str, stop_at: int | None = None) -> tuple[CrabNet, object]:
        seed_everything(seed)
        model = build_model("mat2vec", n_elements=splits["train"].width, **model_cfg).to(device)
        scaler = Scaler.fit(splits["train"].target)

        def callback(event: str, epoch: int, step: int) -> None:
            if stop_at is not None and event == "step" and epoch == stop_at:
                raise _Stop()

        hist = fit(
            model,
            splits["train"],
            splits["val"],
            scaler,
            recipe,
            seed=seed,
            callback=callback,
            progress=False,
            state_path=workdir / f"{name}.state.pt",
            state_key={"check": "resume"},
            save_every_s=0,
            precision=precision,
        )
        return model, hist

    t0 = time.perf_counter()
    ref, h_ref = run("reference")
    rerun, _ = run("rerun")
    try:
        run("interrupted", stop_at=half)
        raise RuntimeError("the interrupting callback never ran")
    except _Stop:
        pass
    resumed, h_res = run("interrupted")
    d_resume, d_rerun = _max_weight_diff(ref, resumed), _max_weight_diff(ref, rerun)
    return {
        "epochs": epochs,
        "interrupted_after_epoch": half,
        "steps": h_ref.steps,
        "precision": precision,
        "max_abs_diff_resumed": d_resume,
        "max_abs_diff_rerun": d_rerun,
        "bit_for_bit": d_resume == 0.0,
        "same_history": h_res.train_loss == h_ref.train_loss and h_res.epochs_run == h_ref.epochs_run,
        "seconds": round(time.perf_counter() - t0, 1),
    }, ref


def attention_check(model: CrabNet, data: CompositionData, device: torch.device, n: int) -> dict:
    """max |captured weights @ V - SDPA output| per layer over the real query rows (fp32, eval)."""
    model.eval()
    el = torch.as_tensor(data.elements[:n], dtype=torch.long, device=device)
    fr = torch.as_tensor(data.fractions[:n], dtype=torch.float32, device=device)
    keep = el > 0  # (B, E)
    per_layer, scale = [], 0.0
    with torch.no_grad(), torch.autocast(device.type, enabled=False):
        out = model.forward_internals(el, fr, attention=True, hidden=True)
        for i, layer in enumerate(model.layers):
            x = out.hidden[i]  # (B, E, D)
            B, E, _ = x.shape
            q, k, v = layer.self_attn.qkv(x).view(B, E, 3, model.cfg.n_heads, -1).permute(2, 0, 3, 1, 4)
            sdpa = attend(q, k, v, keep[:, None, None, :], 0.0, fused=True)  # (B, H, E, Dh)
            captured = out.attention[:, i] @ v  # (B, H, E, Dh)
            rows = keep[:, None, :, None].expand_as(sdpa)
            per_layer.append(float((captured - sdpa)[rows].abs().max()))
            scale = max(scale, float(sdpa[rows].abs().max()))
        weights = out.attention[keep[:, None, None, :, None].expand_as(out.attention)]  # rows of real queries
    return {
        "compounds": len(el),
        "max_abs_diff": max(per_layer),
        "per_layer": per_layer,
        "max_abs_output": scale,
        "max_weight": float(weights.max()),
        "kernel": "scaled_dot_product_attention vs attention_weights() @ V",
    }


def write_quick_data(src: Path, dataset: str, dst: Path) -> None:
    """The first rows of each split of ``src``'s dataset as CSVs under ``dst``/benchmark_data/."""
    folder = dst / "benchmark_data" / dataset
    folder.mkdir(parents=True, exist_ok=True)
    for split, rows in QUICK_ROWS.items():
        lines = (src / "benchmark_data" / dataset / f"{split}.csv").read_text().splitlines()
        (folder / f"{split}.csv").write_text("\n".join(lines[: rows + 1]) + "\n")


def step1(data_dir: Path, dataset: str, device: torch.device, quick: bool, workdir: Path, timeout: int) -> dict:
    """``get_training_attention.py`` into a scratch data dir; wall time and the saved model's MAEs."""
    scratch = workdir / "step1"
    scratch.mkdir()
    (scratch / "benchmark_data").symlink_to((data_dir / "benchmark_data").resolve(), target_is_directory=True)
    cmd = [
        sys.executable,
        str(ROOT / "get_training_attention.py"),
        "--data-dir",
        str(scratch),
        "--dataset",
        dataset,
        "--device",
        device.type,
    ]
    if quick:
        cmd += ["--epochs", "2", "--batch-size", "128"]
    env = dict(os.environ)
    if device.type == "cuda" and device.index is not None:  # the script takes "cuda": show it only this GPU
        visible = [v for v in env.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
        env["CUDA_VISIBLE_DEVICES"] = visible[device.index] if visible else str(device.index)
    log = workdir / "step1.log"
    t0 = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.run(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, timeout=timeout, env=env, check=False)
    wall = time.perf_counter() - t0
    out = {
        "command": " ".join(["get_training_attention.py", *cmd[2:]]),
        "returncode": proc.returncode,
        "wall_seconds": round(wall, 1),
        "epochs_requested": 2 if quick else 50,
    }
    if proc.returncode:
        out["error"] = f"get_training_attention.py exited {proc.returncode}"
        out["log_tail"] = log.read_text()[-4000:]
        return out
    model, scaler, meta = load_checkpoint(checkpoint_path(scratch, dataset, "mat2vec", "immi"), device)
    val = load_dataset(scratch, dataset, splits=("val",), verbose=False)["val"]
    pred, _ = predict(model, val, scaler)
    store = scratch / "attention" / dataset / "attention.zarr"
    out.update(
        epochs_run=meta.get("epochs_run"),
        stopped_early=meta.get("stopped_early"),
        train_seconds=meta.get("train_seconds"),
        precision=meta.get("precision"),
        val_mae=mae(pred, val.target),
        test_mae=meta.get("test_mae"),
        final_weights=meta.get("final_weights"),
        store_mb=round(sum(p.stat().st_size for p in store.rglob("*") if p.is_file()) / 2**20, 1),
    )
    return out


def peer(data_dir: Path, device: torch.device, timeout: int) -> dict:
    """``benchmarks/peer.py --device cuda --json`` (20 epochs, fp32 and bf16); skipped with a note if it cannot run."""
    cmd = [
        sys.executable,
        str(ROOT / "benchmarks" / "peer.py"),
        "--device",
        str(device),
        "--epochs",
        "20",
        "--precision",
        "fp32,bf16",
        "--json",
        "--data-dir",
        str(data_dir),
    ]
    env = {**os.environ}
    env.setdefault("PIP_DEFAULT_TIMEOUT", "15")  # creating the peer's virtualenv without network fails fast
    env.setdefault("PIP_RETRIES", "1")
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env, check=False)
    except subprocess.TimeoutExpired:
        return {"skipped": f"benchmarks/peer.py took more than {timeout} s (--peer-timeout)"}
    line = next((s for s in reversed(proc.stdout.splitlines()) if s.startswith("{")), None)
    if proc.returncode or line is None:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or [""]
        return {
            "skipped": f"benchmarks/peer.py exited {proc.returncode} (the crabnet 2.0.8 package did not install "
            f"or run): {tail[0][:300]}",
            "seconds": round(time.perf_counter() - t0, 1),
        }
    figures = json.loads(line)
    ours = {r["precision"]: r for r in figures["runs"] if r["side"] == "ours"}
    return {
        "ours_s_per_epoch": {p: r["s_per_epoch"] for p, r in ours.items()},
        "peer_s_per_epoch": figures["peer_s_per_epoch"],
        "ratio": {p: r["ratio"] for p, r in ours.items()},
        "ours_test_mae": {p: r["test_mae"] for p, r in ours.items()},
        "peer_test_mae": figures["peer_test_mae"],
        "dataset": figures["dataset"],
        "epochs": figures["epochs"],
        "seconds": round(time.perf_counter() - t0, 1),
    }


def _part(results: dict, name: str, fn: Callable, *args) -> object:
    """Run one part; its figures (or its error) go to ``results[name]``. Returns what ``fn`` returned."""
    t0 = time.perf_counter()
    print(f"gpu_check: {name} ...", file=sys.stderr, flush=True)
    try:
        with contextlib.redirect_stdout(sys.stderr):  # progress of the parts on stderr, the table alone on stdout
            value = fn(*args)
    except Exception as err:
        results[name] = {"error": f"{type(err).__name__}: {err}", "seconds": round(time.perf_counter() - t0, 1)}
        return None
    figures = value[0] if isinstance(value, tuple) else value
    results[name] = {**figures, "part_seconds": round(time.perf_counter() - t0, 1)}
    return value


def table(r: dict) -> str:
    """The short summary printed at the end."""

    def get(part: str) -> dict:
        return r.get(part) or {}

    lines = []
    d = get("device")
    cap = f"sm {d['capability'][0]}.{d['capability'][1]}" if d.get("capability") else "CPU"
    lines.append(
        f"{'device':26s} {d.get('name')} ({cap}), torch {d.get('torch')}, CUDA {d.get('cuda_runtime')}; "
        f"--precision auto -> {d.get('auto_precision')}"
    )
    for name, part in (
        ("tests (pytest -m cuda)", "tests"),
        ("fused Lamb probe", "fused_lamb"),
        ("attention vs SDPA", "attention"),
        ("resume", "resume"),
        ("step 1", "step1"),
        ("peer (crabnet 2.0.8)", "peer"),
    ):
        p = get(part)
        if p.get("error"):
            text = f"ERROR {p['error']}"
        elif isinstance(p.get("skipped"), str):
            text = f"skipped: {p['skipped']}"
        elif not p:
            text = "not run"
        elif part == "tests":
            text = (
                f"{p['passed']} passed, {p['failed']} failed, {p['skipped']} skipped, {p['errors']} errors "
                f"({p['seconds']} s)"
            )
        elif part == "fused_lamb":
            diff = p["max_abs_diff"]
            text = ("ok" if p["ok"] else "FAILED: Lamb uses the foreach path") + (
                f", max |fused - foreach| {diff:.2g}" if diff is not None else f" ({p['error']})"
            )
        elif part == "attention":
            text = (
                f"max |W @ V - SDPA| {p['max_abs_diff']:.2g} (outputs up to {p['max_abs_output']:.3g}), "
                f"{p['compounds']} compounds, fp32"
            )
        elif part == "resume":
            text = (
                f"{p['epochs']} epochs at {p['precision']}: resumed vs uninterrupted max |dw| "
                f"{p['max_abs_diff_resumed']:.3g}{' (bit for bit)' if p['bit_for_bit'] else ''}; "
                f"a second run {p['max_abs_diff_rerun']:.3g}"
            )
        elif part == "step1":
            text = (
                f"{p['wall_seconds']} s wall, {p['epochs_run']} epochs ({p['precision']}), "
                f"val MAE {p['val_mae']:.4g}, test MAE {p['test_mae']:.4g}"
            )
        else:
            ratio = ", ".join(f"{k} {v:.2f}" for k, v in p["ratio"].items())
            text = f"s/epoch ours/peer {ratio} (peer {p['peer_s_per_epoch']:.2f} s/epoch, {p['dataset']})"
        lines.append(f"{name:26s} {text}")
    t = get("throughput")
    for prec in ("fp32", "bf16"):
        row = t.get(prec)
        if row:
            mem = (
                f"peak {row['max_memory_allocated_mb']:.0f} MB allocated"
                if "max_memory_allocated_mb" in row
                else f"peak RSS {row['peak_rss_mb']:.0f} MB"
            )
            lines.append(
                f"{'throughput ' + prec:26s} {row['samples_per_s']:.0f} samples/s (batch {t['batch_size']}), "
                f"{row['share_of_matmul_peak']:.1%} of a {row['matmul_peak_tflops']:.3g} TFLOP/s {prec} "
                f"matmul, {mem}"
            )
    if t.get("error"):
        lines.append(f"{'throughput':26s} ERROR {t['error']}")
    return "\n".join(lines)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu (default: %(default)s)")
    p.add_argument("--quick", action="store_true", help="tiny sizes (a few hundred rows, 2 epochs): a CPU smoke run")
    p.add_argument("--data-dir", type=Path, default=Path("data"), help="inputs, and the JSON (default: %(default)s)")
    p.add_argument("--dataset", default=DATASET, help="default: %(default)s")
    p.add_argument("--out", type=Path, default=None, help="JSON file (default: <data-dir>/benchmarks/gpu_check.json)")
    p.add_argument("--steps", type=int, default=0, help="timed training steps per precision (0: 20, --quick 3)")
    p.add_argument("--resume-epochs", type=int, default=0, help="N of the resume check (0: 4, --quick 2)")
    p.add_argument("--seed", type=int, default=0, help="default: %(default)s")
    p.add_argument("--skip-tests", action="store_true", help="do not run the tests marked cuda")
    p.add_argument("--skip-step1", action="store_true", help="do not run get_training_attention.py")
    p.add_argument("--skip-peer", action="store_true", help="do not run benchmarks/peer.py")
    p.add_argument(
        "--peer-timeout",
        type=int,
        default=240,
        help="seconds for benchmarks/peer.py, its virtualenv included (default: %(default)s)",
    )
    return p.parse_args()


def main(
    device: str,
    quick: bool,
    data_dir: Path,
    dataset: str,
    out: Path | None,
    steps: int,
    resume_epochs: int,
    seed: int,
    skip_tests: bool,
    skip_step1: bool,
    skip_peer: bool,
    peer_timeout: int,
) -> int:
    if device.startswith("cuda") and not torch.cuda.is_available():
        print(
            f"error: --device {device} needs a CUDA GPU, and PyTorch {torch.__version__} sees none "
            f"(built with CUDA: {torch.version.cuda or 'no'}); --device cpu --quick runs the CPU smoke check",
            file=sys.stderr,
        )
        return 2
    if device != "cpu" and not device.startswith("cuda"):
        print(f"error: --device must be cuda, cuda:N or cpu, got {device!r}", file=sys.stderr)
        return 2
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is not None:
        torch.cuda.set_device(dev)
    dataset_dir(data_dir, dataset)  # fetched on first need, as the scripts do (offline: one clear error)
    out = out or data_dir / "benchmarks" / "gpu_check.json"
    steps = steps or (3 if quick else 20)
    resume_epochs = resume_epochs or (2 if quick else 4)
    t_start = time.perf_counter()
    results: dict = {
        "schema": 1,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "quick": quick,
        "dataset": dataset,
        "command": " ".join(["benchmarks/gpu_check.py", *sys.argv[1:]]),
    }
    _part(results, "device", device_info, dev)
    if skip_tests:
        results["tests"] = {"skipped": "--skip-tests"}
    else:
        _part(results, "tests", run_cuda_tests, 900)
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        work = Path(tmp)
        source = data_dir
        if quick:
            write_quick_data(data_dir, dataset, work / "data")
            source = work / "data"
        splits = load_dataset(source, dataset, verbose=False)
        train = splits["train"]
        bs = 128 if quick else batch_size_for(getattr(train, "n_csv_rows", len(train)))  # the recipe's
        model_cfg = QUICK_MODEL if quick else {}
        _part(results, "throughput", throughput, train, dev, steps, 512 if quick else 8192, bs, model_cfg)
        _part(results, "fused_lamb", fused_adam_probe, dev)
        trained = _part(results, "resume", resume_check, splits, dev, resume_epochs, seed, work, model_cfg)
        if trained is not None:
            _part(results, "attention", attention_check, trained[1], splits["val"], dev, 512)
        else:
            results["attention"] = {"error": "no trained model (the resume check failed)"}
        if skip_step1:
            results["step1"] = {"skipped": "--skip-step1"}
        else:
            _part(results, "step1", step1, source, dataset, dev, quick, work, 3600)
    if quick or skip_peer:
        results["peer"] = {"skipped": "--quick" if quick else "--skip-peer"}
    else:
        _part(results, "peer", peer, data_dir, dev, peer_timeout)
    results["seconds"] = round(time.perf_counter() - t_start, 1)
    failed = sorted(
        k
        for k, v in results.items()
        if isinstance(v, dict) and (v.get("error") or v.get("failed") or v.get("ok") is False)
    )
    results["failed_parts"] = failed
    with atomic_path(out) as tmp_out:
        tmp_out.write_text(json.dumps(results, indent=1) + "\n")
    print(table(results))
    print(f"{'':26s} {results['seconds']} s in all -> {out}" + (f"; FAILED: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    try:
        raise SystemExit(main(**vars(parse_args())))
    except DataError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
