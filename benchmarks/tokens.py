"""Trainable token rows (``trainable_token_indices``) with a tied head: lorafit against PEFT on a training step.

A random Llama with a large vocabulary and a head tied to the embedding (vocabulary 32,000, hidden 512,
2 layers; ``--quick``: tiny), batch 4 x 128, LoRA r=16 on q_proj plus 16 trainable token rows. The floor is
the same LoRA without token rows. PEFT forms the whole table with the rows replaced on every forward, and its
tied head multiplies by that copy, which backward keeps; lorafit replaces only the looked-up rows and the
trained tokens' logits. Reported: the median step time (forward, backward, AdamW), interleaved, and what the
forward leaves allocated for backward (``timing.kept_bytes``).
"""

from __future__ import annotations

import torch

import lorafit
from benchmarks.timing import interleaved, kept_bytes, median, ratio, table

KINDS = ("floor (LoRA, no token rows)", "lorafit", "PEFT")
TOKENS = list(range(16))


def variant(kind: str, quick: bool):
    import transformers

    torch.manual_seed(0)
    size = dict(vocab_size=512, hidden_size=32, intermediate_size=64) if quick else dict(
        vocab_size=32000, hidden_size=512, intermediate_size=1024)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        num_hidden_layers=2, num_attention_heads=8 if not quick else 4, num_key_value_heads=4 if not quick else 2,
        tie_word_embeddings=True, **size)).train()
    settings = dict(r=16, lora_alpha=32, target_modules=["q_proj"])
    if kind == "PEFT":
        import peft

        return peft.get_peft_model(model, peft.LoraConfig(**settings, trainable_token_indices=TOKENS))
    tokens = {"trainable_token_indices": TOKENS} if kind == "lorafit" else {}
    return lorafit.attach(model, lorafit.LoraConfig(**settings, **tokens))


def run(args, show) -> dict:
    batch, seq = (2, 16) if args.quick else (4, 128)
    steps, kept = {}, {}
    for kind in KINDS:
        model = variant(kind, args.quick)
        ids = torch.randint(0, model.config.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(0))
        loss, kept[kind] = kept_bytes(lambda: model(input_ids=ids, labels=ids).loss)
        loss.backward()
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, foreach=True)
        optimizer.zero_grad(set_to_none=True)

        def step(model=model, ids=ids, optimizer=optimizer) -> None:
            model(input_ids=ids, labels=ids).loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        steps[kind] = step
    times = interleaved(steps, reps=args.reps, warmup=1)
    rows = [[k, f"{median(times[k]) * 1e3:.1f}", f"{ratio(times, k, KINDS[0]):.3f}",
             f"{ratio(times, k, 'PEFT'):.3f}" if k == "lorafit" else "", f"{kept[k] / 2**20:.1f}"] for k in KINDS]
    show(f"Trainable token rows: {len(TOKENS)} rows of a tied {'tiny' if args.quick else '32,000 x 512'} embedding "
         f"beside LoRA r=16 on q_proj, batch {batch} x {seq}, {args.reps} interleaved rounds",
         table(rows, ["variant", "median ms", "x floor", "x PEFT", "kept for backward MiB"]))
    return {"median_s": {k: median(v) for k, v in times.items()}, "kept_bytes": kept}
