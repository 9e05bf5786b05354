"""lorafit on one CUDA GPU: ``python -m benchmarks.gpu [--quick] [--out DIR] [--only NAMES] [--data DIR]``.

Parts (``--only step,step95m,infer,mixed,moe,e2e``; each runs on its own, and a part or a variant that fails prints
its traceback while the others still run; the exit status is 1 if anything failed):

  step   one training step (forward, causal-LM loss, backward, AdamW) at Llama-3.2-1B's shape with
         random weights, bf16, batch 8 x 1024: full fine-tuning, the floor, PEFT and lorafit LoRA
         (r=16, alpha 32 on q/k/v/o/gate/up/down) with dropout 0.05 and 0
  step95m  the e2e part's 94M Llama, one step (batch 16 x 256): full, the floor, PEFT and lorafit LoRA, their
         time and how much of it the GPU is busy (the rest it waits for the host)
  infer  forward of a 32 x 256 batch (eval, inference_mode), same shape: the base model, lorafit and
         PEFT unmerged (one r=16 adapter), lorafit merged
  mixed  32 lorafit adapters, row i of a 32 x 256 batch on adapter i (adapter_per_row), against the
         base model and PEFT's ``adapter_names=``
  moe    LoRA on a random Mixtral's expert stacks (target_parameters; hidden 2048, 32 experts of 1024, top 4,
         4 layers), bf16, batch 8 x 1024: the frozen floor, lorafit and PEFT, step time and memory
  e2e    the real ``lorafit train`` command on Alpaca (999 rows), LoRA against full fine-tuning, on random
         Llamas (94M parameters, and Llama-3.2-1B's layer shapes) with a BPE tokenizer trained here on the
         same rows (``--e2e-models 95m,1b``); on the first, LoRA with train.bf16 (float32 adapters) too

Timing: every variant is timed once per round and the order rotates from round to round (as in
benchmarks/timing.py), so a drift of the machine hits all variants alike; a call is timed with CUDA
events after a synchronize. Reported: medians, the middle half of the rounds in brackets, and ratios
taken round by round (then their median). Results go to OUT/gpu.json, written after every part.

``--quick`` runs every code path with tiny shapes on cuda if there is one, else the CPU, in well
under a minute: a dry run, its numbers mean nothing.
"""

from __future__ import annotations

import os
import tempfile

if __name__ == "__main__":
    # Triton keeps compiled kernels in ~/.triton/cache and inductor its graphs in /tmp/torchinductor_$USER:
    # fresh, empty directories, set before torch is imported, make this process's first lorafit step compile
    # everything it needs, as on a machine that never ran lorafit.
    _CACHE = tempfile.mkdtemp(prefix="lorafit-gpu-cache-")
    os.environ["TRITON_CACHE_DIR"] = os.path.join(_CACHE, "triton")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(_CACHE, "inductor")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import argparse  # noqa: E402
import contextlib  # noqa: E402
import copy  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

import lorafit  # noqa: E402
from lorafit.kernels import triton_warmup  # noqa: E402
from lorafit.lorafa import LoraFAProjection  # noqa: E402
from benchmarks.timing import median, ratios, spread, table  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PARTS = ("step", "step95m", "infer", "mixed", "moe", "e2e")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
R, ALPHA = 16, 32
GiB = 2**30
SUMMARY: list[str] = []  # every part's table, printed again at the very end (only the output's tail comes back)
PROBLEMS: list[str] = []  # variants that failed inside a part that otherwise ran


def attempt(label: str, fn: Callable[[], object]):
    """fn(), or None after printing its traceback: one broken variant must not cost the others their numbers."""
    try:
        return fn()
    except Exception:  # noqa: BLE001
        text = traceback.format_exc()
        print(f"\n#### {label}: FAILED\n\n{text}", flush=True)
        PROBLEMS.append(f"{label}: {text.strip().splitlines()[-1][:300]}")
        return None


# -- models, batches, clocks ----------------------------------------------------------------------

def llama_config(quick: bool):
    from transformers import LlamaConfig

    if quick:
        return LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                           intermediate_size=128, vocab_size=512, attn_implementation="sdpa")
    # Llama-3.2-1B's layer shapes, with a 32k vocabulary instead of 128k
    return LlamaConfig(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                       intermediate_size=8192, vocab_size=32000, attn_implementation="sdpa")


def build_llama(cfg, device: torch.device, seed: int = 0):
    """A random LlamaForCausalLM in bfloat16, initialised on ``device`` (1.2B parameters take a while on a CPU)."""
    from transformers import LlamaForCausalLM, logging

    logging.set_verbosity_error()
    torch.manual_seed(seed)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(default)
    return model.to(device=device, dtype=torch.bfloat16)


def token_ids(cfg, batch: int, seq: int, device: torch.device) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, cfg.vocab_size, (batch, seq), generator=g).to(device)


