"""Greedy generations of a causal-LM run's validation prompts, without and with its adapter.

    python examples/compare_generations.py runs/alpaca-smollm2-lora --rows 3 --max-new-tokens 48
"""

from __future__ import annotations

import argparse

import lorafit
from lorafit.train.run import encode_split, load_run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir")
    parser.add_argument("--rows", type=int, default=3)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    args = parser.parse_args()
    prep = load_run(args.run_dir, [f"task.max_new_tokens={args.max_new_tokens}"], None)
    if prep.config.task.type == "classification":
        raise SystemExit("this run is a classifier; nothing to generate")
    rows = [f for f in encode_split(prep, "validation") if "prompt_ids" in f][: args.rows]
    prompts = [f["prompt_ids"] for f in rows]
    model, task = prep.model, prep.task

    def generate():
        from contextlib import nullcontext

        return task.generate(model, prompts, prep.device, 8, nullcontext)

    adapted = generate()
    with lorafit.disabled(model):
        base = generate()
    changed = 0
    for f, b, a in zip(rows, base, adapted):
        changed += b != a
        print("=" * 80)
        print("PROMPT:", prep.tokenizer.decode(f["prompt_ids"], skip_special_tokens=True)[-300:])
        print("-- base model:\n" + b)
        print("-- with adapter:\n" + a)
        references = f["reference"] if isinstance(f["reference"], list) else [f["reference"]]  # several per row
        for reference in references:
            print("-- reference:\n" + reference[:300])
    print("=" * 80)
    print(f"{changed} of {len(rows)} generations changed by the adapter")


if __name__ == "__main__":
    main()
