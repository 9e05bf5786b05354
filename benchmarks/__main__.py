"""Run the benchmark suite: ``python -m benchmarks`` (or ``make bench``).

    python -m benchmarks                 # everything on the real models (several minutes)
    python -m benchmarks --only train    # one part (see PARTS): train, memory, ..., loftq, arrow, dpo, reward
    python -m benchmarks --quick         # tiny random models, 2 reps: proves the suite runs (CI)

Every timing is interleaved (each round runs every variant once, in rotating
order) and reported as the median with ratios measured in the same run.
Results are printed as Markdown tables and written to ``--json``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

import torch

import lorafit
from benchmarks import models, train_step
from benchmarks.timing import interleaved, median, overs, ratio, ratios, spread, table
from lorafit.kernels import mask
from lorafit.kernels import products as lora_products
from lorafit.train import allocator

HASHED = ", hashed model dropout"  # the label of variants whose nn.Dropout modules are HashedDropout
BOUND = "floor + low-rank products alone"
PARTS = ("train", "amp", "host", "compile", "memory", "infer", "load", "smollm", "padding", "qlora", "mixed", "serve",
         "serve_generate", "ddp", "e2e", "adapter_dtype", "moe", "tokens", "optimizer", "inits", "loftq", "arrow",
         "dpo", "dpo_precomputed", "reward", "grpo")


def _variant_key(variant: str, dropout: float, model_dropout: str) -> str:
    """A training variant's row name; full fine-tuning and the floor have no LoRA dropout to name."""
    label = variant + (HASHED if model_dropout == "hashed" else "")
    return label if variant in ("full", "floor") else f"{label} (dropout {dropout})"


def bench_train(args, out: dict) -> None:
    batch, seq = (4, 16) if args.quick else (32, 64)
    base = models.bert_classifier(args.quick)
    # the opt-in train.model_dropout = "hashed" swaps the model's own dropout modules, in a floor of its own too
    specs = [("full", 0.1, "torch"), ("floor", 0.1, "torch"), ("peft", 0.1, "torch"), ("lorafit", 0.1, "torch"),
             ("peft", 0.0, "torch"), ("lorafit", 0.0, "torch"),
             ("floor", 0.1, "hashed"), ("lorafit", 0.1, "hashed"), ("lorafit", 0.0, "hashed"),
             ("lorafit-fa", 0.1, "torch")]
    steps, counts = {}, {}
    for v, dropout, model_dropout in specs:
        key = _variant_key(v, dropout, model_dropout)
        model = train_step.make_variant(base, v, dropout=dropout, model_dropout=model_dropout)
        steps[key] = train_step.stepper(model, train_step.make_batch(model, batch, seq))
        counts[key] = train_step.trainable_count(model)
    # What the low-rank path costs at the least: each adapter's skinny products in a step, through the
    # same ops as fused_linear and nothing else. Without dropout: H = x A^T, dY B, (dY B)^T x and H^T dY
    # (dx's low-rank part is folded into the base matmul at these shapes); dY B and H^T dY come from
    # one pass over dY. With dropout, the mask is applied inside H and (dY B)^T x, and the low-rank part
    # of dx is a masked product written in a pass of its own (that dY W then adds into).
    layers = [layer for _, layer in lorafit.model.lora_layers(train_step.make_variant(base, "lorafit", dropout=0.1))]
    t, _ = mask.threshold(0.1)
    operands = [(torch.randn(batch * seq, layer.in_features), torch.randn(8, layer.in_features),
                 torch.randn(layer.out_features, 8), torch.randn(batch * seq, layer.out_features)) for layer in layers]

    def products(dropout: bool) -> None:
        for x, a, b, gy in operands:
            key = mask.new_key(x.device) if dropout else None
            h = lora_products.down(x, a, key, t)
            gh, _ = lora_products.grad_b(gy, b, h)
            lora_products.grad_a(gh, x, key, t)
            if dropout:
                lora_products.up(gh, a.T, 1.0, None, None, x.dtype, key, t)

    steps["low-rank products alone"] = lambda: products(False)
    steps["low-rank products alone, dropout 0.1"] = lambda: products(True)
    times = interleaved(steps, reps=args.reps, warmup=1)
    counts["low-rank products alone"] = counts["low-rank products alone, dropout 0.1"] = 0
    # the least a LoRA step with these products can take: the floor plus the products, round by round
    for d, products in ((0.1, "low-rank products alone, dropout 0.1"), (0.0, "low-rank products alone")):
        key = f"{BOUND} (dropout {d})"
        times[key] = [f + p for f, p in zip(times["floor"], times[products], strict=True)]
        counts[key] = 0
    rows = []
    for key, ts in times.items():
        vs_peft = vs_floor = ""
        for d in (0.1, 0.0):
            if key.endswith(f"(dropout {d})"):
                vs_peft = spread(ratios(times, key, f"peft (dropout {d})")) \
                    if key.startswith(("lorafit", BOUND)) else "1.00"
        if key in ("floor", f"floor{HASHED}"):  # how far below PEFT any LoRA can go: with dropout 0.1 / without
            vs_peft = " / ".join(f"{ratio(times, key, f'peft (dropout {d})'):.2f}" for d in (0.1, 0.0))
        elif key != "full" and not key.startswith("low-rank"):
            floor = f"floor{HASHED}" if HASHED in key else "floor"
            vs_floor = spread(overs(times, key, floor, "full"), "+.2f")
        rows.append([key, f"{counts[key]:,}", f"{1000 * median(ts):.0f}", f"{ratio(times, key, 'full'):.2f}", vs_peft,
                     vs_floor])
    title = f"Training step, {'tiny BERT' if args.quick else 'all-MiniLM-L6-v2'}, batch {batch} x {seq} tokens, " \
            f"r=8 on query/key/value/dense + classifier head, {args.reps} interleaved reps"
    _print(title, table(rows, ["variant", "trainable params", "median ms", "x full", "x PEFT", "floor + (x full)"])
           + "\n\nIn brackets: the middle half of the rounds (first and third quartiles). Rows with"
           f" '{HASHED[2:]}' swap the model's own nn.Dropout modules for lorafit's HashedDropout"
           " (train.model_dropout = \"hashed\", opt-in: another random stream); their floor + is taken"
           " against the floor with the same swap. The floor + products rows add the two, round by round:"
           " the least a LoRA step with these products could take.")
    out["train"] = {"batch": [batch, seq], "median_s": {k: median(v) for k, v in times.items()},
                    "all_s": times, "trainable": counts}