def peft_lora(model, dropout: float = 0.0, init=True, name: str = "default"):
    """PEFT with the adapter in the base's dtype (bf16), as lorafit does: PEFT's default
    (autocast_adapter_dtype=True) would make it float32 and compare another computation."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import PeftModel, get_peft_model

    cfg = PeftLoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=dropout, target_modules=TARGETS, init_lora_weights=init)
    if isinstance(model, PeftModel):
        model.add_adapter(name, cfg, autocast_adapter_dtype=False)
        return model
    return get_peft_model(model, cfg, adapter_name=name, autocast_adapter_dtype=False)


def lorafit_lora(model, dropout: float = 0.0, init=True, name: str = "default"):
    return lorafit.attach(model, lorafit.LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=dropout,
                                                    target_modules=TARGETS, init_lora_weights=init), name)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds of one call. On a GPU: CUDA events around it, after a synchronize, so the queue holds only
    this call's work; the events' interval also covers host work (the GPU idles until the next launch)."""
    sync(device)
    if device.type != "cuda":
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1000


def rounds(variants: dict[str, Callable[[], float]], n: int, warmup: int, part: str) -> dict[str, list[float]]:
    """Each variant returns its own seconds. Each round runs every variant once, the order rotating.
    A variant that fails in its warm-up calls is left out (and reported)."""
    names = [k for k, f in variants.items() if attempt(f"{part}: {k}", lambda f=f: [f() for _ in range(warmup)])
             is not None]
    times: dict[str, list[float]] = {name: [] for name in names}
    for i in range(n):
        for name in names[i % len(names):] + names[: i % len(names)]:
            times[name].append(variants[name]())
    return times


def vs(times: dict[str, list[float]], key: str, ref: str, iqr: bool = False, fmt: str = ".3f") -> str:
    """key's time over ref's, round by round: the median (and the middle half of the rounds)."""
    if key not in times or ref not in times:
        return "n/a"
    r = ratios(times, key, ref)
    return spread(r, fmt) if iqr else format(median(r), fmt)


def ms(times: dict[str, list[float]], key: str, fmt: str = ".2f") -> str:
    return spread([1000 * t for t in times[key]], fmt) if key in times else "FAILED (traceback above)"


def resident_bytes(model, opt=None) -> int:
    """Bytes of the model's parameters and buffers and of the optimizer's state (each storage once)."""
    tensors = [*model.parameters(), *model.buffers()]
    if opt is not None:
        tensors += [v for s in opt.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors if t.is_cuda}
    return sum(storages.values())


def step_bytes(step: Callable[[], None], device: torch.device) -> int | None:
    """What one step allocates above what was allocated before it (activations, gradients, temporaries)."""
    if device.type != "cuda":
        return None
    sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    step()
    sync(device)
    return torch.cuda.max_memory_allocated(device) - before


def gib(n: int | None) -> str:
    return "n/a" if n is None else f"{n / GiB:.2f}"


def report(title: str, body: str, note: str = "") -> None:
    text = f"\n### {title}\n\n{body}\n" + (f"\n{note}\n" if note else "")
    print(text, flush=True)
    SUMMARY.append(text)


