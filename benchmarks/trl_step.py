"""Training steps on preference pairs, ``lorafit train`` against TRL with a PEFT LoRA, the way each is used:
each trainer runs in a process of its own on the same pairs, model and adapter.

- ``dpo``: task.type = "preference" (DPO, beta 0.1) against TRL's DPOTrainer. Both compute the reference
  model as the base with the adapter switched off, without gradients, in every step (TRL's default; no
  precomputed reference).
- ``dpo_precomputed``: the same with the reference model's log-probabilities precomputed before the first step
  (lorafit's task.precompute_reference, TRL's precompute_ref_log_probs), and lorafit's DPO with the reference in
  every step in the same rounds, so that what precomputing saves is a ratio from one run. The first step
  includes the precomputing.
- ``reward``: task.type = "reward" (a one-output sequence classifier, the Bradley-Terry loss, reward centering
  0.01) against TRL's RewardTrainer; the new score head trains with the adapter in both.
- ``grpo``: task.type = "grpo" against TRL's GRPOTrainer (generating with transformers, no vLLM): each step
  samples 4 completions of each of 4 prompts (the instruction below; temperature 1, up to 40 tokens), scores
  them with one Python function (the share of positive words), and takes one update, beta 0 (no reference
  model; TRL's default), both with DAPO's loss (the step's token sum over its tokens: TRL's default, lorafit's
  task.grpo_loss = "dapo"). Sampling is random, so a step's time varies with how long the completions run.

SmolLM2-135M-Instruct (a tiny random Llama with --quick), LoRA r=16 (alpha 32, dropout 0) on every linear
layer, batch 4 pairs, max length 96 tokens, AdamW at 5e-4 without warm-up. The pairs are SST-2's
(examples/sst2_preferences.py: a positive review preferred to a negative one of about its length) as TRL's
conversational rows, which lorafit reads as they are: the same chat template renders both. Both run in
float32 without activation checkpointing (TRL's defaults, bf16 and checkpointing, are turned off). Reported:
the median time of a training step after two warm-up steps, the time from the worker's start (its imports
done) to the end of the first step (loading the model, tokenizing the pairs, setting up), and the process's
peak RSS; medians over interleaved rounds. Skipped without ``trl``.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

INSTRUCTION = "Write a positive one-sentence movie review."
BATCH = 4
MAX_LENGTH = 96
LORA = dict(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear")
CENTERING = 0.01  # reward: the weight of the squared score sum (TRL's center_rewards_coefficient)
TITLES = {"dpo": ("DPO step, lorafit against TRL + PEFT", "lorafit train (preference)", "TRL DPOTrainer + PEFT"),
          "dpo_precomputed": ("DPO step with precomputed reference log-probabilities, lorafit against TRL + PEFT",
                              "lorafit train (preference, precompute_reference)",
                              "TRL DPOTrainer + PEFT (precompute_ref_log_probs)"),
          "reward": ("Reward-model step, lorafit against TRL + PEFT", "lorafit train (reward)",
                     "TRL RewardTrainer + PEFT"),
          "grpo": ("GRPO step, lorafit against TRL + PEFT", "lorafit train (grpo)", "TRL GRPOTrainer + PEFT")}
GENERATIONS, COMPLETION_TOKENS = 4, 40  # grpo: completions per prompt, and their length at most
POSITIVE_WORDS = {"good", "great", "wonderful", "moving", "brilliant", "beautiful", "fun", "funny", "best", "love"}
INLINE = "lorafit train (preference, the reference in every step)"  # dpo_precomputed's third worker


def positive_words(prompts, completions, *_, **__) -> list[float]:
    """grpo's reward, called by lorafit (texts) and by TRL (conversational completions: lists of messages): the
    share of a completion's words that are in POSITIVE_WORDS."""
    texts = [c if isinstance(c, str) else c[-1]["content"] for c in completions]
    return [sum(w.strip(".,!").lower() in POSITIVE_WORDS for w in t.split()) / max(len(t.split()), 1) for t in texts]


def _rows(data: Path | None, count: int, kind: str = "dpo") -> list[dict]:
    """Conversational preference rows (TRL's format): a prompt of messages, each response one message; for grpo
    the prompts alone."""
    if kind == "grpo":
        return [{"prompt": [{"role": "user", "content": INSTRUCTION}]} for _ in range(count)]
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from examples.sst2_preferences import pairs
    from lorafit.train.config import default_data_dir

    source = (data or default_data_dir()) / "sst2" / "train.jsonl"
    made = pairs(source, count, seed=0) if source.is_file() else [
        {"chosen": f"good film {i}", "rejected": f"bad film {i}"} for i in range(count)]
    return [{"prompt": [{"role": "user", "content": INSTRUCTION}],
             "chosen": [{"role": "assistant", "content": p["chosen"]}],
             "rejected": [{"role": "assistant", "content": p["rejected"]}]} for p in made]


