"""Start-up of ``lorafit serve``: model, registry, app, uvicorn."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from lorafit.quantize import quantize_base
from lorafit.serve.app import Limits, Service, create_app
from lorafit.serve.engine import load_model, serving_device
from lorafit.serve.registry import AdapterRegistry


def build_service(model: str, adapters: str | Path, *, token: str | None = None, max_adapters: int | None = None,
                  max_adapter_mb: float | None = None, pin: list[str] | None = None, num_labels: int | None = None,
                  limits: Limits | None = None, preload: bool = False, device: str | torch.device | None = None,
                  dtype: torch.dtype = torch.float32, quantize: int = 0, model_name: str | None = None,
                  task: str | None = None) -> Service:
    """The model (in ``dtype`` on ``device``, default: CUDA when there is a GPU), its adapter registry and the
    request batching, for ``create_app``. ``quantize`` 4 or 8 keeps the base's linear layers in NF4 or int8
    (lorafit.quantize), all but the output head, which adapters may save a copy of. ``model_name``: what
    /health and OpenAI's ``model`` call the base model (default: ``model`` as given). ``task``: ``generate`` or
    ``classify`` (None: what the model is; a causal LM can be served as a classifier or reward model)."""
    adapters = Path(adapters)
    if not adapters.is_dir():
        raise ValueError(f"--adapters {str(adapters)!r} is not a directory")
    if quantize not in (0, 4, 8):
        raise ValueError(f"--quantize must be 0 (none), 4 (NF4) or 8 (int8), got {quantize!r}")
    device = serving_device(device)
    # quantized layer by layer on the device from the CPU's copy: only the quantized model ever reaches it
    base, tokenizer, task = load_model(model, num_labels, "cpu" if quantize else device, dtype, task)
    if quantize:
        quantize_base(base, bits=quantize, skip=OUTPUT_HEADS, compute_dtype=dtype, device=device)
        base.to(device)
    registry = AdapterRegistry(base, adapters, max_adapters=max_adapters,
                               max_bytes=int(max_adapter_mb * 2**20) if max_adapter_mb else None)
    for name in pin or []:
        registry.load(name, pin=True)
    if preload:
        for name in registry.available()[: max_adapters or None]:
            registry.load(name)
    return Service(base, tokenizer, task, registry, limits=limits, token=token, model_name=model_name or model)


# The heads of causal LMs and classifiers stay full precision: an adapter's modules_to_save copy of one must train
OUTPUT_HEADS = ("lm_head", "classifier", "score")


def forward_threads() -> int:
    """torch's threads for serving: one core fewer than this process may use (at least 1), at most torch's
    own setting. The event loop, tokenizers and adapter loads need a core too, and torch's worker threads
    wait for one another at every op: one of them descheduled stalls the whole forward. On 2 cores, with
    the machine busy, 2 threads served 7-13 requests/s and 1 thread 60-100 (benchmarks/serve_load.py)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(torch.get_num_threads(), cores - 1))


def serve(args) -> int:
    import uvicorn

    torch.set_num_threads(args.threads or forward_threads())
    token = args.token or os.environ.get("LORAFIT_SERVE_TOKEN") or None
    limits = Limits(max_body_bytes=args.max_body_bytes, max_texts=args.max_texts, max_text_tokens=args.max_text_tokens,
                    max_prompt_tokens=args.max_prompt_tokens, max_new_tokens=args.max_new_tokens,
                    max_batch=args.max_batch, max_wait_ms=args.max_wait_ms, max_queue=args.max_queue,
                    request_timeout_s=args.request_timeout)
    service = build_service(args.model, args.adapters, token=token, max_adapters=args.max_adapters,
                            max_adapter_mb=args.max_adapter_mb, pin=args.pin, num_labels=args.num_labels,
                            limits=limits, preload=args.preload, device=args.device, dtype=getattr(torch, args.dtype),
                            quantize=args.quantize, model_name=args.served_model_name, task=args.task)
    app = create_app(service)
    device = service.model.device
    where = f"{torch.get_num_threads()} torch threads" if device.type == "cpu" else str(device)
    base = {4: ", NF4 base", 8: ", int8 base"}.get(args.quantize, "")
    print(f"lorafit serve: {service.task} with {args.model} ({args.dtype}{base}, {where}), adapters from "
          f"{args.adapters} "
          f"({len(service.registry.available())} found), load/unload {'enabled' if token else 'disabled'}",
          flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level,
                timeout_graceful_shutdown=args.graceful_timeout)
    return 0
