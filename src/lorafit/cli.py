"""The ``lorafit`` command.

    lorafit demo [--rank R] [--epochs N] [--seed S] [--out DIR] [--device DEV]
    lorafit inspect DIR
    lorafit train CONFIG.toml [--set KEY=VALUE ...] [--method lora|full] [--output-dir DIR] [--resume | --overwrite]
    lorafit eval RUN_DIR [--split validation|test] [--adapter DIR | --base] [--set KEY=VALUE ...]
    lorafit merge RUN_DIR OUT_DIR [--adapter DIR] [--overwrite]
    lorafit serve --model minilm|smollm2-135m|MODEL_DIR --adapters DIR [--port P] [--token T] [--max-adapters N] ...

Mistakes a user can fix (a missing directory, a bad value) end with a one-line
message on stderr and exit status 2, like argparse's own usage errors.
"""

from __future__ import annotations

import argparse
import atexit
import collections
import json
import os
import sys
from pathlib import Path

import torch

import lorafit
from lorafit import vera
from lorafit.io import CONFIG_NAME


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _device(text: str) -> torch.device:
    # Allocate once so "cuda" on a machine without CUDA fails here, with a usage error, not mid-run.
    try:
        device = torch.device(text)
        torch.empty(0, device=device)
    except Exception as exc:  # torch raises RuntimeError or AssertionError depending on the backend
        raise argparse.ArgumentTypeError(f"{text!r} is not usable: {' '.join(str(exc).split())}") from None
    return device


def cmd_demo(args: argparse.Namespace) -> int:
    from lorafit.demo import format_report, run_demo  # keeps `lorafit --help` fast

    results = run_demo(rank=args.rank, epochs=args.epochs, seed=args.seed, out=args.out, device=args.device)
    print(format_report(results))
    return 0


def _module_list(names: list[str]) -> str:
    """A target list as written, or for a long one of full names (what all-linear records, in PEFT's files too)
    the count and each layer name's count: "28 modules: q_proj x4, k_proj x4, ..."."""
    if len(names) <= 8:
        return ", ".join(names)
    counts = collections.Counter(name.rsplit(".", 1)[-1] for name in names)  # in first-seen order
    return f"{len(names)} modules: " + ", ".join(f"{leaf} x{n}" if n > 1 else leaf for leaf, n in counts.items())


def cmd_inspect(args: argparse.Namespace) -> int:
    config, tensors = lorafit.read_adapter(args.dir)
    targets = config.target_modules
    print(f"adapter: {args.dir}")
    print(f"r: {config.r}  lora_alpha: {config.lora_alpha:g}  scale: "
          f"{config.lora_alpha / (config.r ** 0.5 if config.use_rslora else config.r):g}"
          f"{'  (rslora)' if config.use_rslora else ''}  dropout: {config.lora_dropout:g}")
    print(f"target_modules: {_module_list(targets) if isinstance(targets, list) else targets}")
    # what the adapter is beyond a plain LoRA: the variant, where it starts from, what else it trains
    for field in ("exclude_modules", "modules_to_save", "rank_pattern", "alpha_pattern", "use_dora", "lora_bias",
                  "kasa_config", "alora_invocation_tokens", "target_parameters", "trainable_token_indices",
                  "ensure_weight_tying", "layer_replication", "base_model_name_or_path", "task_type"):
        if getattr(config, field):
            print(f"{field}: {getattr(config, field)}")
    if config.init_lora_weights is not True:
        print(f"init_lora_weights: {config.init_lora_weights!r}")
    labels = lorafit.read_labels(args.dir)
    if labels is not None:
        print(f"labels: {', '.join(labels)}")
    if vera.SHARED_A in tensors:
        print(f"VeRA: each lora_A below is at the shared width of {vera.SHARED_A}; loading cuts it to its layer's "
              "input size")
    rows = [(name, str(list(t.shape)), str(t.dtype).removeprefix("torch.")) for name, t in sorted(tensors.items())]
    widths = [max([len(h)] + [len(row[i]) for row in rows]) for i, h in enumerate(("tensor", "shape", "dtype"))]
    print()
    for row in [("tensor", "shape", "dtype"), *rows]:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
    total = sum(t.numel() for t in tensors.values())
    size = sum(t.numel() * t.element_size() for t in tensors.values())
    print(f"\n{len(tensors)} tensors, {total:,} parameters ({size:,} bytes)")
    return 0


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def cmd_convert(args: argparse.Namespace) -> int:
    config, tensors = lorafit.read_adapter(args.src)  # AdaLoRA and BD-LoRA files come back as plain LoRA
    if vera.SHARED_A in tensors:
        raise ValueError(f"{args.src}: a VeRA adapter's A factors are its shared projection cut to each layer's input "
                         "size, which only the base model knows; load it onto the model and save it "
                         "(lorafit.load_adapter(model, SRC); lorafit.save_adapter(model, OUT)): a LoRA file")
    labels = lorafit.read_labels(args.src)
    out = Path(args.out)
    if out.resolve() != Path(args.src).resolve() and (out / CONFIG_NAME).exists() and not args.overwrite:
        raise ValueError(f"{out} already holds an adapter; --overwrite replaces it")
    if args.dtype:
        dtype = _DTYPES[args.dtype]
        tensors = {k: t.to(dtype) if t.is_floating_point() else t for k, t in tensors.items()}
    lorafit.write_adapter(out, config, tensors, labels=labels)
    size = sum(t.numel() * t.element_size() for t in tensors.values())
    print(f"wrote {out}: a LoRA adapter (r={config.r}), {len(tensors)} tensors, {size:,} bytes")
    return 0


