"""Every documented command runs: README.md's and docs/*.md's bash and python blocks, in order, made small
(tests/docs_check.py; `make docs-check` prints the list of what ran)."""

import pytest

from tests.docs_check import REPO, blocks, documents, format_log, run_document


@pytest.mark.parametrize("doc", [d for d in documents() if blocks(d)], ids=lambda d: str(d.relative_to(REPO)))
def test_documented_commands_run(doc, tmp_path):
    from lorafit.train.config import default_data_dir

    if not (default_data_dir() / "sst2").is_dir():
        pytest.skip(f"the documented commands read the data sets in {default_data_dir()} (LORAFIT_DATA), absent here")
    records = run_document(doc, tmp_path)
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
                    for m in re.finditer(r"^[ \t]*```(\w*)\n.*?^[ \t]*```", text, flags=re.DOTALL | re.MULTILINE) if not m.group(1)]
        assert not untagged, f"{doc.relative_to(REPO)}: fences without a language at lines {untagged}"
