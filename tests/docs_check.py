"""Run every documented command of README.md and docs/*.md, in order, the way a reader would.

A document's ```bash blocks run with bash (``set -euo pipefail``) and its ```python blocks with the
project's Python, one after the other in one fresh working directory per document, so a command that
needs what an earlier one made only works when the document gives them in that order. Other fences
(```text, ```toml, ...) are not commands.

The commands run as written, made small: every program a block calls goes through a shim
(``docs_shim.py``) that adds arguments shrinking the work (two optimizer steps, a few rows, a few
generated tokens) and logs what it ran. What cannot run here (installing packages, more machines)
is logged as not run, with the reason; the shim refuses anything it does not know, so a new kind of
command in the docs fails the check until it is taught. ``lorafit``, the example scripts and the python blocks
start as forks of a process that has imported torch, transformers and lorafit once (forkserver.py): most of
a small command's time was those imports.

    python tests/docs_check.py [DOC ...]     # runs the documents, prints every command and what ran
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHIM = Path(__file__).resolve().with_name("docs_shim.py")
SHIMMED = ("lorafit", "python", "python3", "torchrun", "pip", "curl", "make")
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.DOTALL | re.MULTILINE)


def documents() -> list[Path]:
    return [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


@dataclass
class Block:
    doc: Path
    line: int
    lang: str  # "bash" or "python"
    text: str

    def where(self) -> str:
        return f"{self.doc.relative_to(REPO)}:{self.line}"


def blocks(doc: Path) -> list[Block]:
    text = doc.read_text(encoding="utf-8")
    return [Block(doc, text[:m.start()].count("\n") + 1, m.group(1), m.group(2))
            for m in FENCE.finditer(text) if m.group(1) in ("bash", "python")]


def user_csv(path: Path, rows: int = 240) -> None:
    """The quickstart's "your own CSV": SST-2 sentences with their labels as class names."""
    import csv

    from lorafit.train.config import default_data_dir

    source = default_data_dir() / "sst2" / "train.jsonl"
    with open(source, encoding="utf-8") as fh, open(path, "w", newline="", encoding="utf-8") as out:
        writer = csv.writer(out)
        writer.writerow(["text", "label"])
        for _, line in zip(range(rows), fh):
            row = json.loads(line)
            writer.writerow([row["text"], ("negative", "positive")[int(row["label"])]])


def small_lm(root: Path) -> Path:
    """A tiny random Llama with a word-level tokenizer of the data sets' words and a chat template, where
    the docs name SmolLM2-135M (see docs_shim.small_model)."""
    import transformers

    from lorafit.train.config import default_data_dir
    from tests.test_train_support import CHAT_TEMPLATE, make_tokenizer

    data = default_data_dir()
    texts = []
    for name, fields in (("alpaca/train.jsonl", ("instruction", "input", "output")),
                         ("dialogsum/validation.jsonl", ("dialogue", "summary")),
                         ("dialogsum/test.jsonl", ("dialogue", "summary1"))):
        with open(data / name, encoding="utf-8") as fh:
            texts += [" ".join(str(row.get(f, "")) for f in fields) for row in map(json.loads, fh)]
    tok = make_tokenizer(texts + ["Summarize the following dialogue in one or two sentences."])
    tok.chat_template = CHAT_TEMPLATE
    config = transformers.LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                                      pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                                      bos_token_id=None, tie_word_embeddings=False)
    out = root / "small-lm"
    transformers.LlamaForCausalLM(config).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_document(doc: Path, workdir: Path, timeout: float = 900) -> list[dict]:
    """Runs the document's blocks in ``workdir``; returns the shim's log. Raises on the first block that fails."""
    return run_blocks(doc, workdir, prepare(workdir), timeout)


def prepare(workdir: Path) -> dict[str, str]:
    """What the documents' commands find in ``workdir`` (the examples, a CSV, a stand-in model, the shims), and
    the environment they run in. In this process: one thread at a time (transformers imports lazily)."""
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "examples").symlink_to(REPO / "examples")
    user_csv(workdir / "reviews.csv")
    stand_in = small_lm(workdir / ".models")
    bin_dir = workdir / ".shims"
    bin_dir.mkdir()
    for name in SHIMMED:
        shim = bin_dir / name
        shim.write_text(f'#!/bin/sh\nexec "$DOCS_PYTHON" "$DOCS_SHIM" {name} "$@"\n')
        shim.chmod(0o755)
    log = workdir / ".docs-check.jsonl"
    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", DOCS_PYTHON=sys.executable,
               DOCS_SHIM=str(SHIM), DOCS_LOG=str(log), DOCS_REAL_BIN=str(Path(sys.executable).parent),
               DOCS_PORT=str(free_port()), DOCS_SMALL_LM=str(stand_in), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    return env


def run_blocks(doc: Path, workdir: Path, env: dict[str, str], timeout: float = 900) -> list[dict]:
    """The document's blocks, one process each, in a ``prepare``d ``workdir``: safe in a thread of its own. The
    programs they call start as children of a fork server (forkserver.py) that has imported torch,
    transformers and lorafit once, where their environment is the document's."""
    from tests.forkserver import started  # REPO is on sys.path (main puts it there when run as a script)

    with open(workdir / ".forkserver.log", "w") as server_log, started(env, workdir, server_log) as env:
        return _run_blocks(doc, workdir, env, timeout)


def _run_blocks(doc: Path, workdir: Path, env: dict[str, str], timeout: float) -> list[dict]:
    log = Path(env["DOCS_LOG"])
    for block in blocks(doc):
        with open(log, "a") as fh:
            fh.write(json.dumps({"block": block.where()}) + "\n")
        if block.lang == "bash":
            # Background jobs (a server) end with their block, also when a command fails: left running, they
            # would hold the block's output open until the timeout.
            script = f"set -euo pipefail\ntrap '{{ kill $(jobs -p) 2>/dev/null; wait; }} || true' EXIT\n{block.text}\n"
            cmd = ["bash", "-c", script]
        else:
            cmd = [sys.executable, str(SHIM), "python-block", block.text]
        start = time.monotonic()
        proc = subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True, timeout=timeout, check=False)
        with open(log, "a") as fh:
            fh.write(json.dumps({"block_seconds": round(time.monotonic() - start, 1)}) + "\n")
        if proc.returncode != 0:
            raise AssertionError(f"{block.where()}: the {block.lang} block failed (exit {proc.returncode})\n"
                                 f"--- block ---\n{block.text}--- stdout (end) ---\n{proc.stdout[-4000:]}\n"
                                 f"--- stderr (end) ---\n{proc.stderr[-6000:]}")
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def format_log(records: list[dict]) -> str:
    lines, header = [], 0
    for r in records:
        if "block" in r:
            header = len(lines)
            lines.append(f"{r['block']}")
        elif "block_seconds" in r:
            lines[header] += f"  ({r['block_seconds']} s)"
        elif r.get("ran"):
            lines.append(f"  ran      {r['command']}")
        else:
            lines.append(f"  not run  {r['command']}  ({r['reason']})")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    sys.path.insert(0, str(REPO))  # tests.test_train_support, when run as a script

    docs = [Path(a).resolve() for a in argv] or documents()
    for doc in docs:
        with tempfile.TemporaryDirectory() as tmp:
            print(format_log(run_document(doc, Path(tmp))), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
