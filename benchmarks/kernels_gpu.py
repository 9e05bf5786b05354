"""Per-layer LoRA linear cost on a GPU at Llama-3.2-1B's shapes: forward + backward of one adapted linear
against the frozen-base floor and PEFT's formula, and each skinny product alone (cuBLAS vs Triton); the
same step on an NF4 base (QLoRA) and its dequantization (torch ops vs Triton).

    python -m benchmarks.kernels_gpu [--out DIR] [--rows 8192] [--quick]

Times are medians of CUDA-event timings (triton.testing.do_bench); what LoRA adds to a step is the
difference to the floor, summed over a model's layers. ``--quick``: a dry run of every code path with 64 rows,
on the CPU where there is no GPU (the Triton rows then run only under TRITON_INTERPRET=1); its numbers mean
nothing.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import os

if __name__ == "__main__":
    # the kernels' steady state: each compiles in this process on its first call, not in the warm-up helper
    # (only when run: benchmarks.gpu imports this file, and its `lorafit train` runs inherit its environment)
    os.environ.setdefault("LORAFIT_TRITON_WARMUP", "0")

import torch  # noqa: E402
from torch import nn  # noqa: E402

import lorafit  # noqa: E402
from lorafit.kernels import mask, triton_kernels  # noqa: E402

SHAPES = {"q/o 2048->2048": (2048, 2048), "k/v 2048->512": (2048, 512), "gate/up 2048->8192": (2048, 8192),
          "down 8192->2048": (8192, 2048)}
# how many of each shape one decoder layer adapts, and the layers of Llama-3.2-1B
PER_LAYER = {"q/o 2048->2048": 2, "k/v 2048->512": 2, "gate/up 2048->8192": 2, "down 8192->2048": 1}
LAYERS = 16
# the products a LoRA step adds to the floor's (base GEMMs) when it is composed of dense products, each
# alone: forward H = x A^T, then H B^T written and the base GEMM adding into it (its extra cost: into a sum
# minus alone); backward G = dY B, dB = dY^T H, dA = G^T x, and dx's low-rank write and sum the same way
ADDED_PRODUCTS = ("down cuBLAS", "forward low-rank write", "forward: into a sum, extra", "up-grad cuBLAS",
                  "grad_b cuBLAS", "grad_a cuBLAS", "dx low-rank write", "dx: into a sum, extra")


DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _bench(fn) -> float:
    if DEVICE != "cuda":  # a dry run
        import time

        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e3
    from triton.testing import do_bench

    return do_bench(fn, warmup=25, rep=100, return_mode="median")


def _sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def _host_us(fn, calls: int = 40) -> float:
    """Microseconds the host takes to issue one call (no synchronisation inside the timed loop): where
    this exceeds the GPU time, the step is bound by Python and kernel launches, not by the GPU."""
    import time

    fn()
    _sync()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    elapsed = time.perf_counter() - start
    _sync()
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


def run(rows: int, r: int = 16, dtype=torch.bfloat16, shapes: dict = SHAPES) -> list[dict]:
    results = []
    triton = triton_kernels.available(torch.device(DEVICE))
    for label, (d_in, d_out) in shapes.items():
        torch.manual_seed(0)
        base = nn.Linear(d_in, d_out, bias=False, device=DEVICE, dtype=dtype).requires_grad_(False)
        x = torch.randn(rows, d_in, device=DEVICE, dtype=dtype)
        g = torch.randn(rows, d_out, device=DEVICE, dtype=dtype)
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
        a = torch.randn(r, d_in, device=DEVICE, dtype=dtype)
        gh = torch.randn(rows, r, device=DEVICE, dtype=dtype)
        key = mask.new_key(x.device)
        t, _ = mask.threshold(0.05)
        row["down cuBLAS"] = _bench(lambda: x @ a.T)
        row["grad_a cuBLAS"] = _bench(lambda: gh.T @ x)
        gx = torch.randn(rows, d_in, device=DEVICE, dtype=dtype)
        row["up-add cuBLAS"] = _bench(lambda: gx.addmm_(gh, a))
        b = torch.randn(d_out, r, device=DEVICE, dtype=dtype)
        h = torch.randn(rows, r, device=DEVICE, dtype=dtype)
        row["up-grad cuBLAS"] = _bench(lambda: g @ b)
        row["grad_b cuBLAS"] = _bench(lambda: g.T @ h)
        _order_rows(row, x, g, base.weight, a, b, gh)
        row["products LoRA adds, cuBLAS, each alone"] = sum(row[k] for k in ADDED_PRODUCTS)
        row["copy x (bandwidth ref)"] = _bench(lambda: x.clone())
        _qlora_rows(row, base, x, g, r)
        if triton:
            _triton_rows(row, x, a, gh, gx, key, t)
        results.append(row)
    return results


def _qlora_rows(row: dict, base: nn.Linear, x, g, r: int) -> None:
    """QLoRA: the layer's step on an NF4 base (dequantized in forward and again in backward), and one
    dequantization through torch ops and through the Triton kernel."""
    from lorafit.kernels import dequantize
    from lorafit.quantize import QuantizedLinear

    quantized = QuantizedLinear(base, bits=4)
    model = nn.Sequential(quantized)
    lorafit.attach(model, lorafit.LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.05, target_modules=["0"]))
    model.train()
    row["QLoRA nf4 p=0.05"] = _bench(_layer_step(model, x, g))
    codes, absmax, shape = quantized.codes, quantized.block_absmax(), quantized.shape
    row["nf4 dequantize: torch ops"] = _bench(
        lambda: dequantize.with_torch_ops(codes, absmax, True, quantized.block_size, shape, x.dtype))
    if triton_kernels.available(x.device):
        levels = dequantize.nf4_levels(x.device)
        row["nf4 dequantize: triton"] = _bench(
            lambda: triton_kernels.dequantize(codes, absmax, levels, quantized.block_size, shape, x.dtype))


def _triton_rows(row: dict, x, a, gh, gx, key, t) -> None:
    """Each Triton product alone, masked and not, at the tile sizes worth comparing."""
    row["down triton"] = _bench(lambda: triton_kernels.down(x, a))
    row["down triton masked"] = _bench(lambda: triton_kernels.down(x, a, key, t))
    row["down triton masked bk=64"] = _bench(lambda: triton_kernels.down(x, a, key, t, bk=64))
    row["down triton masked bk=128"] = _bench(lambda: triton_kernels.down(x, a, key, t, bk=128))
    row["grad_a triton masked"] = _bench(lambda: triton_kernels.grad_a(gh, x, key, t))
    row["grad_a triton masked bm=64"] = _bench(lambda: triton_kernels.grad_a(gh, x, key, t, bm=64))
    row["up-add triton masked"] = _bench(lambda: triton_kernels.up(gh, a, 1.0, gx, None, key, t))
    row["up-write triton masked"] = _bench(lambda: triton_kernels.up(gh, a, 1.0, None, None, key, t))
    row["grad_a + up-write triton masked, one kernel"] = _bench(
        lambda: triton_kernels.grad_a_and_up(gh, x, a, key, t, 1.0, 1.0))
    row["grad_a + up-write triton masked, one kernel, host us"] = _host_us(
        lambda: triton_kernels.grad_a_and_up(gh, x, a, key, t, 1.0, 1.0))
    row["grad_a, then up-write, host us"] = _host_us(
        lambda: (triton_kernels.grad_a(gh, x, key, t), triton_kernels.up(gh, a, 1.0, None, None, key, t)))
    row["mask_scale triton"] = _bench(lambda: triton_kernels.mask_scale(x, key, t, 1.05))
    # where a masked layer's host time goes: a cuBLAS call, a mask key, lorafit's launcher, Triton's JIT dispatch
    from lorafit.kernels import triton_jit

    h = torch.empty(x.shape[0], a.shape[0], dtype=a.dtype, device=x.device)
    m, k, r = x.shape[0], x.shape[1], a.shape[0]
    bm, bk = (64 if m >= 64 * 132 else 32), (128 if x.element_size() > 2 else 256)
    jit = triton_jit._down_kernel[(-(-m // bm),)]
    row["x A^T cuBLAS, host us"] = _host_us(lambda: x @ a.T)
    row["new mask key, host us"] = _host_us(lambda: mask.new_key(x.device))
    row["down triton masked, launcher, host us"] = _host_us(lambda: triton_kernels.down(x, a, key, t))
    args = (x, a, h, key, t, m, k, r, x.stride(0), a.stride(0))
    constexprs = dict(MASKED=True, PRECISION="tf32", BM=bm, BK=bk, BR=16)
    row["down triton masked, through Triton's JIT, host us"] = _host_us(lambda: jit(*args, **constexprs))
    # the compiled kernel called directly, without JITFunction.run's binding and cache lookup, as the launcher
    # does from a variant's second launch on (the runner takes every parameter, constexprs included)
    try:
        runner = jit(*args, **constexprs)[(-(-m // bm), 1, 1)]
        row["down triton masked, compiled kernel's runner, host us"] = _host_us(
            lambda: runner(*args, *constexprs.values()))
    except Exception as err:  # noqa: BLE001 - a Triton whose compiled kernels take other arguments: no row
        print(f"compiled kernel's runner: {type(err).__name__}: {err}")
        row["down triton masked, compiled kernel's runner, host us"] = float("nan")


def _order_rows(row: dict, x, g, w, a, b, gh) -> None:
    """The two orders of a pass's base and low-rank products, each product alone. Base first: y = x W^T, then
    y += s H B^T reads and writes y again. Low-rank first (what lorafit runs): z = H B^T is written, then
    cuBLAS adds x W^T into it with beta = s, reading z in the GEMM's epilogue. The same for dx = dY W + s G A."""
    h = torch.randn(x.shape[0], b.shape[1], device=x.device, dtype=x.dtype)
    y, gx = torch.empty_like(g), torch.empty_like(x)
    passes = {"forward": (x, w.T, h, b.T, y), "dx": (g, w, gh, a, gx)}
    for name, (p, q, low, m, out) in passes.items():
        row[f"{name} base GEMM"] = _bench(lambda: torch.mm(p, q))
        row[f"{name} base GEMM into a sum (beta=2)"] = _bench(lambda: out.addmm_(p, q, beta=2.0))
        row[f"{name} low-rank write"] = _bench(lambda: torch.mm(low, m))
        row[f"{name} low-rank add (alpha=2)"] = _bench(lambda: out.addmm_(low, m, alpha=2.0))
        row[f"{name}: base first"] = row[f"{name} base GEMM"] + row[f"{name} low-rank add (alpha=2)"]
        row[f"{name}: low-rank first"] = row[f"{name} low-rank write"] + row[f"{name} base GEMM into a sum (beta=2)"]
        row[f"{name}: into a sum, extra"] = row[f"{name} base GEMM into a sum (beta=2)"] - row[f"{name} base GEMM"]