def bench_amp(args, out: dict) -> None:
    """The training step of bench_train under bfloat16 autocast on float32 weights (mixed precision)."""
    batch, seq = (4, 16) if args.quick else (32, 64)
    base = models.bert_classifier(args.quick)
    steps = {}
    for variant in ("full", "floor", "peft", "lorafit"):
        for dropout in (0.1, 0.0) if variant in ("peft", "lorafit") else (0.1,):
            model = train_step.make_variant(base, variant, dropout=dropout)
            key = _variant_key(variant, dropout, "torch")
            steps[key] = train_step.stepper(model, train_step.make_batch(model, batch, seq), autocast=True)
    times = interleaved(steps, reps=args.reps, warmup=1)
    rows = []
    for key, ts in times.items():
        vs_peft = spread(ratios(times, key, key.replace("lorafit", "peft"))) if key.startswith("lorafit") else ""
        vs_floor = spread(overs(times, key, "floor", "full"), "+.2f") if key not in ("full", "floor") else ""
        rows.append([key, f"{1000 * median(ts):.0f}", f"{ratio(times, key, 'full'):.2f}", vs_peft, vs_floor])
    _print(f"Training step under bf16 autocast (float32 weights), {'tiny BERT' if args.quick else 'all-MiniLM-L6-v2'}, "
           f"batch {batch} x {seq}, r=8 on query/key/value/dense + classifier head, {args.reps} interleaved reps",
           table(rows, ["variant", "median ms", "x full", "x PEFT (same dropout)", "floor + (x full)"]))
    out["amp"] = {"batch": [batch, seq], "median_s": {k: median(v) for k, v in times.items()}, "all_s": times}


