"""Training-step time of LoRA variants on all-MiniLM-L6-v2, interleaved so machine load hits all alike.

    python examples/variant_step_time.py --threads 1 --reps 15

One optimizer step (forward, loss, backward, AdamW) on the same real SST-2 batch (32 training
sentences, padded to the longest) for: LoRA r=8 on a float32 base, on an NF4 base, on an int8 base,
and DoRA r=8 on a float32 base; targets query/key/value/dense plus the classifier head, as in
examples/sst2_minilm.toml. Every round runs each variant once, in a rotating order; the table gives
the median and the spread (min - max) per variant.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import statistics
import time

import torch

import lorafit
from lorafit.quantize import quantize_base
from lorafit.train.config import default_data_dir
from lorafit.train.models import load_model, load_tokenizer, resolve_model

VARIANTS = {  # name: (bits of the frozen base or 0, use_dora)
    "LoRA, float32 base": (0, False),
    "LoRA, NF4 base": (4, False),
    "LoRA, int8 base": (8, False),
    "DoRA, float32 base": (0, True),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    source = resolve_model("minilm")
    tokenizer = load_tokenizer(source)
    rows = [json.loads(line) for line in (default_data_dir() / "sst2" / "train.jsonl").open()][: args.batch]
    batch = tokenizer([r["text"] for r in rows], padding=True, truncation=True, max_length=64, return_tensors="pt")
    labels = torch.tensor([int(r["label"]) for r in rows])
    torch.manual_seed(0)
    base = load_model(source, "classification", "float32", [0, 1])

    steps = {}
    for name in args.variants:
        bits, dora = VARIANTS[name]
        model = copy.deepcopy(base).train()
        if bits:
            quantize_base(model, bits=bits, skip=("classifier",))
        torch.manual_seed(1)
        lorafit.attach(model, lorafit.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.1, use_dora=dora,
                                                 target_modules=["query", "key", "value", "dense"],
                                                 modules_to_save=["classifier"]))
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

        def step(model=model, opt=opt) -> None:
            logits = model(**batch).logits
            torch.nn.functional.cross_entropy(logits, labels).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        steps[name] = step

    for step in steps.values():  # warm-up
        step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    names = list(steps)
    for rep in range(args.reps):
        for name in names[rep % len(names):] + names[: rep % len(names)]:
            gc.collect()
            start = time.perf_counter()
            steps[name]()
            times[name].append(time.perf_counter() - start)

    ref = statistics.median(times[names[0]])
    print(f"all-MiniLM-L6-v2, batch {args.batch} x {batch['input_ids'].shape[1]} tokens (SST-2), "
          f"{args.threads} thread(s), {args.reps} interleaved rounds")
    print("| variant | median step s | min - max s | x first |")
    print("|---|---:|---:|---:|")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"| {name} | {med:.3f} | {min(ts):.3f} - {max(ts):.3f} | {med / ref:.2f} |")


if __name__ == "__main__":
    main()