def trainable(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


# -- part 1: the training step ----------------------------------------------------------------------

def make_variant(base, kind: str, dropout: float | None):
    """``kind``: full, floor, peft, lorafit or lorafit-fa (LoRA-FA); "+autocast": the same on a float32 copy of
    the base (mixed precision: the step runs under bf16 autocast)."""
    model = copy.deepcopy(base).train()
    kind, _, autocast = kind.partition("+")
    if autocast:
        model.float()
    if kind == "full":
        model.requires_grad_(True)
    elif kind == "floor":
        # Base frozen, no adapter, but autograd computes what adapters need: the gradient at every target
        # linear's output, hence back through every layer down to layer 0's q/k/v. Trained: only the final
        # RMSNorm's weight (hidden_size numbers), so AdamW has one tensor to step and costs next to nothing.
        model.requires_grad_(False)
        model.model.norm.weight.requires_grad_(True)
        for name, module in model.named_modules():
            if name.rsplit(".", 1)[-1] in TARGETS:
                module.register_forward_hook(lambda m, i, out: out.requires_grad_(True))
    elif kind == "peft":
        model = peft_lora(model, dropout)
    elif kind in ("lorafit", "lorafit-fa"):
        lorafit_lora(model, dropout)
        if kind == "lorafit-fa":  # LoRA-FA: A frozen; prepare() registers the projection of B's gradients
            model.__dict__["lorafa"] = LoraFAProjection(model, ["default"])
            model.__dict__["lorafa"].freeze_a()
    else:
        raise ValueError(kind)
    return model


def part_step(args, device: torch.device) -> dict:
    batch, seq = (2, 64) if args.quick else (8, 1024)
    warm, n = (1, 2) if args.quick else (3, 10)
    cfg = llama_config(args.quick)
    base = build_llama(cfg, device)
    ids = token_ids(cfg, batch, seq, device)
    # One untimed step of the base model first: the CUDA context, cuBLAS handles and workspaces are the
    # process's start-up, and would otherwise land on whichever variant's first step came first.
    start = time.perf_counter()
    base(input_ids=ids, labels=ids).loss.backward()
    base.zero_grad(set_to_none=True)
    sync(device)
    startup_s = time.perf_counter() - start
    specs = [("full", None), ("floor", None), ("peft", 0.05), ("peft", 0.0), ("lorafit", 0.05), ("lorafit", 0.0),
             ("peft+autocast", 0.05), ("lorafit+autocast", 0.05), ("lorafit-fa", 0.05)]
    keys = [kind if dropout is None else f"{kind} (dropout {dropout:g})" for kind, dropout in specs]

    def prepare(kind: str, dropout: float | None) -> tuple[Callable[[], None], dict]:
        model = make_variant(base, kind, dropout)
        params = [p for p in model.parameters() if p.requires_grad]
        # the same for every variant: torch's default implementation choice (foreach on CUDA), not fused
        opt = torch.optim.AdamW(params, lr=1e-4)
        if "lorafa" in model.__dict__:
            model.__dict__["lorafa"].register(opt)
        mixed = ((lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if "autocast" in kind
                 else contextlib.nullcontext)

        def step() -> None:
            with mixed():
                loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        sync(device)
        start = time.perf_counter()  # the first step, kernel compilation included
        step()
        sync(device)
        first = time.perf_counter() - start
        triton_warmup.wait()  # Triton kernels that the helper compiles meanwhile: the timed steps use them
        kernels_ready = time.perf_counter() - start
        for _ in range(warm):
            step()
        return step, {"trainable": trainable(model), "first_step_s": first, "kernels_ready_s": kernels_ready,
                      "step_bytes": step_bytes(step, device),
                      "resident_bytes": resident_bytes(model, opt) if device.type == "cuda" else None}

    steps, info = {}, {}
    for key, (kind, dropout) in zip(keys, specs):
        built = attempt(f"step: {key}", lambda: prepare(kind, dropout))
        if built is not None:
            info[key] = built[1]
            steps[key] = lambda step=built[0]: timed(step, device)
    times = rounds(steps, n, 0, "step")
    rows = []
    for key in keys:
        i = info.get(key, {})
        alone = None if i.get("step_bytes") is None else i["step_bytes"] + i["resident_bytes"]
        rows.append([key, f"{i['trainable']:,}" if i else "", f"{i['first_step_s']:.2f}" if i else "",
                     f"{i['kernels_ready_s']:.1f}" if i else "", ms(times, key, ".1f"), vs(times, key, "full"),
                     vs(times, key, "floor"),
                     vs(times, key, key.replace("lorafit-fa", "lorafit").replace("lorafit", "peft"), iqr=True)
                     if key.startswith("lorafit") else "",
                     gib(i.get("step_bytes")), gib(alone)])
    report(f"Training step, Llama-3.2-1B shape ({sum(p.numel() for p in base.parameters()) / 1e9:.2f}B params, "
           f"random), bf16, batch {batch} x {seq}, LoRA r={R} on 7 targets, {n} interleaved rounds",
           table(rows, ["variant", "trainable", "first step s", "kernels ready s", "median ms [IQR]", "x full",
                        "x floor", "x PEFT [IQR]", "step GiB", "alone GiB"]),
           f"First step: on the freshly built variant, in the order of the table, after one untimed process "
           f"warm-up step ({startup_s:.1f} s); it includes lorafit's kernel compilation (cold caches: shared "
           "kernels are paid by the first lorafit row; with dropout its masked products run as torch ops until the "
           "warm-up helper has compiled their Triton kernels: kernels ready s, from the first step's start; the timed "
           "steps come after). x: per-round ratios' median; x PEFT: against PEFT with the "
           "same dropout. AdamW(lr=1e-4), torch's default (foreach), for all. Floor: base frozen, "
           f"gradients at every target output, no adapter; trains only the final norm ({cfg.hidden_size:,} weights). "
           "step GiB: max_memory_allocated during one step minus memory_allocated before it; alone GiB: that plus "
           "the variant's own parameters, buffers and AdamW state = its peak if it were alone on the GPU. "
           "Adapters in bf16 for PEFT and lorafit (PEFT's autocast_adapter_dtype=False). +autocast: a float32 "
           "copy of the model (float32 adapters) trained under bf16 autocast. lorafit-fa: LoRA-FA (A frozen, "
           "B's gradient projected), x PEFT against PEFT's LoRA.")
    bound = products_bound(Path(args.out), times.get("floor"), quick=args.quick)
    return {"batch": [batch, seq], "startup_s": startup_s, "info": info, "times_s": times,
            "median_s": {k: median(v) for k, v in times.items()}, "products_bound": bound}


def part_step95m(args, device: torch.device) -> dict:
    """The e2e part's 94M Llama, one training step (batch 16 x 256, bf16, fused AdamW as `lorafit train` uses):
    time, and how much of it the GPU is busy (its kernels' time from torch.profiler over the step's wall time).
    A small model's LoRA step can wait for the host that issues its layers: this says where the e2e part's
    LoRA / full ratio comes from."""
    from torch.profiler import ProfilerActivity, profile
    from transformers import LlamaConfig

    batch, seq = (2, 32) if args.quick else (16, 256)
    n = 2 if args.quick else 10
    cfg = LlamaConfig(**(E2E_QUICK if args.quick else E2E_SIZES)["95m"], vocab_size=8000,
                      attn_implementation="sdpa")
    base = build_llama(cfg, device)
    ids = token_ids(cfg, batch, seq, device)
    specs = [("full", None), ("floor", None), ("peft", 0.05), ("lorafit", 0.05), ("peft", 0.0), ("lorafit", 0.0)]
    keys = [kind if dropout is None else f"{kind} (dropout {dropout:g})" for kind, dropout in specs]

    def prepare(kind: str, dropout: float | None) -> Callable[[], None]:
        model = make_variant(base, kind, dropout)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4,
                                fused=device.type == "cuda")

        def step() -> None:
            model(input_ids=ids, labels=ids).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        for _ in range(3):
            step()
        triton_warmup.wait()
        return step

    steps = {}
    for key, (kind, dropout) in zip(keys, specs):
        step = attempt(f"step95m: {key}", lambda: prepare(kind, dropout))
        if step is not None:
            steps[key] = step
    times = rounds({k: (lambda step=step: timed(step, device)) for k, step in steps.items()}, n, 0, "step95m")
    busy_s = {}
    for key, step in steps.items():
        sync(device)
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(3):
                step()
            sync(device)
        busy_s[key] = sum(getattr(e, "self_device_time_total", 0) for e in prof.key_averages()) / 3e6
    rows = []
    for key in keys:
        busy = busy_s.get(key)
        share = f"{busy / median(times[key]):.0%}" if busy is not None and key in times else ""
        rows.append([key, ms(times, key, ".1f"), vs(times, key, "full"), vs(times, key, "floor"),
                     vs(times, key, key.replace("lorafit", "peft")) if key.startswith("lorafit") else "",
                     "" if busy is None else f"{1000 * busy:.1f}", share])
    report(f"Training step, the e2e part's 94M Llama ({sum(p.numel() for p in base.parameters()) / 1e6:.0f}M "
           f"params, random), bf16, batch {batch} x {seq}, LoRA r={R} on 7 targets, {n} interleaved rounds",
           table(rows, ["variant", "median ms [IQR]", "x full", "x floor", "x PEFT", "GPU busy ms", "busy"]),
           "GPU busy: the step's kernels, summed (torch.profiler, 3 steps, after the timed rounds), over its median "
           "wall time; the rest of the step the GPU waits for the host to issue work. AdamW fused for all.")
    return {"batch": [batch, seq], "times_s": times, "median_s": {k: median(v) for k, v in times.items()},
            "gpu_busy_s": busy_s}


def products_bound(out: Path, floor: list[float] | None, quick: bool) -> dict | None:
    """The floor plus what the products LoRA needs cost alone (benchmarks.kernels_gpu's per-layer rows in the
    same OUT, summed over the model's adapted layers): the least step time a LoRA built of dense products can
    reach at this shape, as a ratio to the floor. Printed where gpu.sh ran kernels_gpu first."""
    from benchmarks import kernels_gpu

    path = out / "kernels_gpu.json"
    if quick or not floor or not path.exists():
        return None
    sums = kernels_gpu.model_sums(json.loads(path.read_text()))
    floor_ms = median(floor) * 1e3
    added = sums["products LoRA adds, cuBLAS, each alone"]
    bound = {"floor_ms": floor_ms, "added_ms": added, "x_floor": (floor_ms + added) / floor_ms,
             "lorafit_p0_layers_add_ms": sums["lorafit p=0.0"] - sums["floor"],
             "lorafit_p005_layers_add_ms": sums["lorafit p=0.05"] - sums["floor"]}
    report("The least a LoRA step of dense products can take at this shape",
           f"floor {floor_ms:.1f} ms + the products LoRA adds (each alone, cuBLAS, summed over the adapted layers, "
           f"from {path.name}) {added:.1f} ms = **{bound['x_floor']:.3f}x floor**; lorafit's adapted layers alone "
           f"add {bound['lorafit_p0_layers_add_ms']:.1f} ms (dropout 0) and {bound['lorafit_p005_layers_add_ms']:.1f}"
           " ms (dropout 0.05) there.")
    return bound


# -- part 2: inference ------------------------------------------------------------------------------

def part_infer(args, device: torch.device) -> dict:
    batch, seq = (2, 32) if args.quick else (32, 256)
    warm, n = (1, 2) if args.quick else (2, 15)
    cfg = llama_config(args.quick)
    base = build_llama(cfg, device).eval()
    ids = token_ids(cfg, batch, seq, device)
    # init_lora_weights=False: B is random, not zero, as in a trained adapter

    def merged():
        model = lorafit_lora(copy.deepcopy(base), init=False)
        lorafit.merge(model)
        return model

    builders = {"base": lambda: base, "lorafit unmerged": lambda: lorafit_lora(copy.deepcopy(base), init=False),
                "PEFT unmerged": lambda: peft_lora(copy.deepcopy(base), init=False),
                "lorafit merged (lorafit.merge)": merged}
    models = {k: m.eval() for k, b in builders.items() if (m := attempt(f"infer: {k}", b)) is not None}

    def forward(model):
        def run() -> None:
            with torch.inference_mode():
                model(input_ids=ids)
        return lambda: timed(run, device)

    times = rounds({k: forward(m) for k, m in models.items()}, n, warm, "infer")
    rows = [[k, ms(times, k), vs(times, k, "base", iqr=True)] for k in builders]
    report(f"Inference forward, same shape ({cfg.num_hidden_layers} layers), batch {batch} x {seq}, "
           f"inference_mode, one r={R} adapter on 7 targets, {n} interleaved rounds",
           table(rows, ["model", "median ms [IQR]", "x base [IQR]"]))
    return {"batch": [batch, seq], "times_s": times, "median_s": {k: median(v) for k, v in times.items()}}


# -- part 3: a batch that mixes adapters ----------------------------------------------------------------

def part_mixed(args, device: torch.device) -> dict:
    batch, seq = (4, 32) if args.quick else (32, 256)
    warm, n = (1, 2) if args.quick else (2, 10)
    cfg = llama_config(args.quick)
    base = build_llama(cfg, device).eval()
    ids = token_ids(cfg, batch, seq, device)
    names = [f"a{i}" for i in range(batch)]  # row i on adapter i: as many distinct adapters as rows
    attach_s = {}

    def attached(tool: str, add: Callable):
        model, start = copy.deepcopy(base), time.perf_counter()
        for name in names:
            model = add(model, init=False, name=name)
        attach_s[tool] = time.perf_counter() - start
        return model.eval()

    lf = attempt("mixed: lorafit adapters", lambda: attached("lorafit", lorafit_lora))
    pf = attempt("mixed: PEFT adapters", lambda: attached("PEFT", peft_lora))

    def plain() -> None:
        with torch.inference_mode():
            base(input_ids=ids)

    def per_row() -> None:  # what a server does per request batch: set the rows up, run the forward
        with torch.inference_mode(), lorafit.adapter_per_row(lf, names):
            lf(input_ids=ids)

    def forward_alone() -> float:  # the same, timing only the forward inside the block
        with torch.inference_mode(), lorafit.adapter_per_row(lf, names):
            return timed(lambda: lf(input_ids=ids), device)

    def peft_rows() -> None:
        with torch.inference_mode():
            pf(input_ids=ids, adapter_names=names)

    variants = {"base model": lambda: timed(plain, device),
                "lorafit adapter_per_row: set-up + forward": lambda: timed(per_row, device),
                "lorafit forward alone, inside the block": forward_alone,
                "PEFT adapter_names=": lambda: timed(peft_rows, device)}
    runnable = {k: f for k, f in variants.items() if (lf if k.startswith("lorafit") else pf if k.startswith("PEFT")
                                                      else base) is not None}
    times = rounds(runnable, n, warm, "mixed")
    rows = [[k, ms(times, k), vs(times, k, "base model", iqr=True)] for k in variants]
    report(f"Mixed-adapter batch: {len(names)} distinct adapters (r={R}, 7 targets, random B), row i on adapter i, "
           f"batch {batch} x {seq}, inference_mode, {n} interleaved rounds",
           table(rows, ["variant", "median ms [IQR]", "x base [IQR]"]),
           f"Attaching {len(names)} adapters took " + ", ".join(f"{v:.1f} s with {k}" for k, v in attach_s.items())
           + " (PEFT: add_adapter, bf16).")
    return {"batch": [batch, seq], "adapters": len(names), "attach_s": attach_s,
            "times_s": times, "median_s": {k: median(v) for k, v in times.items()}}


# -- part: mixture of experts ---------------------------------------------------------------------------

def part_moe(args, device: torch.device) -> dict:
    from benchmarks import moe

    batch, seq = (2, 16) if args.quick else (8, 1024)
    warm, n = (1, 2) if args.quick else (2, 8)
    variants, peaks, counts = {}, {}, {}
    for kind in moe.KINDS:
        model = attempt(f"moe: {kind}", lambda kind=kind: moe.variant(kind, "quick" if args.quick else "gpu",
                                                                      torch.bfloat16, device))
        if model is None:
            continue
        ids = token_ids(model.config, batch, seq, device)
        step = moe.stepper(model, ids)
        peaks[kind] = attempt(f"moe: {kind} memory", lambda step=step: step_bytes(step, device))
        counts[kind] = trainable(model)
        variants[kind] = lambda step=step: timed(step, device)
    times = rounds(variants, n, warm, "moe")
    rows = [[k, f"{counts.get(k, 0):,}", ms(times, k), vs(times, k, "floor"), vs(times, k, "PEFT"),
             gib(peaks.get(k))] for k in moe.KINDS]
    report(f"Mixture of experts: LoRA r=16 on every expert stack (target_parameters), random Mixtral "
           f"{'(quick)' if args.quick else 'hidden 2048, 32 experts of 1024, top 4, 4 layers'}, bf16, batch {batch} x "
           f"{seq}, {n} interleaved rounds",
           table(rows, ["variant", "trainable", "median ms [IQR]", "x floor", "x PEFT", "step GiB"]),
           "step GiB: peak during a step above what was allocated before it. PEFT keeps each W + s B A from forward "
           "to backward; lorafit forms it again in backward.")
    return {"batch": [batch, seq], "times_s": times, "median_s": {k: median(v) for k, v in times.items()},
            "step_bytes": peaks, "trainable": counts}


# -- part 4: lorafit train, end to end ----------------------------------------------------------------------

def alpaca_rows(data: str | None) -> list[dict]:
    candidates = [Path(data), ROOT / data] if data else [ROOT / ".gpu_data", ROOT.parent / "shared" / "data"]
    for folder in candidates:
        path = folder / "alpaca" / "train.jsonl"
        if path.is_file():
            return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    raise FileNotFoundError(f"alpaca/train.jsonl is in none of {[str(c) for c in candidates]} (--data DIR)")


def bpe_tokenizer(rows: list[dict], vocab_size: int):
    """A byte-level BPE trained on the rows themselves, as a transformers fast tokenizer (no download)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    texts = [r.get(k) or "" for r in rows for k in ("instruction", "input", "output")]
    tok.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>", "<pad>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>")


# The e2e models: the 94M one (8k vocabulary) and Llama-3.2-1B's layer shapes with the same vocabulary;
# --quick makes both tiny (two sizes still, so that the dry run takes every path).
E2E_SIZES = {
    "95m": dict(hidden_size=1024, num_hidden_layers=8, num_attention_heads=16, num_key_value_heads=4,
                intermediate_size=2304),
    "1b": dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
               intermediate_size=8192),
}
E2E_QUICK = {"95m": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         intermediate_size=128),
             "1b": dict(hidden_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                        intermediate_size=192)}
E2E_EPOCHS = {"95m": 2, "1b": 1}  # one epoch at the 1B shape: full fine-tuning's checkpoints are 6.6 GB each


def llama_dir(root: Path, tok, size: dict, device: torch.device) -> tuple[Path, int]:
    """A randomly initialised Llama of ``size`` with the tokenizer, saved in bf16 under root (initialised on the
    device: a billion parameters initialise in seconds there, in tens of seconds on the host)."""
    from transformers import LlamaConfig, LlamaForCausalLM, logging

    logging.set_verbosity_error()
    cfg = LlamaConfig(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id, tie_word_embeddings=False, max_position_embeddings=2048,
                      attn_implementation="sdpa", **size)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    root.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(root)
    tok.save_pretrained(root)
    n = sum(p.numel() for p in model.parameters())
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()  # the training runs are other processes: give them this one's memory back
    return root, n


RUN_CONFIG = """\
output_dir = "unused"
[model]
name = {model}
dtype = "bfloat16"
device = {device}
[data]
train = {train}
instruction_field = "instruction"
input_field = "input"
output_field = "output"
max_train_rows = {rows}
[task]
type = "causal_lm"
max_length = {max_length}
[lora]
r = 16
lora_alpha = 32
lora_dropout = 0.05
target_modules = "all-linear"
[train]
epochs = {epochs}
batch_size = 16
lr = 2e-4
warmup_ratio = 0.05
log_every = 5
seed = 0
"""


def part_e2e(args, device: torch.device) -> dict:
    """`lorafit train`, full fine-tuning then LoRA, on each model of --e2e-models; then LoRA with train.bf16 on
    the first model (mixed precision: float32 adapters against the default's bfloat16 ones on float32 masters,
    time and loss); with --e2e-compile, last, LoRA with train.compile on the first model. Each run is a fresh
    process, as a user runs it. The Triton cache starts empty for the first LoRA run and is kept for the later
    ones (what a user's later runs see): the first LoRA run's time includes compiling the kernels, the
    train.compile run's includes inductor's compile."""
    rows = alpaca_rows(args.data)
    models = [m.strip() for m in args.e2e_models.split(",") if m.strip()]
    unknown = sorted(set(models) - set(E2E_SIZES))
    if unknown:
        raise ValueError(f"--e2e-models: unknown {unknown}; choose from {', '.join(E2E_SIZES)}")
    tmp = Path(tempfile.mkdtemp(prefix="lorafit-gpu-e2e-"))
    src = str(Path(lorafit.__file__).resolve().parents[1])  # the lorafit this process runs
    env = {**os.environ, "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join([src, *filter(None, [os.environ.get("PYTHONPATH")])]),
           "TRITON_CACHE_DIR": str(tmp / "cache" / "triton"),
           "TORCHINDUCTOR_CACHE_DIR": str(tmp / "cache" / "inductor")}
    methods = {"full": ["--method", "full", "--set", "train.lr=5e-5"], "LoRA": [],
               "LoRA, train.bf16 (float32 adapters)": ["--set", "train.bf16=true"],
               # --quick: aot_eager takes the same path without inductor's C++ compile of a CPU run
               "LoRA, train.compile": ["--set", "train.compile=true"]
               + (["--set", "train.compile_backend=aot_eager"] if args.quick else [])}
    plan = [(m, method) for m in models for method in ("full", "LoRA")]
    plan.append((models[0], "LoRA, train.bf16 (float32 adapters)"))
    if args.e2e_compile:  # last: the run a time limit may cut
        plan.append((models[0], "LoRA, train.compile"))
    results: dict = {}
    interrupted, sizes, configs, lora_runs = None, {}, {}, 0
    try:
        tok = bpe_tokenizer(rows, 1000 if args.quick else 8000)
        train = tmp / "train.jsonl"
        train.write_text("".join(json.dumps(r) + "\n" for r in rows))
        for model_name, method in plan:
            epochs = 1 if args.quick else E2E_EPOCHS[model_name]
            if model_name not in configs:
                size = (E2E_QUICK if args.quick else E2E_SIZES)[model_name]
                model_dir, sizes[model_name] = llama_dir(tmp / model_name, tok, size, device)
                configs[model_name] = tmp / f"{model_name}.toml"
                configs[model_name].write_text(RUN_CONFIG.format(
                    model=json.dumps(str(model_dir)), device=json.dumps(device.type), train=json.dumps(str(train)),
                    rows=48 if args.quick else len(rows), max_length=128 if args.quick else 512, epochs=epochs))
            name = f"{model_name}: {method}"
            if method != "full":
                name += ", Triton cache " + ("empty" if lora_runs == 0 else "warm")
                lora_runs += 1
            out = tmp / f"run-{len(results)}"
            cmd = [sys.executable, "-m", "lorafit", "train", str(configs[model_name]), "--output-dir", str(out),
                   "--no-progress", *methods[method]]
            start = time.perf_counter()
            try:
                proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True,
                                      timeout=180 if args.quick else 400)
            except KeyboardInterrupt:  # gpu.sh's time limit: report the runs that finished
                interrupted = name
                raise
            wall = time.perf_counter() - start
            if proc.returncode != 0:
                results[name] = {"error": proc.stderr[-3000:]}
                print(f"\n#### e2e: {name}: FAILED (exit {proc.returncode})\n\n{proc.stdout[-1500:]}\n"
                      f"{proc.stderr[-3000:]}", flush=True)
                PROBLEMS.append(f"e2e: {name}: exit {proc.returncode}: "
                                f"{(proc.stderr.strip().splitlines() or [''])[-1][:300]}")
                continue
            shutil.rmtree(out / "checkpoints", ignore_errors=True)  # a full 1B run's are gigabytes
            s = json.loads((out / "summary.json").read_text())
            losses = [m["loss"] for m in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
                      if m.get("type") == "train"]
            results[name] = {"model": model_name, "method": method, "epochs": epochs, "wall_s": wall,
                             "train_s": s["train_time_s"], "tokens_per_s": s["train_tokens_per_s"],
                             "peak_bytes": s["peak_memory_bytes"], "peak_method": s["peak_memory_method"],
                             "trainable": s["params"]["trainable"], "steps": s["steps"],
                             "loss_first": losses[0] if losses else None,
                             "loss_last": losses[-1] if losses else None}
    except KeyboardInterrupt:
        interrupted = interrupted or "setting up a model"
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if not results:
        raise KeyboardInterrupt

    def x_full(r: dict, key: str) -> str:
        full = results.get(f"{r['model']}: full", {})
        return f"{r[key] / full[key]:.2f}" if key in full and r["method"] != "full" else ""

    body = [[k, "FAILED (see above)"] + [""] * 8 if "error" in r else
            [k, f"{sizes[r['model']] / 1e6:,.1f}M", f"{r['wall_s']:.1f}", x_full(r, "wall_s"), f"{r['train_s']:.1f}",
             x_full(r, "train_s"), f"{r['tokens_per_s']:,.0f}",
             "n/a" if r["peak_bytes"] is None else f"{r['peak_bytes'] / GiB:.2f}", f"{r['trainable']:,}",
             f"{r['loss_first']:.2f} -> {r['loss_last']:.2f}" if r["loss_first"] else ""]
            for k, r in results.items()]
    method = next((r["peak_method"] for r in results.values() if "peak_method" in r), "n/a")
    epochs = ", ".join(f"{m} {1 if args.quick else E2E_EPOCHS[m]}" for m in models)
    report(f"lorafit train end to end: Alpaca {48 if args.quick else len(rows)} rows, batch 16, random Llamas, bf16 "
           f"weights, on {device.type} (epochs: {epochs})",
           table(body, ["run", "params", "command s", "x full", "loop s", "loop x full", "train tok/s", "peak GiB",
                        "trainable", "loss first -> last"]),
           f"command s: the whole `python -m lorafit train` process (start-up, loading, tokenizing, training, "
           f"checkpoints, saving); loop s: the training loop, summary.json's train_time_s (checkpoints included). "
           f"peak: {method} from summary.json. Full fine-tuning at lr 5e-5, LoRA (all-linear, r=16, dropout 0.05) at "
           f"2e-4; train.bf16: that LoRA under bf16 autocast with float32 adapters (the default trains bfloat16 "
           f"adapters on the bfloat16 weights, AdamW stepping on float32 masters of them). The 1B rows have "
           f"Llama-3.2-1B's layer shapes with an 8k vocabulary. "
           f"train.compile: each decoder block under torch.compile (inductor), its compile time included."
           + (f" INTERRUPTED during '{interrupted}' (time limit): later runs missing." if interrupted else ""))
    return {"model_params": sizes, "results": results, "interrupted": interrupted}


# -- the driver ---------------------------------------------------------------------------------------

def versions(device: torch.device) -> dict:
    import peft
    import transformers

    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"

    def git(*cmd: str) -> str | None:
        try:
            proc = subprocess.run(["git", *cmd], cwd=ROOT, capture_output=True, text=True, timeout=20)
            return proc.stdout.strip() if proc.returncode == 0 else None
        except (OSError, subprocess.SubprocessError):
            return None

    commit = git("rev-parse", "HEAD") or "unknown"
    dirty = git("status", "--porcelain", "--untracked-files=no")
    return {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "torch": torch.__version__, "cuda": torch.version.cuda, "transformers": transformers.__version__,
            "peft": peft.__version__, "triton": triton_version, "lorafit": lorafit.__version__,
            "commit": commit + (" (+ uncommitted changes)" if dirty else ""), "python": sys.version.split()[0]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.gpu", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny shapes, every code path, well under a minute")
    ap.add_argument("--out", default="gpu_results", help="folder for gpu.json (default ./gpu_results)")
    ap.add_argument("--only", action="append", help=f"comma-separated parts to run: {','.join(PARTS)} (repeatable)")
    ap.add_argument("--e2e-models", default="95m,1b", help="e2e part: comma-separated models to train "
                                                            "(95m, 1b; default both)")
    ap.add_argument("--e2e-compile", action=argparse.BooleanOptionalAction, default=True,
                    help="e2e part: also a LoRA run with train.compile on the first model (default on)")
    ap.add_argument("--data", default=None, help="folder holding alpaca/train.jsonl (default: .gpu_data in the "
                                                 "repository, else ../shared/data)")
    args = ap.parse_args(argv)
    parts = [p.strip() for o in args.only or [",".join(PARTS)] for p in o.split(",") if p.strip()]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        ap.error(f"--only: unknown part(s) {unknown}; choose from {', '.join(PARTS)}")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    meta = versions(device)
    print(f"# lorafit GPU benchmark{' (--quick: a dry run, numbers mean nothing)' if args.quick else ''}, "
          f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n\n" + ", ".join(f"{k}: {v}" for k, v in meta.items()), flush=True)
    results: dict = {"meta": meta, "quick": args.quick}
    failed, elapsed = [], {}
    for part in parts:
        start = time.perf_counter()
        try:
            results[part] = globals()[f"part_{part}"](args, device)
        except KeyboardInterrupt:  # gpu.sh's time limit (SIGINT): skip the rest, still print what there is
            print(f"\n### {part}: INTERRUPTED", flush=True)
            results[part] = {"error": "interrupted (SIGINT: gpu.sh's time limit?)", "interrupted": "the part"}
        except Exception:  # noqa: BLE001 - one broken part must not cost the others their numbers
            text = traceback.format_exc()
            print(f"\n### {part}: FAILED\n\n{text}", flush=True)
            results[part] = {"error": text}
            failed.append(f"{part}: {text.strip().splitlines()[-1][:300]}")
        elapsed[part] = time.perf_counter() - start
        results[part]["elapsed_s"] = elapsed[part]
        results["problems"] = PROBLEMS
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        (out_dir / "gpu.json").write_text(json.dumps(results, indent=1, default=str))
        if results[part].get("interrupted"):
            failed.append(f"{part}: interrupted during {results[part]['interrupted']!r}; later parts not run")
            break
    print("\n## Summary\n\n" + ", ".join(f"{k}: {v}" for k, v in meta.items()) + "\n"
          + "".join(SUMMARY) + "\nseconds per part: " + ", ".join(f"{k} {v:.0f}" for k, v in elapsed.items())
          + (("\n\nFAILED parts (tracebacks above):\n" + "\n".join(failed)) if failed else "\n\nall parts ran")
          + ("\nFAILED variants (tracebacks above):\n" + "\n".join(PROBLEMS) if PROBLEMS else "")
          + f"\nfull results: {out_dir / 'gpu.json'}", flush=True)
    return 1 if failed or PROBLEMS else 0


if __name__ == "__main__":
    import atexit

    atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)
    sys.exit(main())