def _model_and_tokenizer(kind: str, quick: bool):
    """A causal LM (dpo, dpo_precomputed) or a one-output classifier (reward): the tiny Llama and the serve tests'
    tokenizer, or SmolLM2 from lorafit's converted copy of the GGUF file (transformers' Trainer refuses to train a
    model loaded from GGUF)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    if quick:
        from benchmarks import models
        from tests import serve_models

        tokenizer = serve_models.tokenizer(causal=True)
        model = models.smollm2(True)
        if kind == "reward":
            torch.manual_seed(0)
            model.config.num_labels = 1
            model = AutoModelForSequenceClassification.from_config(model.config)
        model.config.pad_token_id = tokenizer.pad_token_id
        return model, tokenizer
    from lorafit.base_models import resolve_model

    path = resolve_model("smollm2-135m").path
    tokenizer = AutoTokenizer.from_pretrained(path)
    torch.manual_seed(0)  # the new score head
    model = (AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32) if kind != "reward" else
             AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, dtype=torch.float32))
    model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def _lorafit(kind: str, quick: bool, rows_file: Path, steps: int, tmp: Path) -> list[float]:
    """The times at which the steps ended."""
    from lorafit.train import train

    marks: list[float] = []
    task = {"reward": {"type": "reward", "reward_centering": CENTERING},
            "grpo": {"type": "grpo", "num_generations": GENERATIONS, "max_new_tokens": COMPLETION_TOKENS,
                     "grpo_loss": "dapo", "reward_function": "benchmarks.trl_step:positive_words"}}.get(
        kind, {"type": "preference", "dpo_beta": 0.1, "precompute_reference": kind == "dpo_precomputed"})
    prompts = {"messages_field": "prompt"} if kind == "grpo" else {"instruction_field": "prompt"}
    config = {"output_dir": str(tmp / "run"), "model": {"name": "given"},
              "data": {"train": str(rows_file), **prompts},
              "task": {**task, "max_length": MAX_LENGTH},
              "lora": dict(LORA), "train": {"batch_size": BATCH, "max_steps": steps, "lr": 5e-4,
                                            "scheduler": "constant", "eval_every": steps, "save_every": steps,
                                            "log_every": steps, "keep_best": False}}
    model, tokenizer = _model_and_tokenizer(kind, quick)
    train(config, model=model, tokenizer=tokenizer,
          callbacks=(lambda state: marks.append(time.perf_counter()),), progress=False)
    return marks


def _trl(kind: str, quick: bool, rows_file: Path, steps: int, tmp: Path) -> list[float]:
    """The times at which the steps ended."""
    import datasets
    import peft
    from transformers import TrainerCallback
    from trl import DPOConfig, DPOTrainer, GRPOConfig, GRPOTrainer, RewardConfig, RewardTrainer

    marks: list[float] = []

    class Marks(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            marks.append(time.perf_counter())

    rows = [json.loads(line) for line in rows_file.read_text().splitlines()]
    common = dict(output_dir=str(tmp / "trl"), per_device_train_batch_size=BATCH, max_steps=steps,
                  learning_rate=5e-4, lr_scheduler_type="constant",
                  logging_steps=steps, save_strategy="no", report_to=[], use_cpu=True,
                  dataloader_num_workers=0, seed=0, disable_tqdm=True,
                  # TRL's defaults are bf16 autocast and activation checkpointing: off, as lorafit's run is
                  bf16=False, gradient_checkpointing=False)
    model, tokenizer = _model_and_tokenizer(kind, quick)
    extra = {}
    if kind == "grpo":  # a batch counts completions: 4 prompts' groups
        trainer_class = GRPOTrainer
        args = GRPOConfig(beta=0.0, loss_type="dapo", num_generations=GENERATIONS,
                          max_completion_length=COMPLETION_TOKENS, temperature=1.0,
                          **{**common, "per_device_train_batch_size": BATCH * GENERATIONS})
        extra = {"reward_funcs": [positive_words]}
    elif kind != "reward":
        trainer_class, args = DPOTrainer, DPOConfig(beta=0.1, precompute_ref_log_probs=kind == "dpo_precomputed",
                                                    max_length=MAX_LENGTH, **common)
    else:
        trainer_class, args = RewardTrainer, RewardConfig(center_rewards_coefficient=CENTERING,
                                                          max_length=MAX_LENGTH, **common)
    task_type = "CAUSAL_LM" if kind != "reward" else "SEQ_CLS"
    trainer = trainer_class(model=model, args=args, train_dataset=datasets.Dataset.from_list(rows),
                            processing_class=tokenizer, peft_config=peft.LoraConfig(task_type=task_type, **LORA),
                            callbacks=[Marks()], **extra)
    trainer.train()
    return marks


def _worker(args) -> None:
    """Each step's seconds; the first counts from here: loading the model, tokenizing the pairs, setting up."""
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        run = _lorafit if args.worker == "lorafit" else _trl
        marks = run(args.kind, args.quick, Path(args.rows), args.steps, Path(tmp))
    steps = [b - a for a, b in zip([start, *marks], marks)]
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"steps": steps, "peak_rss": peak}))


