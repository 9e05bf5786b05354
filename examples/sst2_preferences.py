"""Preference pairs from SST-2 for DPO (task.type = "preference"): a positive review preferred to a negative one.

    python examples/sst2_preferences.py --out runs/sst2-preferences
    lorafit train examples/dpo_sst2_smollm2.toml
    python examples/sst2_preferences.py --unpaired --out runs/sst2-feedback      # KTO's rows
    lorafit train examples/kto_sst2_smollm2.toml

Each pair answers the config's fixed instruction ("Write a positive one-sentence movie review.") with a
positive SST-2 sentence (chosen) and a negative one (rejected) of about the same length: positives and
negatives are each sorted by length and paired in that order, so that a preference for shorter (or longer)
answers cannot stand in for the one taught. Training pairs come from SST-2's train split, validation pairs
from its dev split (held out). Writes OUT/train.jsonl and OUT/validation.jsonl with fields chosen, rejected;
with --unpaired (task.type = "kto"), each pair as two rows with fields completion and label: the positive
review true (desirable), the negative one false.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from lorafit.train.config import default_data_dir


def pairs(path: Path, count: int, seed: int) -> list[dict]:
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    rng = random.Random(seed)
    rng.shuffle(rows)
    positive = sorted((r["text"] for r in rows if int(r["label"]) == 1), key=len)
    negative = sorted((r["text"] for r in rows if int(r["label"]) == 0), key=len)
    step = max(1, min(len(positive), len(negative)) // count)  # spread over every length, not the shortest
    out = [{"chosen": p, "rejected": n} for p, n in zip(positive[::step], negative[::step])][:count]
    rng.shuffle(out)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=None, help="the data sets' directory (default: LORAFIT_DATA "
                                                                 "or ../shared/data)")
    parser.add_argument("--out", type=Path, default=Path("runs/sst2-preferences"))
    parser.add_argument("--train-pairs", type=int, default=512)
    parser.add_argument("--validation-pairs", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--unpaired", action="store_true", help="rows of one completion and a desirable label")
    args = parser.parse_args()
    sst2 = (args.data or default_data_dir()) / "sst2"
    args.out.mkdir(parents=True, exist_ok=True)
    for split, source, count in (("train", "train.jsonl", args.train_pairs),
                                 ("validation", "dev.jsonl", args.validation_pairs)):
        made = pairs(sst2 / source, count, args.seed)
        if args.unpaired:
            made = [{"completion": p[side], "label": side == "chosen"} for p in made for side in ("chosen", "rejected")]
        (args.out / f"{split}.jsonl").write_text("".join(json.dumps(p) + "\n" for p in made), encoding="utf-8")
        print(f"{args.out / f'{split}.jsonl'}: {len(made)} {'rows' if args.unpaired else 'pairs'} from {sst2 / source}")


if __name__ == "__main__":
    main()
