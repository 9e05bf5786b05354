"""The benchmark suite still runs (tiny models, no timing assertions: timings live in BENCHMARKS.md)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.side_by_side import ONE_THREAD, register

ROOT = Path(__file__).resolve().parents[1]


def _program(*args: str, seconds: float, key: str, data: bool = False) -> None:
    """A benchmark program, run side by side with the suite's other long checks; its result is (the finished
    process, its output directory)."""
    def prepare(tmp: Path):
        command = [sys.executable, "-m", *args, *(["--data", str(_alpaca(tmp))] if data else [])]
        command = [part.replace("{out}", str(tmp)) for part in command]
        env = {**os.environ, **ONE_THREAD}
        return lambda: (subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900,
                                       check=False), tmp)
    register(key, seconds, prepare)


def _alpaca(tmp: Path) -> Path:
    """The Alpaca rows of ../shared/data, or a few made-up rows, which do for a dry run."""
    data = ROOT.parent / "shared" / "data"
    if (data / "alpaca" / "train.jsonl").is_file():
        return data
    data = tmp / "data"
    (data / "alpaca").mkdir(parents=True)
    rows = [{"instruction": f"Count to {i}.", "input": "", "output": " ".join(map(str, range(i)))}
            for i in range(1, 65)]
    (data / "alpaca" / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return data


# the quick suite in two halves of about 200 s each: two checks pack beside the suite better than one long one
QUICK_HALVES = (("train", "amp", "host", "compile", "memory", "infer", "load", "smollm", "padding", "qlora", "mixed",
                 "serve", "serve_generate", "ddp", "e2e", "adapter_dtype"),
                ("moe", "tokens", "optimizer", "inits", "loftq", "arrow", "dpo", "dpo_precomputed", "reward", "grpo"))
for _i, _parts in enumerate(QUICK_HALVES):
    _program("benchmarks", "--quick", "--json", "{out}/bench.json", *(f"--only={p}" for p in _parts), seconds=250,
             key=f"bench:quick-{_i}")
_program("benchmarks.gpu", "--quick", "--out", "{out}", seconds=120, key="bench:gpu-quick", data=True)
_program("benchmarks.kernels_gpu", "--quick", "--out", "{out}", seconds=20, key="bench:kernels-quick")


@pytest.mark.side_by_side("bench:quick-0")
@pytest.mark.side_by_side("bench:quick-1")
def test_quick_benchmark_suite_runs(side_by_side):
    pytest.importorskip("peft")
    from benchmarks.__main__ import PARTS

    assert sorted(QUICK_HALVES[0] + QUICK_HALVES[1]) == sorted(PARTS)
    stdout, data = "", {}
    for key in ("bench:quick-0", "bench:quick-1"):
        proc, tmp = side_by_side[key].result()
        assert proc.returncode == 0, proc.stderr[-3000:]
        stdout += proc.stdout
        data.update(json.loads((tmp / "bench.json").read_text()))
    for title in ("Training step", "Training step under bf16 autocast", "Host time per adapted layer",
                  "Host time per adapted layer with dropout", "Triton compile time", "Peak RSS", "Inference",
                  "Loading an r=8 adapter", "SmolLM2", "SST-2", "QLoRA", "Mixed-adapter batch",
                  "lorafit serve load test", "hot-load latency", "lorafit serve with a quantized base",
                  "DDP gradient traffic",
                  "End to end: lorafit train on SST-2", "Adapters on bfloat16 weights", "Mixture of experts",
                  "Trainable token rows", "AdamW step: fused against foreach",
                  "Initialisations against the default", "LoftQ against QLoRA's start",
                  "Arrow routing, lorafit against PEFT", "Generation serving", "DPO step, lorafit against TRL",
                  "Reward-model step, lorafit against TRL", "GRPO step, lorafit against TRL"):
        assert title in stdout
    assert set(data) == set(PARTS)
    assert all(t > 0 for t in data["train"]["median_s"].values())
    assert all(t > 0 for t in data["amp"]["median_s"].values())
    assert all(t > 0 for t in data["host"]["median_s"].values())
    if "triton_us" in data["host"]:  # absent where this Triton's launch path cannot be stood in for: it says so
        assert len(data["host"]["triton_us"]) == 5 and all(t > 0 for t in data["host"]["triton_us"].values())
    else:
        assert "skipped: this Triton's launch path" in stdout
    assert len(data["compile"]["seconds"]) == 3 and all(t > 0 for ts in data["compile"]["seconds"].values() for t in ts)
    assert all(t > 0 for t in data["mixed"]["median_s"].values())
    assert data["serve"]["churn"]["failed"] == 0 and data["serve"]["1 adapters"]["failed"] == 0
    assert data["serve"]["quantize 4"]["failed"] == 0 and data["serve"]["quantize 4"]["req_per_s"] > 0
    generation = data["serve_generate"]["modes"]
    assert set(generation) == {"static", "continuous"} and all(m["tokens_per_s"] > 0 and m["p90_s"] >= 0
                                                               for m in generation.values())
    assert data["ddp"]["lora"]["bytes_per_step"] == 4 * data["ddp"]["lora"]["trainable"]
    assert data["ddp"]["full"]["bytes_per_step"] == 4 * data["ddp"]["full"]["trainable"]
    e2e = data["e2e"]["results"]
    assert all(r["train_s"] > 0 and r["peak_rss"] > 0 for runs in e2e.values() for r in runs)
    trainable = {name: runs[0]["trainable"] for name, runs in e2e.items()}
    full = trainable.pop("full fine-tuning")
    assert trainable and all(0 < n < full for n in trainable.values())  # the LoRA runs train a fraction
    runs = data["adapter_dtype"]
    assert len(runs["runs"]) == 3 and runs["untrained_eval_loss"] > 0
    assert all(r["eval_loss"] > 0 and r["train_s"] > 0 for r in runs["runs"].values())
    assert len(data["optimizer"]) == 4 and all(t > 0 for t in data["optimizer"].values())
    assert len(data["tokens"]["median_s"]) == 3 and all(b > 0 for b in data["tokens"]["kept_bytes"].values())
    inits = data["inits"]["runs"]
    assert len(inits) == 4
    assert all(loss > 0 for runs in inits.values() for r in runs for loss in r["eval_loss"].values())
    assert inits["EVA"][0]["ranks"] != inits["default (A random, B = 0)"][0]["ranks"]  # the ranks moved
    assert inits["LoRA-GA"][0]["ranks"] == "32 on every layer"  # saved as a plain LoRA of twice the rank
    arrow = data["arrow"]
    assert len(arrow["median_s"]) == 4 and all(m > 0 for m in arrow["median_s"].values())
    assert all(m >= 0 for m in arrow["forward_peak_mb"].values())
    loftq = data["loftq"]
    assert len(loftq["starts"]) == 3 and all(r["final_eval_loss"] > 0 for r in loftq["starts"].values())
    assert all(loss > 0 for r in loftq["trained"].values() for loss in r["eval_loss"].values())
    for part in ("dpo", "dpo_precomputed", "reward", "grpo"):  # TRL is not a dependency: skipped without it
        got = data[part]
        assert got == {"skipped": "trl is not installed"} or (got["lorafit"]["step_s"] > 0 and got["trl"]["step_s"] > 0)
    assert "skipped" in data["dpo_precomputed"] or data["dpo_precomputed"]["inline"]["step_s"] > 0
    moe = data["moe"]
    assert len(moe["median_s"]) == 6 and all(t > 0 for t in moe["median_s"].values())
    assert moe["trainable"]["lorafit, float32"] == moe["trainable"]["PEFT, float32"] > 0
    assert moe["kept_bytes"]["PEFT, float32"] > moe["kept_bytes"]["floor, float32"] > 0


@pytest.mark.side_by_side("bench:gpu-quick")
def test_quick_gpu_benchmark_runs(side_by_side):
    """benchmarks/gpu.py --quick: every part (step, step95m, infer, mixed, moe, lorafit train end to end) on tiny
    shapes."""
    pytest.importorskip("peft")
    pytest.importorskip("tokenizers")
    proc, out = side_by_side["bench:gpu-quick"].result()
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for title in ("Training step", "the e2e part's 94M Llama", "Inference forward", "Mixed-adapter batch",
                  "Mixture of experts",
                  "lorafit train end to end",
                  "## Summary", "all parts ran"):
        assert title in proc.stdout
    data = json.loads((out / "gpu.json").read_text())
    assert {"meta", "step", "step95m", "infer", "mixed", "moe", "e2e"} <= set(data)
    assert all(t > 0 for part in ("step", "step95m", "infer", "mixed", "moe") for t in data[part]["median_s"].values())
    assert len(data["step95m"]["median_s"]) == len(data["step95m"]["gpu_busy_s"]) == 6
    assert len(data["moe"]["median_s"]) == 3
    e2e = data["e2e"]["results"]
    assert e2e["95m: LoRA, train.compile, Triton cache warm"]["trainable"] == e2e["95m: LoRA, Triton cache empty"][
        "trainable"]
    for model in ("95m", "1b"):
        assert 0 < e2e[f"{model}: LoRA, Triton cache " + ("empty" if model == "95m" else "warm")]["trainable"] \
            < e2e[f"{model}: full"]["trainable"]


@pytest.mark.side_by_side("bench:kernels-quick")
def test_quick_kernels_gpu_benchmark_runs(side_by_side):
    """benchmarks/kernels_gpu.py --quick: the per-layer rows and both product orders, on small layers."""
    proc, tmp_path = side_by_side["bench:kernels-quick"].result()
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = json.loads((tmp_path / "kernels_gpu.json").read_text())
    assert len(rows) == 2
    for row in rows:
        for key in ("floor", "lorafit p=0.05", "peft-style p=0.05", "forward: base first", "forward: low-rank first",
                    "dx: base first", "dx: low-rank first", "products LoRA adds, cuBLAS, each alone"):
            assert row[key] > 0, key


def test_products_bound_sums_kernel_rows_over_the_model(tmp_path):
    """benchmarks.gpu's step part reads kernels_gpu.json from the same OUT: the floor plus the products LoRA adds,
    each shape counted as often as Llama-3.2-1B adapts it (2 q/o, 2 k/v, 2 gate/up, 1 down, 16 layers)."""
    from benchmarks import gpu

    added = {"q/o 2048->2048": 0.01, "k/v 2048->512": 0.002, "gate/up 2048->8192": 0.03, "down 8192->2048": 0.04}
    rows = [{"shape": shape, "floor": 1.0, "lorafit p=0.0": 1.5, "lorafit p=0.05": 2.0, "peft-style p=0.0": 1.0,
             "peft-style p=0.05": 1.0, "products LoRA adds, cuBLAS, each alone": ms} for shape, ms in added.items()]
    (tmp_path / "kernels_gpu.json").write_text(json.dumps(rows))
    bound = gpu.products_bound(tmp_path, [0.09, 0.1, 0.11], quick=False)
    per_layer = 2 * 0.01 + 2 * 0.002 + 2 * 0.03 + 0.04
    assert bound["added_ms"] == pytest.approx(16 * per_layer)
    assert bound["x_floor"] == pytest.approx((100 + 16 * per_layer) / 100)
    assert bound["lorafit_p0_layers_add_ms"] == pytest.approx(16 * 7 * 0.5)
    assert gpu.products_bound(tmp_path / "absent", [0.1], quick=False) is None
