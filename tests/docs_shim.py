"""The programs a documented command calls, made small for the docs check (see docs_check.py).

    docs_shim.py PROGRAM ARG...      (installed as PROGRAM on the PATH of a documented block)
    docs_shim.py python-block CODE   (a ```python block)

Each call is logged to $DOCS_LOG as the command the document wrote and what ran instead (or why
nothing ran). A program or script this file does not know is refused, so a new kind of documented
command fails the check until someone decides how to run it small.
"""

from __future__ import annotations

import json
import os
import shlex
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from forkserver import forked  # this file's directory is on sys.path: it runs as a script

REAL_BIN = Path(os.environ.get("DOCS_REAL_BIN", Path(sys.executable).parent))
PORT = os.environ.get("DOCS_PORT", "8000")

# Two optimizer steps of a few rows each, one evaluation, a few generated tokens.
ROWS = {"data.max_train_rows": 32, "data.max_eval_rows": 8, "data.max_test_rows": 8}
GENERATION = {"task.generate_rows": 2, "task.max_new_tokens": 8}
BATCH = {"train.batch_size": 8}


def log(command: list[str], ran: list[str] | None, reason: str = "") -> None:
    with open(os.environ["DOCS_LOG"], "a") as fh:
        fh.write(json.dumps({"command": shlex.join(command), "ran": ran and shlex.join(ran), "reason": reason}) + "\n")


def run(command: list[str], real: list[str]) -> None:
    log(command, real)
    sys.stdout.flush()
    if real[0] == str(REAL_BIN / "lorafit"):
        forked({"kind": "lorafit", "argv": real, "path0": str(REAL_BIN)})
    elif real[0] == sys.executable and real[1].endswith(".py"):
        forked({"kind": "script", "argv": real[1:]})
    os.execv(real[0], real)


def not_run(command: list[str], reason: str) -> None:
    log(command, None, reason)
    print(f"docs check: not run: {shlex.join(command)} ({reason})")
    sys.exit(0)


def refuse(command: list[str], why: str) -> None:
    log(command, None, f"REFUSED: {why}")
    sys.exit(f"docs check: {shlex.join(command)}: {why}; teach tests/docs_shim.py how to run it small")


def sets(pairs: dict) -> list[str]:
    return [arg for key, value in pairs.items() for arg in ("--set", f"{key}={value}")]


def _load_config():
    """lorafit.train.config's load_config without importing the lorafit and lorafit.train packages (torch,
    transformers, datasets: about 3 s of a command that only reads a TOML file before the real program starts).
    The config modules import nothing but the standard library and each other; this process then execs."""
    import importlib.util
    import types

    if "lorafit" not in sys.modules:
        root = importlib.util.find_spec("lorafit").submodule_search_locations[0]  # finds it, runs nothing
        for name, where in (("lorafit", root), ("lorafit.train", os.path.join(root, "train"))):
            package = types.ModuleType(name)
            package.__path__ = [where]
            sys.modules[name] = package
    from lorafit.train.config import load_config

    return load_config


def run_config(args: list[str], path: str) -> dict:
    """The run config a command would use: the file plus the command's own --set overrides."""
    load_config = _load_config()

    overrides = [args[i + 1] for i, a in enumerate(args[:-1]) if a == "--set"]
    config = load_config(path, overrides)
    return {"task.generate_rows": config.task.generate_rows, "task.max_new_tokens": config.task.max_new_tokens,
            "train.batch_size": config.train.batch_size, "model.name": config.model.name}


def small_model(current: dict) -> dict:
    """SmolLM2-135M (a GGUF file dequantized on every load) becomes a tiny random Llama with the same
    interface: the check is about the commands, not the model's quality."""
    stand_in = os.environ.get("DOCS_SMALL_LM")
    return {"model.name": stand_in} if stand_in and current["model.name"] == "smollm2-135m" else {}


def shrink(current: dict, limits: dict) -> dict:
    return {key: limit for key, limit in limits.items() if current[key] > limit}


def train_args(args: list[str]) -> list[str]:
    """``train CONFIG ...`` plus the arguments that make it small."""
    config = next(a for i, a in enumerate(args[1:], 1) if not a.startswith("-") and args[i - 1] not in (
        "--set", "--method", "--output-dir"))
    current = run_config(args, config)
    small = {"train.max_steps": 2, "train.eval_every": 2, **ROWS, **shrink(current, GENERATION),
             **shrink(current, BATCH), **small_model(current)}
    return [*args, "--no-progress", *sets(small)]


def lorafit(args: list[str]) -> None:
    command = ["lorafit", *args]
    real = [str(REAL_BIN / "lorafit")]
    sub = args[0] if args else ""
    if sub == "train":
        run(command, [*real, *train_args(args)])
    elif sub == "eval":
        config = str(Path(args[1]) / "config.toml")
        small = {**ROWS, **shrink(run_config(args, config), GENERATION)}
        run(command, [*real, *args, *sets(small)])
    elif sub == "demo":
        run(command, [*real, *args, "--epochs", "1"])
    elif sub == "serve":  # on the model the docs' training commands trained their adapters on, named as given
        model = args.index("--model") + 1
        stand_in = small_model({"model.name": args[model]}).get("model.name", args[model])
        run(command, [*real, sub, "--served-model-name", args[model], *args[1:model], stand_in, *args[model + 1:],
                      "--port", PORT])
    elif sub in ("merge", "inspect", "convert", "--version", "--help"):
        run(command, [*real, *args])
    else:
        refuse(command, f"unknown lorafit subcommand {sub!r}")


