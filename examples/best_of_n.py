"""Best-of-n sampling with a reward model: n answers to a prompt from a policy, the one a lorafit reward model
scores highest kept, every answer judged by a sentiment classifier.

    python examples/best_of_n.py runs/dpo-sst2-smollm2 --reward runs/reward-sst2-smollm2 \\
        --judge runs/sst2-judge --n 4 --samples 64

The policy run's prompt (its ``data.instruction``, through the chat template) is answered ``--n`` times for each
of ``--samples`` draws (temperature 1), by the policy's base model (its adapter switched off) and by the adapted
one. The reward run's model scores each (prompt, answer) conversation rendered as its training rendered them
(lorafit.chat); the judge (a lorafit classification run on SST-2) gives each answer's probability of being
positive. Printed per policy model: the judged-positive share and mean probability of the first answer of each
draw (no selection), of the reward model's pick and of its lowest-scored answer, and of the judge's own pick
(what a perfect reward model would reach).
"""

from __future__ import annotations

import argparse
import contextlib
from pathlib import Path

from dpo_steering import judge, sample

import lorafit
from lorafit.chat import render
from lorafit.train.config import load_config
from lorafit.train.rewards import run_scorer
from lorafit.train.run import CONFIG_FILE, load_run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("policy", help="a preference, kto or causal_lm run with a fixed data.instruction")
    parser.add_argument("--reward", required=True, help="a lorafit reward run (task.type = 'reward')")
    parser.add_argument("--judge", required=True, help="a lorafit classification run (its adapter is the judge)")
    parser.add_argument("--positive", default="1", help="the judge's positive class (default: SST-2's 1)")
    parser.add_argument("--n", type=int, default=4, help="answers per draw (default: 4)")
    parser.add_argument("--samples", type=int, default=64, help="draws (default: 64)")
    parser.add_argument("--max-new-tokens", type=int, default=40)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.n < 2:
        parser.error("--n must be at least 2")
    policy = load_run(args.policy, None, None)
    if not policy.config.data.instruction:
        raise SystemExit(f"{args.policy}: a run with a fixed data.instruction (its prompt) is needed")
    kind = load_config(Path(args.reward) / CONFIG_FILE).task.type
    if kind != "reward":
        raise SystemExit(f"{args.reward}: a reward run (task.type = 'reward') is needed, got {kind!r}")
    reward = run_scorer(args.reward, None)  # conversations encoded as the reward run's training encoded them
    positive_probability = judge(args.judge, args.positive)
    prompt = [{"role": "user", "content": policy.config.data.instruction}]
    prompt_ids = policy.tokenizer(render(policy.tokenizer, prompt, generation_prompt=True),
                                  add_special_tokens=False)["input_ids"]
    lora = policy.config.train.method == "lora"
    models = [("base model (adapter off)", lorafit.disabled(policy.model))] if lora else []
    models.append(("the policy run's model" + (" (adapter on)" if lora else ""), contextlib.nullcontext()))
    print(f"prompt: {policy.config.data.instruction!r}; {args.samples} draws of {args.n} answers, scored by "
          f"{args.reward}, judged by {args.judge}")
    print(f"| policy | answer kept | positive answers | mean P({args.positive}) |\n|---|---|---:|---:|")
    for name, switch in models:
        with switch:
            answers = sample(policy, prompt_ids, args.samples * args.n, args.max_new_tokens, args.seed, args.batch)
        scores = reward([prompt] * len(answers), answers, [None] * len(answers))
        judged = positive_probability(answers)
        draws = [range(i, i + args.n) for i in range(0, len(answers), args.n)]
        picks = {"first answer (no selection)": [d[0] for d in draws],
                 f"reward model's best of {args.n}": [max(d, key=scores.__getitem__) for d in draws],
                 f"reward model's worst of {args.n}": [min(d, key=scores.__getitem__) for d in draws],
                 f"judge's best of {args.n} (a perfect reward model)": [max(d, key=judged.__getitem__) for d in draws]}
        for kept, idx in picks.items():
            probs = [judged[i] for i in idx]
            print(f"| {name} | {kept} | {100 * sum(p > 0.5 for p in probs) / len(probs):.1f} % | "
                  f"{sum(probs) / len(probs):.3f} |")


if __name__ == "__main__":
    main()
