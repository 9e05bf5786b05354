"""What a preference, KTO or GRPO run changed in what the model writes: sampled answers to the run's prompt, without and
with its adapter, scored by a sentiment classifier (a lorafit classification run on SST-2).

    lorafit train examples/sst2_minilm.toml --output-dir runs/sst2-minilm-lora       # the judge
    python examples/dpo_steering.py runs/dpo-sst2-smollm2 --judge runs/sst2-minilm-lora --samples 64

The prompt is the run's ``data.instruction`` through the model's chat template, as training rendered it. The
same seeds sample the base model (the adapter switched off; for a fully fine-tuned run, the model it started
from) and the trained one (temperature 1, top-p 1, up to
``--max-new-tokens``), and the judge's probability of its positive class (``--positive``, SST-2's "1") is
averaged; an answer counts as positive where that probability is over 0.5. Prints one row per model and
writes OUT/generations.jsonl when ``--out`` is given.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

import lorafit
from lorafit.chat import render
from lorafit.train.rewards import run_scorer
from lorafit.train.run import load_run


def sample(prep, prompt_ids: list[int], count: int, max_new_tokens: int, seed: int, batch: int) -> list[str]:
    model, tok = prep.model, prep.tokenizer
    out = []
    for start in range(0, count, batch):
        rows = min(batch, count - start)
        torch.manual_seed(seed + start)
        ids = torch.tensor([prompt_ids] * rows, device=prep.device)
        with torch.no_grad():
            gen = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True,
                                 temperature=1.0, top_p=1.0, max_new_tokens=max_new_tokens,
                                 pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
        out += [tok.decode(g[len(prompt_ids):], skip_special_tokens=True).strip() for g in gen]
    return out


def judge(run_dir: str, positive: str):
    """What gives each text the judge's probability of its class ``positive``: the classification run's scorer
    that GRPO's rewards use (lorafit.train.rewards)."""
    try:
        score = run_scorer(run_dir, positive)
    except ValueError as exc:
        raise SystemExit(f"--positive: {exc}") from None
    return lambda texts: score([[]] * len(texts), texts, [None] * len(texts))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir")
    parser.add_argument("--judge", required=True, help="a lorafit classification run (its adapter is the judge)")
    parser.add_argument("--positive", default="1", help="the judge's positive class (default: SST-2's 1)")
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--max-new-tokens", type=int, default=40)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    prep = load_run(args.run_dir, None, None)
    kind = prep.config.task.type
    if kind not in ("preference", "kto", "grpo") or not prep.config.data.instruction:
        raise SystemExit(f"{args.run_dir}: a preference, kto or grpo run with a fixed data.instruction (its prompt) "
                         "is needed")
    method = prep.config.task.preference_loss if kind == "preference" else kind
    full = prep.config.train.method == "full"
    base_name = "base model" + ("" if full else " (adapter off)")
    adapted_name = f"fine-tuned with {method.upper()}" if full else f"with the {method.upper()} adapter"
    prompt = render(prep.tokenizer, [{"role": "user", "content": prep.config.data.instruction}],
                    generation_prompt=True)
    prompt_ids = prep.tokenizer(prompt, add_special_tokens=False)["input_ids"]
    adapted = sample(prep, prompt_ids, args.samples, args.max_new_tokens, args.seed, args.batch)
    if full:  # the model the run started from, loaded anew
        del prep.model
        base = sample(load_run(args.run_dir, None, None, base=True), prompt_ids, args.samples, args.max_new_tokens,
                      args.seed, args.batch)
    else:
        with lorafit.disabled(prep.model):
            base = sample(prep, prompt_ids, args.samples, args.max_new_tokens, args.seed, args.batch)
    positive_probability = judge(args.judge, args.positive)
    print(f"prompt: {prep.config.data.instruction!r}; {args.samples} samples each, judged by {args.judge}")
    print(f"| model | positive answers | mean P({args.positive}) |\n|---|---:|---:|")
    rows = []
    for name, texts in ((base_name, base), (adapted_name, adapted)):
        probs = positive_probability(texts)
        share = sum(p > 0.5 for p in probs) / len(probs)
        print(f"| {name} | {100 * share:.1f} % | {sum(probs) / len(probs):.3f} |")
        rows += [{"model": name, "text": t, "p_positive": p} for t, p in zip(texts, probs)]
    for name in (base_name, adapted_name):
        print(f"-- {name}, first 3:")
        for row in [r for r in rows if r["model"] == name][:3]:
            print(f"   {row['p_positive']:.2f}  {row['text'][:160]!r}")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "generations.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


if __name__ == "__main__":
    main()
