"""ROUGE of a causal-LM summarizer on DialogSum's test set, against all three human summaries of each dialogue.

    # the base model zero-shot: the config's model, prompt and generation settings, no training
    python examples/dialogsum_rouge.py examples/dialogsum_smollm2.toml --rows 100 --out runs/dialogsum-rouge/base
    # a finished run, with its adapter (add --no-adapter for the same loaded model without it)
    python examples/dialogsum_rouge.py runs/dialogsum-smollm2-lora --rows 100 --out runs/dialogsum-rouge/lora

DialogSum's test rows have ``summary1``..``summary3`` instead of the ``summary``
the training config reads. ``lorafit eval --split test`` with ``data.reference_fields``
scores them too, but only the rows whose prompt fits ``task.max_length``. This
script builds the same prompt as training (the config's instruction and the
dialogue, through the model's chat template), generates greedily with the
config's ``task.max_new_tokens``, and reports ROUGE-1/2/L F-measure (x100,
Porter stemming, the ``rouge-score`` package) two ways:

- ``max``: per row and ROUGE type, the best of the three references
  (``rouge_score``'s ``score_multi``), then the mean over rows;
- ``mean``: per row, the mean over the three references, then the mean over rows.

The prompt is not truncated (the longest test dialogue is under 1,000 tokens;
SmolLM2 takes 8,192). Writes OUT/rouge.json and OUT/generations.jsonl.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
from pathlib import Path

import lorafit
from lorafit.chat import render
from lorafit.train.config import expand_path, load_config
from lorafit.train.data import read_rows
from lorafit.train.run import CONFIG_FILE, load_run, prepare
from lorafit.train.tasks import rouge

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")


def score(references: list[list[str]], predictions: list[str]) -> dict[str, dict[str, float]]:
    """"max" is lorafit's own multi-reference ROUGE; "mean" averages each row's references instead."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)
    mean = {k: 0.0 for k in ROUGE_TYPES}
    for refs, pred in zip(references, predictions):
        for ref in refs:
            for k, s in scorer.score(ref, pred).items():
                mean[k] += s.fmeasure / len(refs)
    n = len(predictions)
    return {"max": rouge(references, predictions), "mean": {k: 100 * v / n for k, v in mean.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", help="a run config (.toml: the base model, zero-shot) or a finished run directory")
    parser.add_argument("--out", required=True, help="directory for rouge.json and generations.jsonl")
    parser.add_argument("--data", default="${LORAFIT_DATA}/dialogsum/test.jsonl")
    parser.add_argument("--rows", type=int, default=100, help="the first ROWS rows of the data file")
    parser.add_argument("--refs", nargs="+", default=["summary1", "summary2", "summary3"],
                        help="the reference fields of a row")
    parser.add_argument("--no-adapter", action="store_true", help="for a run directory: score without its adapter")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    args = parser.parse_args()

    source = Path(args.source)
    is_run = source.is_dir() and (source / CONFIG_FILE).is_file()
    if is_run:
        prep = load_run(source, args.set, None)
    else:
        prep = prepare(load_config(source, args.set))
        prep.model.to(prep.device)
    config, task, tok = prep.config, prep.task, prep.tokenizer
    if config.task.type != "causal_lm" or config.data.messages_field:
        raise SystemExit("this script scores a causal_lm run with an instruction/input prompt")

    rows = read_rows(expand_path(args.data))[: args.rows]
    missing = [f for f in args.refs if f not in rows[0]]
    if missing:
        raise SystemExit(f"{args.data}: no field {missing}; the rows have {', '.join(rows[0])}")
    references = [[str(r[f]) for f in args.refs] for r in rows]
    out_field = config.data.output_field
    prompts = []
    for row in rows:
        # messages() wants the answer field; the prompt is everything before it
        messages = task.messages({**row, out_field: row.get(out_field, "")})[:-1]
        text = render(tok, messages, generation_prompt=True)
        prompts.append(tok(text, add_special_tokens=False)["input_ids"])

    has_adapter = is_run and config.train.method == "lora"
    use_adapter = has_adapter and not args.no_adapter
    start = time.perf_counter()
    with lorafit.disabled(prep.model) if has_adapter and args.no_adapter else contextlib.nullcontext():
        predictions = task.generate(prep.model, prompts, prep.device, config.train.eval_batch_size,
                                    contextlib.nullcontext)
    seconds = time.perf_counter() - start
    result = {
        "source": str(source), "adapter": use_adapter, "model": config.model.name, "data": args.data,
        "rows": len(rows), "references": args.refs, "max_new_tokens": config.task.max_new_tokens,
        "prompt_tokens_mean": sum(map(len, prompts)) / len(prompts),
        "generation_seconds": seconds, **score(references, predictions),
        "empty_predictions": sum(not p for p in predictions),
        "prediction_words_mean": sum(len(p.split()) for p in predictions) / len(predictions),
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "rouge.json").write_text(json.dumps(result, indent=2) + "\n")
    with open(out / "generations.jsonl", "w", encoding="utf-8") as fh:
        for row, pred, refs in zip(rows, predictions, references):
            fh.write(json.dumps({"fname": row.get("fname"), "prediction": pred, "references": refs}) + "\n")
    what = "with adapter" if use_adapter else "no adapter" if has_adapter else "as loaded, no adapter"
    print(f"{config.model.name} ({what}), {len(rows)} rows of {args.data}, {seconds:.0f} s of generation")
    for how in ("max", "mean"):
        print(f"  ROUGE F x100, {how} over references: " +
              "  ".join(f"{k} {result[how][k]:.2f}" for k in ROUGE_TYPES))
    print(f"wrote {out / 'rouge.json'} and {out / 'generations.jsonl'}")


if __name__ == "__main__":
    main()
