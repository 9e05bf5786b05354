"""LoRA on a mixture of experts' expert weights (``target_parameters``): lorafit against PEFT on a training step.

A random Mixtral (hidden 256, 8 experts of intermediate 512, top 2, 4 layers, vocabulary 4096; ``--quick``:
tiny), batch 4 x 128 tokens, adapters r=16 on every expert's ``gate_up_proj`` and ``down_proj``, float32 and
bfloat16 weights. The floor is the same step with no adapter (the base frozen, backward from the loss to the
input embeddings, as every variant does). Reported: the median step time (forward, backward, AdamW),
interleaved, and the memory the forward leaves allocated for backward (allocations less frees, op by op, from
torch's profiler: the step's activation memory, free of this machine's noise).
"""

from __future__ import annotations

import torch

import lorafit
from benchmarks.timing import interleaved, kept_bytes, median, ratio, table

EXPERTS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
KINDS = ("floor", "lorafit", "PEFT")


# Mixtral shapes: a tiny dry run; this CPU's; a GPU's (benchmarks/gpu.py --only moe), where an expert stack is
# 32 x 2048 x 2048 (gate_up) and 32 x 2048 x 1024 (down) per layer.
SIZES = {
    "quick": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, vocab_size=512),
    "cpu": dict(hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=8,
                num_key_value_heads=4, num_local_experts=8, num_experts_per_tok=2, vocab_size=4096),
    "gpu": dict(hidden_size=2048, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=16,
                num_key_value_heads=4, num_local_experts=32, num_experts_per_tok=4, vocab_size=32000),
}


def variant(kind: str, size: str, dtype: torch.dtype, device: str | torch.device = "cpu"):
    """A random Mixtral of ``SIZES[size]``: the floor (frozen, no adapter), or lorafit's or PEFT's adapters."""
    import transformers

    torch.manual_seed(0)
    config = transformers.MixtralConfig(max_position_embeddings=2048, **SIZES[size])
    with torch.device(device):
        model = transformers.MixtralForCausalLM(config).to(dtype).train()
    if kind == "lorafit":
        lorafit.attach(model, lorafit.LoraConfig(r=16, lora_alpha=32, target_parameters=EXPERTS))
    elif kind == "PEFT":
        import peft

        model = peft.get_peft_model(model, peft.LoraConfig(r=16, lora_alpha=32, target_parameters=EXPERTS))
    else:
        model.requires_grad_(False)
    return model


def _forward(model, ids: torch.Tensor) -> torch.Tensor:
    x = model.get_input_embeddings()(ids).detach().requires_grad_()
    return model(inputs_embeds=x, labels=ids).loss


def stepper(model, ids: torch.Tensor):
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, foreach=True) if params else None

    def step() -> None:
        _forward(model, ids).backward()
        if optimizer is not None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    return step


def run(args, show) -> dict:
    batch, seq = (2, 16) if args.quick else (4, 128)
    steps, kept, trainable = {}, {}, {}
    for dtype in (torch.float32, torch.bfloat16):
        for kind in KINDS:
            key = f"{kind}, {str(dtype).removeprefix('torch.')}"
            model = variant(kind, "quick" if args.quick else "cpu", dtype)
            ids = torch.randint(0, model.config.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(0))
            loss, kept[key] = kept_bytes(lambda: _forward(model, ids))
            loss.backward()
            model.zero_grad(set_to_none=True)
            trainable[key] = sum(p.numel() for p in model.parameters() if p.requires_grad)
            steps[key] = stepper(model, ids)
    times = interleaved(steps, reps=args.reps, warmup=1)
    rows = []
    for key in steps:
        kind, dtype = key.split(", ")
        rows.append([key, f"{trainable[key]:,}", f"{median(times[key]) * 1e3:.1f}",
                     f"{ratio(times, key, f'floor, {dtype}'):.3f}",
                     f"{ratio(times, key, f'PEFT, {dtype}'):.3f}" if kind == "lorafit" else "",
                     f"{kept[key] / 2**20:.1f}"])
    show(f"Mixture of experts: LoRA on the expert weights (target_parameters), batch {batch} x {seq}, "
         f"{args.reps} interleaved rounds",
         table(rows, ["variant", "trainable", "median ms", "x floor", "x PEFT", "kept for backward MiB"]))
    return {"median_s": {k: median(v) for k, v in times.items()}, "kept_bytes": kept, "trainable": trainable}
