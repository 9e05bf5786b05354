"""Data at scale: time to the first training step and peak memory, small vs large training files.

    python -m benchmarks.data_scale                    # minilm classification and smollm2-135m causal LM
    python -m benchmarks.data_scale --tasks classification --rows 10000 1000000

For each task, synthetic short-text JSONL files of each size are written once (under --dir), then `lorafit train`
runs 5 steps on each in a fresh subprocess: the first time with an empty data cache, and for the largest file a
second time, reading the Arrow copy and the tokens back from the cache. Each subprocess reports the seconds
from its start to the first step (imports, reading, tokenizing, model loading) and its own peak RSS
(ru_maxrss). Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import subprocess
import sys
from pathlib import Path

WORDS = ["the", "movie", "was", "great", "bad", "slow", "fast", "funny", "dull", "plot", "actor", "scene", "story",
         "music", "ending", "long", "short", "loved", "hated", "boring", "brilliant", "dark", "light", "warm", "cold",
         "simple", "clever", "odd", "fine", "weak", "strong", "quiet", "loud"]
MODELS = {"classification": "minilm", "causal_lm": "smollm2-135m"}

CHILD = r"""
import json, resource, sys, time
start = time.perf_counter()
from lorafit.train import loop, run
first = []
real_fit = loop.fit
def fit(*args, **kwargs):
    first.append(time.perf_counter() - start)
    return real_fit(*args, **kwargs)
run.fit = fit
run.train(sys.argv[1], progress=False)
print("RESULT " + json.dumps({"before_first_step_s": first[0], "wall_s": time.perf_counter() - start,
                              "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def sentence(rng: random.Random, lo: int, hi: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))


def write_data(path: Path, task: str, rows: int, seed: int = 0) -> Path:
    if path.is_file():
        return path
    rng = random.Random(seed)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w") as fh:
        for _ in range(rows):
            if task == "classification":
                row = {"text": sentence(rng, 4, 20), "label": rng.choice(("pos", "neg"))}
            else:
                row = {"instruction": "Describe the film in a few words.", "input": sentence(rng, 4, 16),
                       "output": sentence(rng, 3, 12)}
            fh.write(json.dumps(row) + "\n")
    tmp.rename(path)
    return path


def config_text(task: str, data: Path, out: Path, cache: Path) -> str:
    fields = ('text_field = "text"\nlabel_field = "label"' if task == "classification" else
              'instruction_field = "instruction"\ninput_field = "input"\noutput_field = "output"')
    targets = '["query", "value"]' if task == "classification" else '["q_proj", "v_proj"]'
    return f"""output_dir = "{out}"
[model]
name = "{MODELS[task]}"
[data]
train = "{data}"
cache_dir = "{cache}"
{fields}
[task]
type = "{task}"
max_length = 64
[lora]
r = 8
target_modules = {targets}
[train]
max_steps = 5
batch_size = 16
"""


def run_once(task: str, data: Path, work: Path, cache: Path, label: str) -> dict:
    out = work / f"run-{task}-{label}"
    shutil.rmtree(out, ignore_errors=True)
    cfg = work / f"{task}-{label}.toml"
    cfg.write_text(config_text(task, data, out, cache))
    proc = subprocess.run([sys.executable, "-c", CHILD, str(cfg)], capture_output=True, text=True, check=False)
    if proc.returncode:
        raise RuntimeError(f"{label}: lorafit train failed:\n{proc.stderr[-3000:]}")
    line = next(line for line in proc.stdout.splitlines() if line.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--rows", nargs="+", type=int, default=[10_000, 1_000_000])
    parser.add_argument("--dir", default="/tmp/lorafit-data-scale", help="data files, cache and runs")
    args = parser.parse_args(argv)
    work = Path(args.dir)
    work.mkdir(parents=True, exist_ok=True)
    lines = ["| task (model) | rows | data cache | before first step | peak RSS |", "|---|---:|---|---:|---:|"]
    for task in args.tasks:
        results = []
        for rows in args.rows:
            data = write_data(work / f"{task}-{rows}.jsonl", task, rows)
            cache = work / f"cache-{task}-{rows}"
            shutil.rmtree(cache, ignore_errors=True)
            runs = [("empty", run_once(task, data, work, cache, f"{rows}-cold"))]
            if rows == max(args.rows):
                runs.append(("warm (2nd run)", run_once(task, data, work, cache, f"{rows}-warm")))
            for state, r in runs:
                results.append((rows, state, r))
                lines.append(f"| {task} ({MODELS[task]}) | {rows:,} | {state} | {r['before_first_step_s']:.1f} s | "
                             f"{r['peak_rss_mib']:,.0f} MiB |")
                print(lines[-1], flush=True)
        small = results[0][2]
        big_cold = next(r for n, s, r in results if n == max(args.rows) and s == "empty")
        big_warm = next(r for n, s, r in results if n == max(args.rows) and s != "empty")
        print(f"{task}: peak RSS {max(args.rows):,} / {min(args.rows):,} rows = "
              f"{big_cold['peak_rss_mib'] / small['peak_rss_mib']:.2f}x (goal <= 1.5x); warm / cold time before "
              f"the first step = {big_warm['before_first_step_s'] / big_cold['before_first_step_s']:.1%} "
              "(goal <= 10%)", flush=True)
    print("\n" + "\n".join(lines))


if __name__ == "__main__":
    main()