def profile_layer(rows: int, p: float, r: int = 16) -> str:
    """torch.profiler's table for ten forward + backward passes of one adapted 2048 x 2048 layer."""
    from torch.profiler import ProfilerActivity, profile

    base = nn.Linear(2048, 2048, bias=False, device=DEVICE, dtype=torch.bfloat16).requires_grad_(False)
    model = nn.Sequential(base)
    lorafit.attach(model, lorafit.LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=p, target_modules=["0"]))
    x = torch.randn(rows, 2048, device=DEVICE, dtype=torch.bfloat16)
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
    parser.add_argument("--quick", action="store_true", help="a dry run: 64 rows, small layers, any device")
    args = parser.parse_args()
    if args.quick:
        args.rows = 64
        results = run(args.rows, shapes={"64->96": (64, 96), "96->32": (96, 32)})
    elif DEVICE != "cuda":
        raise SystemExit("kernels_gpu needs a CUDA GPU (--quick: a dry run on the CPU)")
    else:
        results = run(args.rows)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    for p in (0.0, 0.05) if DEVICE == "cuda" else ():
        table = profile_layer(args.rows, p)
        print(f"\n## profile of one adapted layer, p={p} (10 steps)\n" + table)
    (Path(args.out) / "kernels_gpu.json").write_text(json.dumps(results, indent=1))
    keys = [k for k in results[0] if k not in ("shape", "rows")]
    print("\n## per-layer LoRA cost, ms (median), bf16, r=16, rows", args.rows)
    print("| | " + " | ".join(r["shape"] for r in results) + " |")
    print("|---|" + "---:|" * len(results))
    for k in keys:
        print(f"| {k} | " + " | ".join(f"{r[k]:.3f}" for r in results) + " |")
    if not args.quick:
        print_model_sums(results)


