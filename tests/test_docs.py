"""Every documented command runs: README.md's and docs/*.md's bash and python blocks, in order, made small
(tests/docs_check.py; `make docs-check` prints the list of what ran)."""

from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.docs_check import REPO, blocks, documents, format_log, prepare, run_blocks

DOCUMENTS = [d for d in documents() if blocks(d)]


@pytest.fixture(scope="module")
def document_runs(tmp_path_factory):
    """Every document run at once, two at a time, the longest first: a documented command is a process of its
    own that spends most of its time starting up and loading on one core, so two documents take little longer
    than the longest alone."""
    from lorafit.train.config import default_data_dir

    if not (default_data_dir() / "sst2").is_dir():
        pytest.skip(f"the documented commands read the data sets in {default_data_dir()} (LORAFIT_DATA), absent here")
    longest_first = sorted(DOCUMENTS, key=lambda d: len(blocks(d)), reverse=True)
    workdirs = {doc: tmp_path_factory.mktemp(doc.stem) for doc in longest_first}
    envs = {doc: prepare(workdir) for doc, workdir in workdirs.items()}
    with ThreadPoolExecutor(max_workers=2) as pool:
        yield {doc: pool.submit(run_blocks, doc, workdirs[doc], envs[doc]) for doc in longest_first}


@pytest.mark.parametrize("doc", DOCUMENTS, ids=lambda d: str(d.relative_to(REPO)))
def test_documented_commands_run(doc, document_runs):
    records = document_runs[doc].result()
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
