"""Every documented command runs: README.md's and docs/*.md's bash and python blocks, in order, made small
(tests/docs_check.py; `make docs-check` prints the list of what ran)."""

import pytest

from tests.docs_check import REPO, blocks, documents, format_log, prepare, run_blocks
from tests.side_by_side import ONE_THREAD, register

DOCUMENTS = [d for d in documents() if blocks(d)]


def _data_dir():
    from lorafit.train.config import default_data_dir

    return default_data_dir()


def _check(doc):
    def prepare_document(workdir):
        env = {**prepare(workdir), **ONE_THREAD}
        return lambda: run_blocks(doc, workdir, env)
    return prepare_document


if (_data_dir() / "sst2").is_dir():
    for _doc in DOCUMENTS:  # about 5 s a block, the commands forked from a server that imported their modules
        register(f"docs:{_doc.relative_to(REPO)}", len(blocks(_doc)) * 5, _check(_doc))


@pytest.mark.parametrize("doc", [pytest.param(d, marks=pytest.mark.side_by_side(f"docs:{d.relative_to(REPO)}"))
                                 for d in DOCUMENTS], ids=lambda d: str(d.relative_to(REPO)))
def test_documented_commands_run(doc, side_by_side):
    if not (_data_dir() / "sst2").is_dir():
        pytest.skip(f"the documented commands read the data sets in {_data_dir()} (LORAFIT_DATA), absent here")
    records = side_by_side[f"docs:{doc.relative_to(REPO)}"].result()
    print(format_log(records))
    commands = [r for r in records if "command" in r]
    assert commands, f"{doc}: no documented command ran"
    refused = [r["command"] for r in commands if r["reason"].startswith("REFUSED")]
    assert not refused, refused


def test_only_commands_are_tagged_as_commands():
    """A fenced block is bash, python or text (or another language that is not run): an untagged fence
    would silently escape the check."""
    import re

    for doc in documents():
        text = doc.read_text(encoding="utf-8")
        untagged = [text[:m.start()].count("\n") + 1
                    for m in re.finditer(r"^[ \t]*```(\w*)\n.*?^[ \t]*```", text, flags=re.DOTALL | re.MULTILINE)
                    if not m.group(1)]
        assert not untagged, f"{doc.relative_to(REPO)}: fences without a language at lines {untagged}"