def bench_host(args, out: dict) -> None:
    """Host time of one adapted layer's forward + backward: tiny float32 tensors (8 x 16, r=4), so the
    products cost next to nothing and what is timed is Python, autograd and the dispatcher. lorafit runs its
    accelerator implementation (the one GPUs run) on these CPU tensors, without dropout (with dropout the
    masked products would be the CPU's C loops here, Triton launches on a GPU: benchmarks/kernels_gpu.py
    times those). On a GPU this is the time the host needs to issue a layer, which bounds a step wherever
    layers are small (q/k/v projections, small models)."""
    from benchmarks.kernels_gpu import _PeftStyle
    from lorafit.kernels import linear

    torch.manual_seed(0)
    base = torch.nn.Linear(16, 16, bias=False).requires_grad_(False)
    x, g = torch.randn(8, 16), torch.randn(8, 16)
    calls = 50 if args.quick else 2000

    def calling(module):
        def run() -> None:
            for _ in range(calls):
                module(x.detach().requires_grad_(True)).backward(g)
        return run

    model = torch.nn.Sequential(copy.deepcopy(base))
    lorafit.attach(model, lorafit.LoraConfig(r=4, lora_alpha=8, target_modules=["0"]))
    peft = "PEFT's formula"
    steps = {"floor (base layer alone)": calling(base), "lorafit": calling(model.train()),
             peft: calling(_PeftStyle(base, 4, 0.0).train())}
    accelerator = linear.cpu_path
    linear.cpu_path = lambda t: False
    try:
        times = interleaved(steps, reps=args.reps, warmup=1)
    finally:
        linear.cpu_path = accelerator
    rows = [[key, f"{1e6 * median(ts) / calls:.0f}", f"{ratio(times, key, peft):.2f}"]
            for key, ts in times.items()]
    _print(f"Host time per adapted layer (forward + backward, 8 x 16 float32, r=4, no dropout, accelerator "
           f"implementation, {calls} calls a round, {args.reps} interleaved rounds)",
           table(rows, ["variant", "median us a call", "x PEFT's formula"]))
    out["host"] = {"calls_per_round": calls, "median_s": {k: median(v) / calls for k, v in times.items()}}
    _bench_host_triton(args, out)