def _train_overrides(args: argparse.Namespace) -> list[str]:
    overrides = list(args.set or [])
    if getattr(args, "method", None):
        overrides.append(f"train.method={args.method}")
    if getattr(args, "output_dir", None):
        overrides.append(f"output_dir={json.dumps(args.output_dir)}")
    return overrides


def cmd_train(args: argparse.Namespace) -> int:
    from lorafit.train import train  # transformers is imported only for the commands that need it
    from lorafit.train.run import CLI_ARGS  # errors name --resume, --set, ... not Python's arguments

    train(args.config, _train_overrides(args), resume=args.resume, overwrite=args.overwrite,
          progress=not args.no_progress, arg_names=CLI_ARGS)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # A torchrun worker whose run finished: everything is written and the process group is gone. Leave
        # without the interpreter's teardown, where gloo's worker threads, meeting objects being destroyed,
        # can abort the process (SIGABRT) and torchrun would report a finished run as failed. The exit
        # handlers still run first (logging's flush, the Triton warm-up helper's stop), as at a normal exit.
        atexit._run_exitfuncs()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from lorafit.train import evaluate
    from lorafit.train.run import CLI_ARGS

    metrics = evaluate(args.run_dir, split=args.split, overrides=args.set, adapter=args.adapter, base=args.base,
                       per_class=True, arg_names=CLI_ARGS, samples=args.samples)
    if args.json:
        print(json.dumps(metrics, indent=2, ensure_ascii=False))
        return 0
    per_class = metrics.pop("per_class", None)
    width = max(len(k) for k in metrics)
    for key, value in metrics.items():
        print(f"{key.ljust(width)}  {value:.4f}")
    if per_class:  # classification: each class by the name the adapter saved for it
        width = max(len("class"), *(len(name) for name in per_class))
        print(f"\n{'class'.ljust(width)}  precision  recall      f1  support")
        for name, m in per_class.items():
            print(f"{name.ljust(width)}  {m['precision']:9.4f}  {m['recall']:6.4f}  {m['f1']:6.4f}  {m['support']:7d}")
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    from lorafit.train import merge
    from lorafit.train.run import CLI_ARGS

    out = merge(args.run_dir, args.out_dir, adapter=args.adapter, overwrite=args.overwrite, arg_names=CLI_ARGS)
    print(f"merged model written to {out}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from lorafit.serve.server import serve  # fastapi/uvicorn: the `serve` extra

    return serve(args)


def _add_serve_parser(sub) -> None:
    sv = sub.add_parser("serve", help="serve one base model with many adapters over HTTP",
                        description="Serve a base model and the adapters in DIR (each subdirectory is a PEFT "
                                    "adapter, loaded on first use, least recently used evicted) with an HTTP API: "
                                    "classification for a sequence-classification model (e.g. minilm), generation "
                                    "for a causal LM (or classification and reward scores with --task classify). "
                                    "Requests are batched across adapters.")
    sv.add_argument("--model", required=True, help="'minilm' (all-MiniLM-L6-v2), 'smollm2-135m' or a local "
                                                   "transformers model dir")
    sv.add_argument("--adapters", required=True, metavar="DIR", help="directory whose subdirectories are adapters")
    sv.add_argument("--task", choices=["generate", "classify"],
                    help="generate (a causal LM) or classify (a sequence classifier; a causal LM loads as one, to "
                         "serve classification and reward-model adapters trained on it); default: what --model is")
    sv.add_argument("--served-model-name", metavar="NAME", help="the base model's name in /health and as OpenAI's "
                    "`model` (default: --model as given)")
    sv.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    sv.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    sv.add_argument("--token", help="token for POST/DELETE /v1/adapters (or env LORAFIT_SERVE_TOKEN); "
                                    "without one, loading and unloading over HTTP is disabled")
    sv.add_argument("--max-adapters", type=_positive_int, help="evict least recently used above this many")
    sv.add_argument("--max-adapter-mb", type=float, help="evict least recently used above this many MB of weights")
    sv.add_argument("--pin", action="append", metavar="NAME", help="load at start and never evict (repeatable)")
    sv.add_argument("--preload", action="store_true", help="load adapters at start (up to --max-adapters)")
    sv.add_argument("--device", type=_device, default=None,
                    help="torch device, e.g. cpu, cuda, cuda:1 (default: cuda if available, else cpu)")
    sv.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                    help="the base model's and adapters' dtype (default: float32; bfloat16 halves a GPU's memory "
                         "and time)")
    sv.add_argument("--quantize", type=int, default=0, choices=[0, 4, 8],
                    help="keep the base's linear layers in 4 bits (NF4) or 8 (int8), its output head aside: a "
                         "quarter or half of their memory, dequantized in each forward (default: 0, none)")
    sv.add_argument("--num-labels", type=_positive_int, help="classes of the base model's own classifier head, "
                                                             "used without an adapter (default: its config's; "
                                                             "each adapter's head keeps its saved size)")
    sv.add_argument("--max-batch", type=_positive_int, default=32, help="rows per batched forward (default: 32)")
    sv.add_argument("--max-wait-ms", type=float, default=5.0, help="how long a batch waits to fill (default: 5)")
    sv.add_argument("--max-body-bytes", type=_positive_int, default=1 << 20, help="request body limit (1 MiB)")
    sv.add_argument("--max-texts", type=_positive_int, default=64, help="texts per classify request (default: 64)")
    sv.add_argument("--max-text-tokens", type=_positive_int, default=256, help="tokens a text is truncated to")
    sv.add_argument("--max-prompt-tokens", type=_positive_int, default=1024, help="prompt length limit (tokens)")
    sv.add_argument("--max-new-tokens", type=_positive_int, default=256, help="max_new_tokens limit")
    sv.add_argument("--max-queue", type=_positive_int, default=1024, help="rows waiting for a batch; beyond them "
                                                                         "requests get 503 (default: 1024)")
    sv.add_argument("--request-timeout", type=float, default=120.0, help="seconds a request may take from queueing "
                                                                         "to its last token (default: 120)")
    sv.add_argument("--graceful-timeout", type=float, default=30.0, help="seconds in-flight requests get at "
                                                                         "shutdown (default: 30)")
    sv.add_argument("--threads", type=_positive_int, help="torch threads for the forwards (default: one core fewer "
                                                          "than the process may use, at least 1)")
    sv.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    sv.set_defaults(func=cmd_serve)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lorafit", description="LoRA adapters for PyTorch, in PEFT's file format.")
    parser.add_argument("--version", action="version", version=f"lorafit {lorafit.__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    demo = sub.add_parser("demo", help="LoRA vs full fine-tuning on scikit-learn's digits, end to end",
                          description="Train an MLP on digits 0-4, adapt it to 5-9 with LoRA and with full "
                                      "fine-tuning, compare, then save, reload and merge the adapter.")
    demo.add_argument("--rank", type=_positive_int, default=8, help="LoRA rank r (default: 8)")
    demo.add_argument("--epochs", type=_positive_int, default=20, help="epochs per training phase (default: 20)")
    demo.add_argument("--seed", type=int, default=0, help="seed for the split, init and batches (default: 0)")
    demo.add_argument("--out", metavar="DIR", help="keep the adapter in DIR (default: a temporary directory)")
    demo.add_argument("--device", type=_device, default=None,
                      help="torch device, e.g. cpu, cuda, cuda:1 (default: cuda if available, else cpu)")
    demo.set_defaults(func=cmd_demo)

    inspect = sub.add_parser("inspect", help="show an adapter directory's config and tensors",
                             description="Print the config (r, alpha, targets) and every tensor of an adapter "
                                         "directory (adapter_config.json + adapter_model.safetensors).")
    inspect.add_argument("dir", metavar="DIR", help="adapter directory")
    inspect.set_defaults(func=cmd_inspect)

    convert = sub.add_parser("convert", help="rewrite an adapter directory as a plain LoRA adapter (PEFT's files)",
                             description="Read an adapter directory as lorafit loads it (a PEFT AdaLoRA, BD-LoRA, "
                                         "LoHa or LoKr file as the plain LoRA it computes) and write it as a LoRA "
                                         "adapter, which PEFT and LoRA-serving engines read; optionally in another "
                                         "dtype.")
    convert.add_argument("src", metavar="SRC", help="adapter directory to read")
    convert.add_argument("out", metavar="OUT", help="adapter directory to write")
    convert.add_argument("--dtype", choices=sorted(_DTYPES), help="cast the adapter's tensors (default: as stored)")
    convert.add_argument("--overwrite", action="store_true", help="replace an adapter already in OUT")
    convert.set_defaults(func=cmd_convert)

    set_help = "override a config key, e.g. --set train.lr=1e-4 --set lora.r=16 (repeatable)"
    from lorafit.train.distributed import LAUNCH_HELP  # torch only: keeps --help fast

    train = sub.add_parser("train", help="fine-tune a model from a TOML run config (LoRA or full)",
                           description="Fine-tune a model on local data as described by a TOML run config. The "
                                       "output directory receives the adapter (PEFT format), the config used, "
                                       "metrics.jsonl, curves.png and summary.json.",
                           epilog=LAUNCH_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    train.add_argument("config", metavar="CONFIG", help="TOML run config (see examples/)")
    train.add_argument("--set", action="append", metavar="KEY=VALUE", help=set_help)
    train.add_argument("--method", choices=["lora", "full"], help="LoRA or full fine-tuning (same as --set "
                                                                  "train.method=...)")
    train.add_argument("--output-dir", metavar="DIR", help="where the run goes (same as --set output_dir=...)")
    mode = train.add_mutually_exclusive_group()
    mode.add_argument("--resume", action="store_true", help="continue the interrupted run in the output directory")
    mode.add_argument("--overwrite", action="store_true", help="replace a previous run in the output directory")
    train.add_argument("--no-progress", action="store_true", help="no progress bar")
    train.set_defaults(func=cmd_train)

    ev = sub.add_parser("eval", help="evaluate a finished run's adapter (or fine-tuned model)",
                        description="Load the base model of a run, apply its adapter (not with --base), and print "
                                    "the task's metrics on a split of the run's data (for classification also "
                                    "each class's precision, recall and F1, by the names saved with the adapter).")
    ev.add_argument("run_dir", metavar="RUN_DIR", help="output directory of `lorafit train`")
    ev.add_argument("--split", default="validation", choices=["train", "validation", "test"],
                    help="which split (default: validation)")
    which = ev.add_mutually_exclusive_group()
    which.add_argument("--adapter", metavar="DIR", help="another adapter directory (default: RUN_DIR/adapter)")
    which.add_argument("--base", action="store_true", help="the base model the run started from, without the "
                                                           "adapter: the same metrics, zero-shot")
    ev.add_argument("--set", action="append", metavar="KEY=VALUE", help=set_help)
    ev.add_argument("--json", action="store_true", help="print the metrics as JSON")
    ev.add_argument("--samples", metavar="FILE", help="also write each example's output as a line of JSON: a "
                                                      "classifier's prediction and class probabilities, the "
                                                      "generations (causal_lm, seq2seq: task.generate_rows of "
                                                      "them), a reward model's scores of each pair, grpo's "
                                                      "sampled completions and rewards")
    ev.set_defaults(func=cmd_eval)

    mg = sub.add_parser("merge", help="write the base model with a run's adapter merged in",
                        description="Merge a run's adapter into its base model and save the result with "
                                    "save_pretrained (plus the tokenizer): a plain model with no LoRA layers.")
    mg.add_argument("run_dir", metavar="RUN_DIR", help="output directory of `lorafit train`")
    mg.add_argument("out_dir", metavar="OUT_DIR", help="where the merged model goes")
    mg.add_argument("--adapter", metavar="DIR", help="another adapter directory (default: RUN_DIR/adapter)")
    mg.add_argument("--overwrite", action="store_true", help="replace OUT_DIR's contents")
    mg.set_defaults(func=cmd_merge)
    _add_serve_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (OSError, ValueError, ImportError, FloatingPointError) as exc:
        # Bad input, not a bug: one line, no traceback. Anything else is a bug and keeps its traceback.
        print(f"lorafit: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