def model_sums(results: list[dict]) -> dict:
    """Each column summed over the adapted layers of Llama-3.2-1B (PER_LAYER x LAYERS), in ms: what LoRA adds
    to a training step there is the difference to the floor's sum, without the rest of the step."""
    counts = {r["shape"]: PER_LAYER[r["shape"]] * LAYERS for r in results}
    return {k: sum(r[k] * counts[r["shape"]] for r in results)
            for k in ("floor", "lorafit p=0.0", "lorafit p=0.05", "peft-style p=0.0", "peft-style p=0.05",
                      "products LoRA adds, cuBLAS, each alone")}


def print_model_sums(results: list[dict]) -> None:
    sums = model_sums(results)
    print(f"\n## summed over Llama-3.2-1B's adapted layers ({LAYERS} x q, k, v, o, gate, up, down), ms")
    print(f"the adapted layers' floor: {sums['floor']:.1f}")
    for k in ("lorafit p=0.0", "lorafit p=0.05", "peft-style p=0.0", "peft-style p=0.05"):
        print(f"{k}: {sums[k]:.1f}, adds {sums[k] - sums['floor']:.1f}")
    print(f"the products a LoRA step adds, cuBLAS, each alone: {sums['products LoRA adds, cuBLAS, each alone']:.1f} "
          "(the least a LoRA built of dense products adds; each reads an activation-sized operand)")


if __name__ == "__main__":
    main()