def _bench_host_triton(args, out: dict) -> None:
    """The same with dropout, Triton's launch path included: benchmarks/host_triton.py, in a process of its own
    (it puts a stand-in for a GPU driver under Triton)."""
    import importlib.util

    if importlib.util.find_spec("triton") is None:
        _print("Host time per adapted layer with dropout", "skipped: Triton is not installed")
        return
    cmd = [sys.executable, "-m", "benchmarks.host_triton", "--calls", "20" if args.quick else "1000",
           "--reps", str(args.reps)]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # where `-m benchmarks...` imports from
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1200, cwd=root)
    if proc.returncode != 0:
        raise SystemExit(f"benchmarks.host_triton failed:\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    if "skipped" in result:
        _print("Host time per adapted layer with dropout", f"skipped: {result['skipped']}")
        return
    result = result["median_us"]
    jit = "lorafit, dropout 0.05, every launch through Triton's JIT"
    rows = [[key, f"{us:.0f}", f"{us / result[jit]:.2f}"] for key, us in result.items()]
    _print("Host time per adapted layer with dropout (forward + backward, 8 x 16 float32, r=4; Triton's launch path "
           "for an sm_90 GPU with the launch itself a no-op, see benchmarks/host_triton.py; "
           f"{args.reps} interleaved rounds)", table(rows, ["variant", "median us a call", "x through the JIT"]))
    out["host"]["triton_us"] = result


def bench_compile(args, out: dict) -> None:
    """Triton's compile time, with an empty cache, for the kernels a first LoRA training step with dropout
    compiles on a GPU (bf16, r=16): the part of that first step no eager path can hide. Compiled for an H100/H200
    (sm_90) on this machine's CPU: Triton's compiler and the ptxas it ships need no GPU. One fresh process per
    round, so nothing is reused between rounds; --quick: one round."""
    import importlib.util

    if importlib.util.find_spec("triton") is None:
        _print("Triton compile time", "skipped: Triton is not installed")
        return
    rounds = 1 if args.quick else 3
    times: dict[str, list[float]] = {}
    for _ in range(rounds):
        with tempfile.TemporaryDirectory() as cache:
            proc = subprocess.run([sys.executable, "-c", _COMPILE_PROBE], capture_output=True, text=True, timeout=600,
                                  env={**os.environ, "TRITON_CACHE_DIR": cache, "TRITON_DEFAULT_FP_FUSION": "1"})
        if proc.returncode != 0:
            _print("Triton compile time", f"failed: {proc.stderr.strip().splitlines()[-1:]}")
            return
        for name, seconds in json.loads(proc.stdout.strip().splitlines()[-1]).items():
            times.setdefault(name, []).append(seconds)
    rows = [[name, f"{median(ts):.2f}", f"{min(ts):.2f}-{max(ts):.2f}"] for name, ts in times.items()]
    _print(f"Triton compile time with an empty cache, sm_90 target, on this CPU ({rounds} fresh processes)",
           table(rows, ["kernel (in the order a first step compiles them)", "median s", "range s"]))
    out["compile"] = {"rounds": rounds, "seconds": times}


# Compiles lorafit's Triton kernels as a first bf16 training step with dropout specialises them, for sm_90, and
# prints {kernel: seconds} as JSON. The signature follows the kernels' argument names: pointers are bf16 but
# the mask key (int32) and the float32 partial sums; scales are float32; every other argument an int32.
_COMPILE_PROBE = """
import json, time
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler.compiler import ASTSource
from lorafit.kernels import triton_jit as jit

def source(fn, **constexprs):
    types = {"key_ptr": "*i32", "ws_ptr": "*fp32"}
    signature = {name: "constexpr" if name in constexprs else types.get(name, "*bf16") if name.endswith("_ptr")
                 else "fp32" if name.startswith("scale") else "i32" for name in fn.arg_names}
    return ASTSource(fn, signature, constexprs=constexprs)

kernels = {  # forward; backward of a layer whose input needs a gradient; of one whose input needs none
    "down (x A^T, masked)": source(jit._down_kernel, MASKED=True, PRECISION="tf32", BM=64, BK=256, BR=16),
    "grad_a_and_up (dA and dx, masked)": source(jit._grad_a_up_kernel, ACCUMULATE=False, PRECISION="tf32", BM=64,
                                                BK=64, BR=16),
    "grad_a (dA alone, masked)": source(jit._grad_a_kernel, MASKED=True, PRECISION="tf32", BM=128, BK=64, BR=16),
}
seconds = {}
for name, src in kernels.items():
    start = time.perf_counter()
    triton.compile(src, target=GPUTarget("cuda", 90, 32))
    seconds[name] = time.perf_counter() - start
print(json.dumps(seconds))
"""


def bench_memory(args, out: dict) -> None:
    batch, seq = (4, 16) if args.quick else (32, 64)
    rows, res = [], {}
    runs = [("full", 0.1, "torch"), ("floor", 0.1, "torch"), ("peft", 0.1, "torch"), ("lorafit", 0.1, "torch"),
            ("peft", 0.0, "torch"), ("lorafit", 0.0, "torch"), ("lorafit", 0.1, "hashed"), ("lorafit-fa", 0.1, "torch")]
    if args.quick:  # each probe is a fresh process: in the smoke run, just prove the probe works
        runs = [("full", 0.1, "torch"), ("lorafit", 0.1, "torch")]
    for variant, dropout, model_dropout in runs:
        cmd = [sys.executable, "-m", "benchmarks.memory_probe", "bert", variant, str(batch), str(seq),
               "--dropout", str(dropout), "--model-dropout", model_dropout] \
            + (["--quick", "--steps", "1"] if args.quick else []) + _malloc_flag(args)
        proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
        data = json.loads(proc.stdout.strip().splitlines()[-1])
        key = _variant_key(variant, dropout, model_dropout)
        if key in res:
            continue
        res[key] = data
    full = res["full"]["peak_mb"]
    floor = res.get("floor", res["full"])["peak_mb"]
    for key, data in res.items():
        rows.append([key, f"{data['peak_mb']:.0f}", f"{data['peak_mb'] - floor:+.0f}",
                     f"{data['peak_mb'] / full:.2f}"])
    title = f"Peak RSS during training steps (MB; one fresh process per variant, batch {batch} x {seq})"
    _print(title, table(rows, ["variant", "peak MB", "vs floor MB", "x full"]))
    out["memory"] = res


def bench_infer(args, out: dict) -> None:
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    batch, seq = (4, 16) if args.quick else (32, 64)
    base = models.bert_classifier(args.quick).eval()
    inputs = train_step.make_batch(base, batch, seq)
    inputs.pop("labels")
    targets = train_step.TARGETS["bert"]

    def adapted(kind: str, merged: bool):
        m = copy.deepcopy(base)
        if kind == "peft":
            m = get_peft_model(m, PeftLoraConfig(r=8, lora_alpha=16, target_modules=targets, init_lora_weights=False))
            if merged:
                m = m.merge_and_unload()
        else:
            lorafit.attach(m, lorafit.LoraConfig(r=8, lora_alpha=16, target_modules=targets, init_lora_weights=False))
            if merged:
                m = lorafit.merge_and_unload(m)
        return m.eval()

    models_ = {"base": base, "peft unmerged": adapted("peft", False), "lorafit unmerged": adapted("lorafit", False),
               "peft merged": adapted("peft", True), "lorafit merged": adapted("lorafit", True)}

    def run(m):
        def f():
            with torch.inference_mode():
                m(**inputs)
        return f

    times = interleaved({k: run(m) for k, m in models_.items()}, reps=args.reps * 2, warmup=2)
    rows = [[k, f"{1000 * median(v):.1f}", f"{ratio(times, k, 'base'):.3f}"] for k, v in times.items()]
    _print(f"Inference, batch {batch} x {seq}, r=8 on query/key/value/dense",
           table(rows, ["model", "median ms", "x base"]))
    out["infer"] = {k: median(v) for k, v in times.items()}


def bench_load(args, out: dict) -> None:
    from peft import LoraConfig as PeftLoraConfig
    from peft import PeftModel, get_peft_model

    base = models.bert_classifier(args.quick).eval()
    targets = train_step.TARGETS["bert"]
    with tempfile.TemporaryDirectory() as tmp:
        src = lorafit.attach(copy.deepcopy(base), lorafit.LoraConfig(r=8, target_modules=targets,
                                                                    init_lora_weights=False))
        lorafit.save_adapter(src, tmp)
        running_lf = copy.deepcopy(base)
        running_peft = PeftModel.from_pretrained(copy.deepcopy(base), tmp, adapter_name="first")
        times: dict[str, list[float]] = {"peft load_adapter": [], "lorafit load_adapter": []}
        for rep in range(args.reps * 2 + 2):  # interleaved; the first two rounds are warm-up
            t0 = time.perf_counter()
            running_peft.load_adapter(tmp, adapter_name=f"x{rep}")
            t1 = time.perf_counter()
            running_peft.delete_adapter(f"x{rep}")  # removal is not timed, for either tool
            t2 = time.perf_counter()
            lorafit.load_adapter(running_lf, tmp, name="x")
            t3 = time.perf_counter()
            lorafit.detach(running_lf, "x")
            if rep >= 2:
                times["peft load_adapter"].append(t1 - t0)
                times["lorafit load_adapter"].append(t3 - t2)
        del get_peft_model, PeftLoraConfig
    rows = [[k, f"{1000 * median(v):.1f}", f"{ratio(times, k, 'peft load_adapter'):.2f}"] for k, v in times.items()]
    _print("Loading an r=8 adapter into a running model (files to ready-to-run adapter; removal not timed)",
           table(rows, ["call", "median ms", "x PEFT"]))
    out["load"] = {k: median(v) for k, v in times.items()}


def bench_smollm(args, out: dict) -> None:
    batch, seq = (2, 16) if args.quick else (8, 128)
    base = models.smollm2(args.quick)
    steps = {}
    for v in ("floor", "peft", "lorafit"):
        model = train_step.make_variant(base, v, dropout=0.1)
        steps[v] = train_step.stepper(model, train_step.make_batch(model, batch, seq))
    del base
    reps = max(2, args.reps // 3)
    times = interleaved(steps, reps=reps, warmup=1)
    rows = [[k, f"{median(v):.2f}", f"{ratio(times, k, 'peft'):.2f}"] for k, v in times.items()]
    _print(f"Training step, SmolLM2-135M, batch {batch} x {seq}, r=8 on q/k/v/o, dropout 0.1, {reps} reps",
           table(rows, ["variant", "median s", "x PEFT"]))
    out["smollm"] = {k: median(v) for k, v in times.items()}


def bench_padding(args, out: dict) -> None:
    """LoRA training over SST-2 rows: every batch padded to 64 vs padded to its longest row vs length-grouped."""
    import random

    from transformers import AutoTokenizer

    # a fixed random quarter of the data keeps this part to a few minutes; the ratio is what it reports
    rows = _sst2_rows()
    random.Random(2).shuffle(rows)
    rows = rows[:64] if args.quick else rows[:1728]
    tok = AutoTokenizer.from_pretrained(models.minilm_dir()) if not args.quick else None
    model = train_step.make_variant(models.bert_classifier(args.quick), "lorafit", dropout=0.1)
    batch = 8 if args.quick else 32
    if tok is None:  # --quick: token ids from word lengths, enough to exercise the code path
        encoded = [[1 + len(w) % 90 for w in r["text"].split()][:64] for r in rows]
    else:
        encoded = tok([r["text"] for r in rows], truncation=True, max_length=64)["input_ids"]
    labels = [r["label"] for r in rows]
    order = list(range(len(rows)))
    random.Random(0).shuffle(order)
    # length-grouped: sort shuffled chunks of 50 batches by length, then shuffle the batches
    grouped = []
    for i in range(0, len(order), 50 * batch):
        chunk = sorted(order[i:i + 50 * batch], key=lambda j: len(encoded[j]))
        grouped += [chunk[k:k + batch] for k in range(0, len(chunk), batch)]
    random.Random(1).shuffle(grouped)
    plans = {"pad to 64": ([order[k:k + batch] for k in range(0, len(order), batch)], 64),
             "dynamic padding": ([order[k:k + batch] for k in range(0, len(order), batch)], None),
             "dynamic + length-grouped": (grouped, None)}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)

    def epoch(batches, pad_to):
        for idx in batches:
            width = pad_to or max(len(encoded[j]) for j in idx)
            ids = torch.zeros(len(idx), width, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for row, j in enumerate(idx):
                ids[row, : len(encoded[j])] = torch.tensor(encoded[j])
                mask[row, : len(encoded[j])] = 1
            model(input_ids=ids, attention_mask=mask, labels=torch.tensor([labels[j] for j in idx])).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

    padded = {k: sum(len(idx) * (w or max(len(encoded[j]) for j in idx)) for idx in b) for k, (b, w) in plans.items()}
    epoch(plans["pad to 64"][0][:3], 64)  # warm-up
    times = interleaved({k: (lambda b=b, w=w: epoch(b, w)) for k, (b, w) in plans.items()}, reps=1, warmup=0)
    base = times["pad to 64"][0]
    rows_ = [[k, f"{padded[k]:,}", f"{v[0]:.1f}", f"{v[0] / base:.2f}"] for k, v in times.items()]
    _print(f"One LoRA training pass over {len(rows)} SST-2 training rows, batch {batch}, max length 64",
           table(rows_, ["batching", "tokens incl. padding", "seconds", "x pad to 64"]))
    out["padding"] = {k: v[0] for k, v in times.items()} | {"rows": len(rows)}


def bench_qlora(args, out: dict) -> None:
    """SmolLM2-135M LoRA training with the frozen base in float32, int8 and NF4 (fresh process each)."""
    batch, seq = (2, 16) if args.quick else (4, 128)
    res = {}
    variants = (("float32 base", None), ("int8 base", 8), ("NF4 base", 4))
    for label, bits in variants[::2] if args.quick else variants:
        cmd = [sys.executable, "-m", "benchmarks.memory_probe", "llama", "lorafit", str(batch), str(seq),
               "--steps", "1" if args.quick else "2"] + (["--quick"] if args.quick else []) + _malloc_flag(args)
        if bits:
            cmd += ["--quantize", str(bits)]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
        res[label] = json.loads(proc.stdout.strip().splitlines()[-1])
    f = res["float32 base"]
    rows = [[k, f"{v['weights_mb']:.0f}", f"{v['peak_mb']:.0f}", f"{v['peak_mb'] / f['peak_mb']:.2f}",
             f"{v['step_s']:.2f}", f"{v['step_s'] / f['step_s']:.2f}"] for k, v in res.items()]
    _print(f"QLoRA: {'tiny Llama' if args.quick else 'SmolLM2-135M'}, LoRA r=8 on q/k/v/o, batch {batch} x {seq} "
           "(weights = parameters + buffers; embeddings and head stay float32)",
           table(rows, ["frozen base", "weights MB", "peak RSS MB", "x float32", "step s", "x float32"]))
    out["qlora"] = res


def bench_mixed(args, out: dict) -> None:
    """One batch, each row with its own adapter: lorafit's adapter_per_row vs PEFT's adapter_names=."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model

    batch, seq = (4, 16) if args.quick else (32, 64)
    counts = (1, 2, 4) if args.quick else (1, 8, 32)
    n = max(counts)
    base = models.bert_classifier(args.quick).eval()
    inputs = train_step.make_batch(base, batch, seq)
    inputs.pop("labels")
    targets = train_step.TARGETS["bert"]
    names = [f"a{i}" for i in range(n)]
    lf, dora, tokens = copy.deepcopy(base), copy.deepcopy(base), copy.deepcopy(base)
    vocab = base.get_input_embeddings().num_embeddings
    picks = torch.randperm(vocab, generator=torch.Generator().manual_seed(0))
    for i, name in enumerate(names):
        for model, variant in ((lf, {}), (dora, {"use_dora": True}),
                               (tokens, {"trainable_token_indices": picks[16 * i:16 * (i + 1)].tolist()})):
            lorafit.attach(model, lorafit.LoraConfig(r=8, lora_alpha=16, target_modules=targets,
                                                     init_lora_weights=False, **variant), name)
    pf = None
    for name in names:
        cfg = PeftLoraConfig(r=8, lora_alpha=16, target_modules=targets, init_lora_weights=False)
        if pf is None:
            pf = get_peft_model(copy.deepcopy(base), cfg, adapter_name=name)
        else:
            pf.add_adapter(name, cfg)
    pf.eval()

    def rows(k: int) -> list[str]:
        return [names[i % k] for i in range(batch)]

    def run_base():
        with torch.inference_mode():
            base(**inputs)

    def run_lorafit(k, model=lf):
        def f():
            with torch.inference_mode(), lorafit.adapter_per_row(model, rows(k)):
                model(**inputs)
        return f

    def run_peft(k):
        def f():
            with torch.inference_mode():
                pf(**inputs, adapter_names=rows(k))
        return f

    variants = {"base model": run_base}
    for k in counts:
        label = "1 adapter" if k == 1 else f"{k} distinct adapters"
        variants[f"lorafit, {label}"] = run_lorafit(k)
        variants[f"PEFT adapter_names, {label}"] = run_peft(k)
    # DoRA rows: each scales its layers' outputs by its adapter's factor (PEFT refuses DoRA with adapter_names)
    variants[f"lorafit DoRA, {n} distinct adapters"] = run_lorafit(n, dora)
    # LoRA plus 16 trained token rows each (trainable_token_indices): every row looks up its own adapter's rows
    variants[f"lorafit LoRA + token rows, {n} distinct adapters"] = run_lorafit(n, tokens)
    times = interleaved(variants, reps=args.reps * 2, warmup=2)
    rows_ = [[k, f"{1000 * median(v):.1f}", f"{ratio(times, k, 'base model'):.2f}"] for k, v in times.items()]
    _print(f"Mixed-adapter batch, {'tiny BERT' if args.quick else 'all-MiniLM-L6-v2'}, batch {batch} x {seq}, "
           f"r=8 on query/key/value/dense, row i uses adapter i mod k, {args.reps * 2} interleaved reps",
           table(rows_, ["variant", "median ms", "x base"]))
    out["mixed"] = {"batch": [batch, seq], "median_s": {k: median(v) for k, v in times.items()},
                    "x_base": {k: ratio(times, k, "base model") for k in times}}


def bench_serve(args, out: dict) -> None:
    """Load test of `lorafit serve` over loopback (see benchmarks/serve_load.py)."""
    from benchmarks import serve_load

    out["serve"] = serve_load.run(args, _print)


def bench_serve_generate(args, out: dict) -> None:
    """Generation serving, continuous against static batching (see benchmarks/serve_generate.py)."""
    from benchmarks import serve_generate

    out["serve_generate"] = serve_generate.run(args, _print)


def bench_dpo(args, out: dict) -> None:
    """DPO step, lorafit train against TRL's DPOTrainer with PEFT (see benchmarks/trl_step.py)."""
    from benchmarks import trl_step

    out["dpo"] = trl_step.run(args, _print, "dpo")


def bench_dpo_precomputed(args, out: dict) -> None:
    """DPO step with precomputed reference log-probabilities, lorafit against TRL (see benchmarks/trl_step.py)."""
    from benchmarks import trl_step

    out["dpo_precomputed"] = trl_step.run(args, _print, "dpo_precomputed")


def bench_reward(args, out: dict) -> None:
    """Reward-model step, lorafit train against TRL's RewardTrainer with PEFT (see benchmarks/trl_step.py)."""
    from benchmarks import trl_step

    out["reward"] = trl_step.run(args, _print, "reward")


def bench_grpo(args, out: dict) -> None:
    """GRPO step, lorafit train against TRL's GRPOTrainer with PEFT (see benchmarks/trl_step.py)."""
    from benchmarks import trl_step

    out["grpo"] = trl_step.run(args, _print, "grpo")


def bench_ddp(args, out: dict) -> None:
    """Gradient bytes all-reduced per DDP step, LoRA vs full (see benchmarks/ddp_bytes.py)."""
    from benchmarks import ddp_bytes

    out["ddp"] = ddp_bytes.run(args, _sst2_rows(), _print)


def bench_e2e(args, out: dict) -> None:
    """lorafit train on SST-2, LoRA vs full fine-tuning, 2 epochs each (see benchmarks/end_to_end.py)."""
    from benchmarks import end_to_end

    out["e2e"] = end_to_end.run(args, _sst2_rows(), _print)


def bench_adapter_dtype(args, out: dict) -> None:
    """lorafit train on bfloat16 weights: bfloat16 adapters with and without float32 masters, and float32
    adapters (benchmarks/adapter_dtype.py)."""
    from benchmarks import adapter_dtype

    out["adapter_dtype"] = adapter_dtype.run(args, _print)


def bench_moe(args, out: dict) -> None:
    """LoRA on a mixture of experts' expert weights, lorafit against PEFT (benchmarks/moe.py)."""
    from benchmarks import moe

    out["moe"] = moe.run(args, _print)


def bench_tokens(args, out: dict) -> None:
    """Trainable token rows with a tied head, lorafit against PEFT (benchmarks/tokens.py)."""
    from benchmarks import tokens

    out["tokens"] = tokens.run(args, _print)


def bench_inits(args, out: dict) -> None:
    """lorafit train with EVA's, LoRA-GA's and MiCA's initialisations against the default one, on SmolLM2 and
    Alpaca (benchmarks/inits.py)."""
    from benchmarks import inits

    out["inits"] = inits.run(args, _print)


def bench_loftq(args, out: dict) -> None:
    """lorafit train on an NF4 base with LoftQ's initialisation against QLoRA's default one, on SmolLM2 and
    Alpaca (benchmarks/loftq.py)."""
    from benchmarks import loftq

    out["loftq"] = loftq.run(args, _print)


def bench_arrow(args, out: dict) -> None:
    """Arrow routing over 8 experts, lorafit against PEFT: forward time and peak memory (benchmarks/arrow.py)."""
    from benchmarks import arrow

    out["arrow"] = arrow.run(args, _print)


def bench_optimizer(args, out: dict) -> None:
    """One AdamW step as lorafit train takes it (fused where torch has the kernel: lorafit.train.loop.adamw_kernel)
    against foreach, on SmolLM2-135M's r=16 all-linear adapters and on MiniLM's full weights."""
    cases = {}
    for label, base, spec in (("SmolLM2 r=16 all-linear", models.smollm2(args.quick), "lora"),
                              ("MiniLM full fine-tuning", models.bert_classifier(args.quick), "full")):
        if spec == "lora":
            lorafit.attach(base, lorafit.LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
        params = [p for p in base.parameters() if p.requires_grad]
        cases[label] = (params, sum(p.numel() for p in params))
    steps = {}
    for label, (params, _) in cases.items():
        for kind in ("foreach", "fused"):
            copies = [torch.nn.Parameter(p.detach().clone()) for p in params]
            for c in copies:
                c.grad = torch.randn_like(c)
            steps[f"{label}, {kind}"] = torch.optim.AdamW(copies, lr=1e-4, **{kind: True}).step
    times = interleaved(steps, reps=args.reps * 3, warmup=2)
    rows = [[k, f"{len(cases[k.rsplit(', ', 1)[0]][0])} / {cases[k.rsplit(', ', 1)[0]][1]:,}",
             f"{median(v) * 1e3:.2f}", f"{ratio(times, k, k.rsplit(', ', 1)[0] + ', foreach'):.2f}"]
            for k, v in times.items()]
    _print(f"AdamW step: fused against foreach, {args.reps * 3} interleaved rounds",
           table(rows, ["parameters, implementation", "tensors / values", "median ms", "x foreach"]))
    out["optimizer"] = {k: median(v) for k, v in times.items()}


def _sst2_rows() -> list[dict]:
    from pathlib import Path

    root = Path(os.environ.get("LORAFIT_DATA", Path(__file__).resolve().parents[1].parent / "shared" / "data"))
    path = root / "sst2" / "train.jsonl"
    if not path.is_file():
        raise SystemExit(f"SST-2 not found at {path}; set LORAFIT_DATA to the data directory")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _malloc_flag(args) -> list[str]:
    return ["--malloc-defaults"] if args.malloc_defaults else []


def _print(title: str, body: str) -> None:
    print(f"\n### {title}\n\n{body}\n", flush=True)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny random models and few reps (CI smoke run)")
    ap.add_argument("--only", action="append", choices=PARTS, help="run only these parts (repeatable)")
    ap.add_argument("--reps", type=int, default=None, help="interleaved rounds (default 10, 2 with --quick)")
    ap.add_argument("--json", default=None, help="write all numbers to this JSON file")
    ap.add_argument("--inits", default=None, help="the inits part's variants, comma-separated (default: all of "
                    "default, eva, lora_ga, mica)")
    ap.add_argument("--malloc-defaults", action="store_true",
                    help="keep glibc's malloc thresholds in every process; by default the suite, like lorafit train, "
                         "keeps freed memory for reuse (lorafit/train/allocator.py), for every variant alike")
    args = ap.parse_args(argv)
    kept = not args.malloc_defaults and allocator.keep_freed_memory()
    args.reps = args.reps or (2 if args.quick else 10)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import peft
    import transformers

    print(f"# lorafit benchmarks ({time.strftime('%Y-%m-%d %H:%M')})\n\nmachine: {platform.machine()}, "
          f"{os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads), "
          f"transformers {transformers.__version__}, peft {peft.__version__}, lorafit {lorafit.__version__}, "
          f"malloc: {'freed memory kept for reuse' if kept else 'glibc defaults'}")
    out: dict = {}
    for part in args.only or PARTS:
        started = time.perf_counter()
        globals()[f"bench_{part}"](args, out)
        print(f"[part {part}: {time.perf_counter() - started:.0f} s]", file=sys.stderr, flush=True)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=1)


if __name__ == "__main__":
    main()