def run(args, emit, kind: str) -> dict:
    """The interleaved rounds of ``kind`` ("dpo" or "reward"; called by ``python -m benchmarks``)."""
    title, ours, theirs = TITLES[kind]
    try:
        import trl  # noqa: F401
    except ImportError:
        emit(title, "skipped: trl is not installed (pip install --no-deps trl)")
        return {"skipped": "trl is not installed"}
    # grpo's steps sample 16 completions: fewer of them still give 6 timed steps a round
    steps, rounds = (4, 1) if args.quick else ((8, 3) if kind == "grpo" else (12, 3))
    # (result key, worker, its kind)
    workers = [("lorafit", "lorafit", kind), ("trl", "trl", kind)]
    if kind == "dpo_precomputed":
        workers.append(("inline", "lorafit", "dpo"))
    results: dict[str, list[dict]] = {key: [] for key, _, _ in workers}
    with tempfile.TemporaryDirectory() as tmp:
        rows_file = Path(tmp) / "pairs.jsonl"
        rows_file.write_text("".join(json.dumps(r) + "\n" for r in _rows(getattr(args, "data", None),
                                                                          steps * BATCH, kind)))
        for _ in range(rounds):
            for key, worker, worker_kind in workers:
                command = [sys.executable, "-m", "benchmarks.trl_step", "--worker", worker, "--kind", worker_kind,
                           "--rows", str(rows_file), "--steps", str(steps), *(["--quick"] if args.quick else [])]
                proc = subprocess.run(command, capture_output=True, text=True, check=False,
                                      cwd=Path(__file__).resolve().parents[1])
                if proc.returncode != 0:
                    raise RuntimeError(f"{key} worker failed:\n{proc.stderr[-3000:]}")
                results[key].append(json.loads(proc.stdout.strip().splitlines()[-1]))
    summary = {}
    for worker, runs in results.items():
        summary[worker] = {"step_s": statistics.median(statistics.median(r["steps"][2:] or r["steps"]) for r in runs),
                           "first_step_s": statistics.median(r["steps"][0] for r in runs),
                           "peak_rss_gib": statistics.median(r["peak_rss"] for r in runs) / 2**30}
    from benchmarks.timing import table

    def step_ratio(a_key: str, b_key: str) -> float:
        """Within each round (the processes ran one after the other), then the median."""
        return statistics.median(statistics.median(a["steps"][2:] or a["steps"]) /
                                 statistics.median(b["steps"][2:] or b["steps"])
                                 for a, b in zip(results[a_key], results[b_key]))

    summary["step_ratio"] = step_ratio("lorafit", "trl")
    summary["rss_ratio"] = statistics.median(a["peak_rss"] / b["peak_rss"]
                                             for a, b in zip(results["lorafit"], results["trl"]))
    names = {"lorafit": ours, "trl": theirs, "inline": INLINE}
    text = table([[names[key], f"{s['step_s']:.3f}", f"{s['first_step_s']:.2f}", f"{s['peak_rss_gib']:.2f}"]
                  for key, s in summary.items() if isinstance(s, dict)],
                 ["trainer", "step (s)", "set-up + first step (s)", "peak RSS (GiB)"])
    text += f"\n\nlorafit / TRL: step time {summary['step_ratio']:.2f}x, peak RSS {summary['rss_ratio']:.2f}x"
    if "inline" in results:
        summary["precomputed_over_inline"] = step_ratio("lorafit", "inline")
        text += f"; lorafit precomputed / reference in every step: {summary['precomputed_over_inline']:.2f}x"
    batch = f"{BATCH} prompts x {GENERATIONS} completions" if kind == "grpo" else f"{BATCH} pairs"
    emit(f"{title} ({'tiny Llama' if args.quick else 'SmolLM2-135M-Instruct'}, "
         f"batch {batch}, r=16 all-linear, {steps} steps, {rounds} interleaved rounds, medians)", text)
    return summary


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--worker", choices=["lorafit", "trl"], required=True)
    parser.add_argument("--kind", choices=list(TITLES), required=True)
    parser.add_argument("--rows", required=True)
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--quick", action="store_true")
    _worker(parser.parse_args())
