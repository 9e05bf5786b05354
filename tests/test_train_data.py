"""Reading data files as users write them: odd characters inside fields, byte-order marks, other encodings,
careless labels."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from tests.test_train_support import classification_setup, sentiment_rows, write_jsonl

pytest.importorskip("transformers")

from lorafit.train.config import load_config  # noqa: E402
from lorafit.train.data import eval_batches, label_set, load_splits, read_rows  # noqa: E402

# Legal inside a CSV field or a JSON string, yet str.splitlines() cuts a line at every one of them but the quote.
ODD = ["next\x85line", "line\u2028separator", "para\u2029graph", "form\x0cfeed", "vertical\x0btab", "file\x1csep",
       "carriage\rreturn", "new\nline", "crlf\r\ninside", 'a "quoted" word', "comma, and\ttab"]


@pytest.fixture(scope="module")
def config_path(tmp_path_factory) -> Path:
    return classification_setup(tmp_path_factory.mktemp("data"))


def splits_of(config_path: Path, train: Path, *overrides: str):
    config = load_config(config_path, [f"data.train={train}", *overrides])
    return load_splits(config), config


def write_csv(path: Path, rows: list[dict], delimiter: str = ",", encoding: str = "utf-8") -> Path:
    with open(path, "w", newline="", encoding=encoding) as fh:
        writer = csv.DictWriter(fh, list(rows[0]), delimiter=delimiter)
        writer.writeheader()
        writer.writerows(rows)
    return path


def test_csv_tsv_and_jsonl_keep_every_row_with_line_breaking_characters_intact(tmp_path):
    rows = [{"text": text, "label": str(i % 2)} for i, text in enumerate(ODD)]
    files = [write_csv(tmp_path / "odd.csv", rows), write_csv(tmp_path / "odd.tsv", rows, "\t"),
             write_jsonl(tmp_path / "odd.jsonl", rows)]
    # json.dumps escapes \r and \n but writes U+0085, U+2028 etc. as they are when ensure_ascii is off
    (tmp_path / "raw.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows),
                                        encoding="utf-8")
    (tmp_path / "array.json").write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
    (tmp_path / "crlf.jsonl").write_bytes(b"".join(json.dumps(r, ensure_ascii=False).encode() + b"\r\n"
                                                   for r in rows))
    for path in files + [tmp_path / "raw.jsonl", tmp_path / "array.json", tmp_path / "crlf.jsonl"]:
        assert read_rows(path) == rows, path.name


def test_a_byte_order_mark_is_not_part_of_the_first_field(config_path, tmp_path):
    rows = [{"text": r["text"], "label": str(r["label"])} for r in sentiment_rows(8)]
    for path in (write_csv(tmp_path / "bom.csv", rows, encoding="utf-8-sig"),
                 write_csv(tmp_path / "bom.tsv", rows, "\t", encoding="utf-8-sig")):
        assert read_rows(path) == rows
        splits, _ = splits_of(config_path, path)
        assert splits.train[0]["text"] == rows[0]["text"]
    (tmp_path / "bom.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8-sig")
    assert read_rows(tmp_path / "bom.jsonl") == rows


def test_a_file_that_is_not_utf8_names_the_file_the_line_and_the_encoding(tmp_path):
    rows = [{"text": "fine", "label": "0"}, {"text": "a café review", "label": "1"}]
    path = write_csv(tmp_path / "latin1.csv", rows, encoding="latin-1")
    with pytest.raises(ValueError, match=r"latin1\.csv:3: byte 0xe9 is not UTF-8; data files must be UTF-8 .*"
                                         r"Latin-1") as info:
        read_rows(path)
    assert not isinstance(info.value, UnicodeDecodeError)
    (tmp_path / "latin1.jsonl").write_bytes(b'{"text": "ok", "label": 0}\n' * 1000 + b'{"text": "na\xefve"}\n')
    with pytest.raises(ValueError, match=r"latin1\.jsonl:1001: byte 0xef is not UTF-8"):
        read_rows(tmp_path / "latin1.jsonl")


def test_a_short_row_after_a_quoted_newline_names_its_line(tmp_path):
    (tmp_path / "short.csv").write_text('text,label\n"two\nlines",1\nno label here\n')
    with pytest.raises(ValueError, match=r"short\.csv:4: the row has a different number of columns than the "
                                         r"header \(text, label\)"):
        read_rows(tmp_path / "short.csv")


def test_empty_labels_and_labels_differing_by_space_are_refused_naming_the_row(config_path, tmp_path):
    rows = [{"text": r["text"], "label": "pos" if r["label"] else "neg"} for r in sentiment_rows(6)]
    rows[3]["label"] = "  "
    with pytest.raises(ValueError, match=r"empty\.csv: row 4: the label \('label'\) is empty"):
        splits_of(config_path, write_csv(tmp_path / "empty.csv", rows))
    rows[3]["label"] = " pos"
    with pytest.raises(ValueError, match=r"space\.csv: row 4: label ' pos' differs from 'pos' \(row 2\) only by "
                                         r"surrounding space"):
        splits_of(config_path, write_csv(tmp_path / "space.csv", rows))
    rows[3]["label"] = None
    with pytest.raises(ValueError, match=r"null\.jsonl: row 4: labels must be strings or integers, got None"):
        splits_of(config_path, write_jsonl(tmp_path / "null.jsonl", rows))


def test_the_same_label_as_number_and_text_is_one_class(config_path, tmp_path):
    rows = sentiment_rows(8)
    rows[1]["label"] = "1"
    splits, config = splits_of(config_path, write_jsonl(tmp_path / "mixed.jsonl", rows))
    assert [str(v) for v in label_set(config, splits)] == ["0", "1"]


def test_evaluation_batches_are_sized_by_tokens():
    lengths = [10, 300, 40, 300, 20, 35, 5000]
    batches = eval_batches(lengths, batch_size=3, max_tokens=700)
    assert batches == [[6], [1, 3], [2, 5, 4], [0]]  # longest first; a row longer than the budget alone
    assert all(len(b) * lengths[b[0]] <= 700 for b in batches if len(b) > 1)
    assert eval_batches(lengths, batch_size=3) == [[6, 1, 3], [2, 5, 4], [0]]  # rows only, as generation uses
