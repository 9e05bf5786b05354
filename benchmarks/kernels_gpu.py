"""Per-layer LoRA linear cost on a GPU at Llama-3.2-1B's shapes: forward + backward of one adapted linear
against the frozen-base floor and PEFT's formula, and each skinny product alone (cuBLAS vs Triton).

    python -m benchmarks.kernels_gpu [--out DIR] [--rows 8192]

Times are medians of CUDA-event timings (triton.testing.do_bench); what LoRA adds to a step is the
difference to the floor, summed over a model's layers.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from torch import nn

import lorafit
from lorafit.kernels import mask, triton_kernels

SHAPES = {"q/o 2048->2048": (2048, 2048), "k/v 2048->512": (2048, 512), "gate/up 2048->8192": (2048, 8192),
          "down 8192->2048": (8192, 2048)}


def _bench(fn) -> float:
    from triton.testing import do_bench

    return do_bench(fn, warmup=25, rep=100, return_mode="median")


def _host_us(fn, calls: int = 40) -> float:
    """Microseconds the host takes to issue one call (no synchronisation inside the timed loop): where
    this exceeds the GPU time, the step is bound by Python and kernel launches, not by the GPU."""
    import time

    fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    elapsed = time.perf_counter() - start
    torch.cuda.synchronize()
    return elapsed / calls * 1e6


def _layer_step(module: nn.Module, x: torch.Tensor, g: torch.Tensor):
    def step():
        xi = x.detach().requires_grad_(True)
        module(xi).backward(g)
    return step


class _PeftStyle(nn.Module):
    """PEFT's LoRA forward: base(x) + lora_B(lora_A(dropout(x))) * scaling, with plain modules."""

    def __init__(self, base: nn.Linear, r: int, p: float):
        super().__init__()
        self.base, self.drop = base, nn.Dropout(p)
        self.lora_A = nn.Linear(base.in_features, r, bias=False, device=base.weight.device, dtype=base.weight.dtype)
        self.lora_B = nn.Linear(r, base.out_features, bias=False, device=base.weight.device, dtype=base.weight.dtype)
        nn.init.normal_(self.lora_B.weight, std=0.01)

    def forward(self, x):
        return self.base(x) + self.lora_B(self.lora_A(self.drop(x))) * 2.0


def run(rows: int, r: int = 16, dtype=torch.bfloat16) -> list[dict]:
    results = []
    for label, (d_in, d_out) in SHAPES.items():
        torch.manual_seed(0)
        base = nn.Linear(d_in, d_out, bias=False, device="cuda", dtype=dtype).requires_grad_(False)
        x = torch.randn(rows, d_in, device="cuda", dtype=dtype)
        g = torch.randn(rows, d_out, device="cuda", dtype=dtype)
        row = {"shape": label, "rows": rows}
        row["floor"] = _bench(_layer_step(base, x, g))
        row["floor host us"] = _host_us(_layer_step(base, x, g))
        for p in (0.0, 0.05):
            model = nn.Sequential(base)
            lorafit.attach(model, lorafit.LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=p, target_modules=["0"]))
            model.train()
            row[f"lorafit p={p}"] = _bench(_layer_step(model, x, g))
            row[f"lorafit p={p} host us"] = _host_us(_layer_step(model, x, g))
            lorafit.detach(model, "default")
            peft_style = _PeftStyle(base, r, p).train()
            row[f"peft-style p={p}"] = _bench(_layer_step(peft_style, x, g))
            row[f"peft-style p={p} host us"] = _host_us(_layer_step(peft_style, x, g))
        a = torch.randn(r, d_in, device="cuda", dtype=dtype)
        gh = torch.randn(rows, r, device="cuda", dtype=dtype)
        key = mask.new_key(x.device)
        t, _ = mask.threshold(0.05)
        row["down cuBLAS"] = _bench(lambda: x @ a.T)
        row["down triton"] = _bench(lambda: triton_kernels.down(x, a))
        row["down triton masked"] = _bench(lambda: triton_kernels.down(x, a, key, t))
        row["down triton masked bk=64"] = _bench(lambda: triton_kernels.down(x, a, key, t, bk=64))
        row["down triton masked bk=128"] = _bench(lambda: triton_kernels.down(x, a, key, t, bk=128))
        row["grad_a cuBLAS"] = _bench(lambda: gh.T @ x)
        row["grad_a triton masked"] = _bench(lambda: triton_kernels.grad_a(gh, x, key, t))
        row["grad_a triton masked bm=64"] = _bench(lambda: triton_kernels.grad_a(gh, x, key, t, bm=64))
        gx = torch.randn(rows, d_in, device="cuda", dtype=dtype)
        row["up-add cuBLAS"] = _bench(lambda: gx.addmm_(gh, a))
        row["up-add triton masked"] = _bench(lambda: triton_kernels.up(gh, a, 1.0, gx, None, key, t))
        row["mask_scale triton"] = _bench(lambda: triton_kernels.mask_scale(x, key, t, 1.05))
        row["copy x (bandwidth ref)"] = _bench(lambda: x.clone())
        results.append(row)
    return results


def profile_layer(rows: int, p: float, r: int = 16) -> str:
    """torch.profiler's table for ten forward + backward passes of one adapted 2048 x 2048 layer."""
    from torch.profiler import ProfilerActivity, profile

    base = nn.Linear(2048, 2048, bias=False, device="cuda", dtype=torch.bfloat16).requires_grad_(False)
    model = nn.Sequential(base)
    lorafit.attach(model, lorafit.LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=p, target_modules=["0"]))
    x = torch.randn(rows, 2048, device="cuda", dtype=torch.bfloat16)
    step = _layer_step(model.train(), x, torch.randn_like(x))
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(10):
            step()
        torch.cuda.synchronize()
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=14, max_name_column_width=40)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="gpu_results")
    parser.add_argument("--rows", type=int, default=8192)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("kernels_gpu needs a CUDA GPU")
    results = run(args.rows)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    for p in (0.0, 0.05):
        table = profile_layer(args.rows, p)
        print(f"\n## profile of one adapted layer, p={p} (10 steps)\n" + table)
    (Path(args.out) / "kernels_gpu.json").write_text(json.dumps(results, indent=1))
    keys = [k for k in results[0] if k not in ("shape", "rows")]
    print("\n## per-layer LoRA cost, ms (median), bf16, r=16, rows", args.rows)
    print("| | " + " | ".join(r["shape"] for r in results) + " |")
    print("|---|" + "---:|" * len(results))
    for k in keys:
        print(f"| {k} | " + " | ".join(f"{r[k]:.3f}" for r in results) + " |")


if __name__ == "__main__":
    main()
