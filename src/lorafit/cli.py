"""The ``lorafit`` command.

    lorafit demo [--rank R] [--epochs N] [--seed S] [--out DIR] [--device DEV]
    lorafit inspect DIR

Mistakes a user can fix (a missing directory, a bad value) end with a one-line
message on stderr and exit status 2, like argparse's own usage errors.
"""

from __future__ import annotations

import argparse
import sys

import torch

import lorafit


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


def cmd_inspect(args: argparse.Namespace) -> int:
    config, tensors = lorafit.read_adapter(args.dir)
    targets = config.target_modules
    print(f"adapter: {args.dir}")
    print(f"r: {config.r}  lora_alpha: {config.lora_alpha:g}  scale: "
          f"{config.lora_alpha / (config.r ** 0.5 if config.use_rslora else config.r):g}"
          f"{'  (rslora)' if config.use_rslora else ''}  dropout: {config.lora_dropout:g}")
    print(f"target_modules: {', '.join(targets) if isinstance(targets, list) else targets}")
    for field in ("exclude_modules", "modules_to_save", "rank_pattern", "alpha_pattern", "base_model_name_or_path",
                  "task_type"):
        if getattr(config, field):
            print(f"{field}: {getattr(config, field)}")
    rows = [(name, str(list(t.shape)), str(t.dtype).removeprefix("torch.")) for name, t in sorted(tensors.items())]
    widths = [max([len(h)] + [len(row[i]) for row in rows]) for i, h in enumerate(("tensor", "shape", "dtype"))]
    print()
    for row in [("tensor", "shape", "dtype"), *rows]:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
    total = sum(t.numel() for t in tensors.values())
    size = sum(t.numel() * t.element_size() for t in tensors.values())
    print(f"\n{len(tensors)} tensors, {total:,} parameters ({size:,} bytes)")
    return 0


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
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (OSError, ValueError, ImportError) as exc:
        # Bad input, not a bug: one line, no traceback. Anything else is a bug and keeps its traceback.
        print(f"lorafit: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