# script -> arguments that make it small (argparse: the last value wins)
SCRIPTS = {
    "examples/variant_step_time.py": ["--reps", "1", "--batch", "4"],
    "examples/combine_tasks.py": ["--methods", "exact", "--splits", "validation"],
    "examples/dialogsum_rouge.py": ["--rows", "2"],
    "examples/sst2_preferences.py": ["--train-pairs", "32", "--validation-pairs", "8"],
    "examples/dpo_steering.py": ["--samples", "2", "--batch", "2", "--max-new-tokens", "8"],
    "examples/best_of_n.py": ["--samples", "2", "--n", "2", "--batch", "2", "--max-new-tokens", "8"],
    "examples/compare_generations.py": ["--rows", "1", "--max-new-tokens", "8"],
    "examples/rank_study.py": ["--ranks", "1", "2", "--set", "train.max_steps=2", "--set", "train.eval_every=2",
                               *sets(ROWS)],
}


def python(name: str, args: list[str]) -> None:
    command = [name, *args]
    if args and args[0] in SCRIPTS:
        extra = list(SCRIPTS[args[0]])
        if len(args) > 1 and args[1].endswith(".toml"):  # a script that loads the config's model itself
            extra += sets(small_model(run_config(args, args[1])))
        run(command, [sys.executable, *args, *extra])
    elif args[:2] == ["-m", "lorafit"]:
        lorafit(args[2:])
    else:
        refuse(command, "unknown script")


def torchrun(args: list[str]) -> None:
    command = ["torchrun", *args]
    if "--nnodes" in args and args[args.index("--nnodes") + 1] != "1":
        not_run(command, "needs several machines")
    module = args.index("-m")
    if args[module + 1:module + 3] != ["lorafit", "train"]:
        refuse(command, "torchrun of something other than lorafit train")
    launcher = list(args[:module])
    if "--nproc-per-node" in launcher:  # this machine has CPU cores, not GPUs: two gloo processes
        launcher[launcher.index("--nproc-per-node") + 1] = "2"
    run(command, [str(REAL_BIN / "torchrun"), *launcher, "-m", "lorafit", *train_args(args[module + 2:])])


def curl(args: list[str]) -> None:
    """The few curl options the docs use, through urllib: fails on an HTTP error, waits for a starting server."""
    command = ["curl", *args]
    headers, data, url, method = {}, None, None, None
    it = iter(args)
    for a in it:
        if a == "-H":
            key, _, value = next(it).partition(":")
            headers[key.strip()] = value.strip()
        elif a in ("-d", "--data"):
            data = next(it).encode()
        elif a == "-X":
            method = next(it)
        elif a in ("-s", "--silent"):
            pass
        elif a.startswith("-"):
            refuse(command, f"unknown curl option {a}")
        else:
            url = a
    url = url.replace(":8000", f":{PORT}")
    url = url if url.startswith("http") else f"http://{url}"
    log(command, ["urllib", method or ("POST" if data else "GET"), url])
    request = urllib.request.Request(url, data=data, headers=headers, method=method)
    deadline = time.monotonic() + 180
    while True:
        try:
            with urllib.request.urlopen(request, timeout=120) as response:
                print(response.read().decode())
                return
        except urllib.error.HTTPError as exc:
            sys.exit(f"docs check: {shlex.join(command)} -> HTTP {exc.code}: {exc.read().decode()[:2000]}")
        except (urllib.error.URLError, ConnectionError) as exc:  # the server is still starting
            if time.monotonic() > deadline:
                sys.exit(f"docs check: {shlex.join(command)}: no server answered ({exc})")
            time.sleep(1)


def python_block(code: str) -> None:
    """A ```python block, with lorafit.train's train() made small the same way."""
    import lorafit.train
    from lorafit.train import run as run_module

    real_train = run_module.train

    def small_train(config, overrides=None, **kwargs):
        overrides = [f"{k}={v}" for k, v in overrides.items()] if isinstance(overrides, dict) else \
            list(overrides or [])
        small = {"train.max_steps": 2, "train.eval_every": 2, **ROWS}
        return real_train(config, [*overrides, *(f"{k}={v}" for k, v in small.items())],
                          **{"progress": False, **kwargs})

    lorafit.train.train = run_module.train = small_train
    log(["python"], ["python (lorafit.train.train made small)"])
    exec(compile(code, "<documented python block>", "exec"), {"__name__": "__main__"})  # noqa: S102 - the docs


def main() -> None:
    program, args = sys.argv[1], sys.argv[2:]
    if program == "lorafit":
        lorafit(args)
    elif program in ("python", "python3"):
        python(program, args)
    elif program == "torchrun":
        torchrun(args)
    elif program == "curl":
        curl(args)
    elif program == "pip":
        not_run([program, *args], "installs packages: the check runs in the environment make test installed")
    elif program == "make":
        not_run([program, *args], "the set-up commands themselves: CI runs make test")
    elif program == "python-block":
        forked({"kind": "block", "argv": [sys.argv[0], "python-block"], "code": args[0]})
        python_block(args[0])
    else:
        refuse([program, *args], "unknown program")


if __name__ == "__main__":
    main()
