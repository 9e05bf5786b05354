"""Arrow routing: lorafit.arrow_routing against PEFT's create_arrow_model, on a forward pass.

SmolLM2-135M-Instruct (float32), 8 expert adapters (random, r=16 on every linear layer), top 3 of them per
token, batch 4 x 256; inference mode. Time: interleaved rounds, medians and ratios to the base model. Memory:
the peak resident memory of a few forwards above the memory before them, each variant in a fresh process
(``python -m benchmarks.arrow VARIANT``). PEFT mixes the experts with einsums that hold tokens x experts x
d_out per layer; lorafit stacks the experts' factors and mixes in the rank dimension. ``--quick``: a tiny
random Llama.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

import lorafit
from benchmarks import models
from benchmarks.memory_probe import _status_kb, reset_peak
from benchmarks.timing import interleaved, median, ratio, table

EXPERTS = 8
TOP_K = 3
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
VARIANTS = ("base model", "lorafit, 1 adapter (unmerged)", "lorafit arrow_routing", "PEFT create_arrow_model")


def _shape(quick: bool) -> tuple[int, int]:
    return (2, 16) if quick else (4, 256)


def _experts(root: Path, quick: bool) -> list[Path]:
    """EXPERTS random adapters of the model, saved under root."""
    dirs = []
    for i in range(EXPERTS):
        model = lorafit.attach(models.smollm2(quick), lorafit.LoraConfig(r=16, lora_alpha=32, target_modules=TARGETS,
                                                                         init_lora_weights=False))
        torch.manual_seed(1000 + i)
        with torch.no_grad():
            for p in lorafit.adapter_parameters(model, "default").values():
                p.normal_(0, 0.02)
        dirs.append(lorafit.save_adapter(model, root / f"expert{i}"))
    return dirs


def _make(variant: str, dirs: list[Path], quick: bool):
    """(the model, a function running one forward on it)."""
    batch, seq = _shape(quick)
    base = models.smollm2(quick).eval()
    ids = torch.randint(0, base.config.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(0))
    names = [f"expert{i}" for i in range(EXPERTS)]
    if variant == "PEFT create_arrow_model":
        from peft.tuners.lora import ArrowConfig, create_arrow_model

        model = create_arrow_model(base, [str(d) for d in dirs], ArrowConfig(top_k=TOP_K, rng_seed=0)).eval()

        def run():
            with torch.inference_mode():
                model(input_ids=ids)
        return model, run
    model = base
    if variant != "base model":
        for name, path in zip(names, dirs):
            lorafit.load_adapter(model, path, name)
    if variant == "lorafit arrow_routing":
        def run():
            with torch.inference_mode(), lorafit.arrow_routing(model, names, top_k=TOP_K):
                model(input_ids=ids)
    else:
        if variant != "base model":
            lorafit.set_active(model, names[:1])

        def run():
            with torch.inference_mode():
                model(input_ids=ids)
    return model, run


def run(args, print_fn) -> dict:
    batch, seq = _shape(args.quick)
    with tempfile.TemporaryDirectory() as tmp:
        dirs = _experts(Path(tmp), args.quick)
        runs = {v: _make(v, dirs, args.quick)[1] for v in VARIANTS}
        times = interleaved(runs, reps=args.reps, warmup=1)
        del runs
        peaks = {}
        for variant in VARIANTS:
            cmd = [sys.executable, "-m", "benchmarks.arrow", variant, tmp] + (["--quick"] if args.quick else [])
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
            if proc.returncode != 0:
                raise SystemExit(f"benchmarks.arrow {variant} failed:\n{proc.stderr[-3000:]}")
            peaks[variant] = json.loads(proc.stdout.strip().splitlines()[-1])["forward_peak_mb"]
    rows = [[v, f"{1000 * median(times[v]):.1f}", f"{ratio(times, v, 'base model'):.3f}", f"{peaks[v]:.0f}"]
            for v in VARIANTS]
    what = "a tiny random Llama" if args.quick else "SmolLM2-135M"
    print_fn(f"Arrow routing: {what}, {EXPERTS} experts (r=16, every linear layer), top {TOP_K} per token, batch "
             f"{batch} x {seq}, inference, {args.reps} interleaved rounds",
             table(rows, ["variant", "median ms", "x base", "forward peak MB (above the model)"]))
    arrow = "lorafit arrow_routing"
    print_fn("Arrow routing, lorafit against PEFT", f"time {ratio(times, arrow, 'PEFT create_arrow_model'):.3f}x, "
             f"forward peak memory {peaks[arrow]:.0f} / {peaks['PEFT create_arrow_model']:.0f} MB")
    return {"median_s": {v: median(t) for v, t in times.items()},
            "x_base": {v: ratio(times, v, "base model") for v in VARIANTS}, "forward_peak_mb": peaks}


def probe() -> None:
    """One variant's forward peak in this fresh process: argv VARIANT DIR [--quick]."""
    variant, root, quick = sys.argv[1], Path(sys.argv[2]), "--quick" in sys.argv
    _, forward = _make(variant, [root / f"expert{i}" for i in range(EXPERTS)], quick)
    forward()  # warm-up: Arrow's stacks and the allocator's pools exist
    before = _status_kb("VmRSS")
    exact = reset_peak()
    for _ in range(3):
        forward()
    peak = _status_kb("VmHWM") if exact else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"forward_peak_mb": (peak - before) / 1024, "peak_reset": exact}))


if __name__ == "__main__":
    probe()
