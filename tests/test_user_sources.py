"""A user's own text as a forget-set source: every format, every script family, every bad input (fast: no study
is built except where the error must come before the long work)."""
import json

import pytest

from forgetlab import forget_sets as fs
from forgetlab import user_sources as us
from forgetlab.config import ParameterError, load_params
from forgetlab.tokenizer import decode, dominant_script, encode, script_token_table, train_tokenizer

LINES = ["the first example sentence", "a second one, longer than the first", "third"]


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(["To be, or not to be: that is the question.\nWhether 'tis nobler in the mind\n"] * 30, 300)


def test_plain_lines_one_record_per_line(tmp_path):
    path = tmp_path / "mine.txt"
    path.write_text("\n".join(LINES) + "\n\n", encoding="utf-8")
    assert us.detect_format(path) == "lines"        # a trailing blank line does not make paragraphs
    assert us.read_records(path) == LINES
    assert us.read_records(path, "lines") == LINES


def test_plain_paragraphs_one_record_per_block(tmp_path):
    path = tmp_path / "mine.txt"
    path.write_text("line one\nline two\n\n\nsecond paragraph\n\nthird\n", encoding="utf-8")
    assert us.detect_format(path) == "paragraphs"
    assert us.read_records(path) == ["line one\nline two", "second paragraph", "third"]
    assert us.read_records(path, "lines") == ["line one", "line two", "second paragraph", "third"]


def test_jsonl_reads_the_text_field(tmp_path):
    path = tmp_path / "mine.jsonl"
    path.write_text("\n".join(json.dumps({"id": i, "body": t}) for i, t in enumerate(LINES)) + "\n", encoding="utf-8")
    assert us.read_records(path, "auto", "body") == LINES
    with pytest.raises(us.CustomSourceError, match=r"no column 'text' \(it has: id, body\).*set custom_text_field"):
        us.read_records(path)
    path.write_text('{"text": "ok"}\nnot json\n', encoding="utf-8")
    with pytest.raises(us.CustomSourceError, match="line 2 is not JSON.*one JSON object per line"):
        us.read_records(path)


def test_csv_reads_the_text_column(tmp_path):
    path = tmp_path / "mine.csv"
    path.write_text('id,text\n1,"the first example sentence"\n2,"a second one, longer than the first"\n3,third\n',
                    encoding="utf-8")
    assert us.read_records(path) == LINES
    with pytest.raises(us.CustomSourceError, match="no column 'body'.*set custom_text_field"):
        us.read_records(path, "csv", "body")


def test_datasets_folder_saved_with_save_to_disk(tmp_path):
    from datasets import Dataset, DatasetDict

    folder = tmp_path / "ds"
    Dataset.from_dict({"text": LINES, "n": [1, 2, 3]}).save_to_disk(str(folder))
    assert us.detect_format(folder) == "datasets"
    assert us.read_records(folder) == LINES
    with pytest.raises(us.CustomSourceError, match="no column 'body' .*text, n"):
        us.read_records(folder, "datasets", "body")
    both = tmp_path / "dd"
    DatasetDict({"train": Dataset.from_dict({"text": LINES[:2]}),
                 "extra": Dataset.from_dict({"text": LINES[2:]})}).save_to_disk(str(both))
    assert us.read_records(both) == LINES[2:] + LINES[:2]                 # splits in name order
    with pytest.raises(us.CustomSourceError, match="needs a folder written by Dataset.save_to_disk"):
        us.read_records(tmp_path / "ds" / "dataset_info.json", "datasets")


def test_text_file_through_load_dataset_text(tmp_path):
    path = tmp_path / "mine.txt"
    path.write_text("\n".join(LINES) + "\n", encoding="utf-8")
    assert us.read_records(path, "hf-text") == LINES


SCRIPTS = {   # (script family, text): the byte-level tokenizer trained on English handles them all
    "Latin": "Grüße aus München, ça va très bien aujourd'hui, merci beaucoup!",
    "Cyrillic": "Привет, как у тебя дела сегодня? Всё хорошо, спасибо большое!",
    "CJK": "今日はとても良い天気ですね。明日も晴れるといいですね。中文也可以。",
    "Arabic": "مرحبا، كيف حالك اليوم؟ أنا بخير، شكرا جزيلا لك يا صديقي.",
}


@pytest.mark.parametrize("family", list(SCRIPTS))
def test_every_script_becomes_examples_of_exact_token_length(tmp_path, tok, family):
    text = SCRIPTS[family]
    path = tmp_path / f"{family}.txt"
    path.write_text("\n".join(f"{i}: {text}" for i in range(5)) + "\nshort\n", encoding="utf-8")
    records = us.read_records(path)
    assert len(records) == 6 and records[0] == f"0: {text}"
    windows, note = fs.record_windows(records, tok, 16)
    assert len(windows) == 5 and all(len(w) == 16 for w in windows)          # "short" is skipped and counted
    assert "6 records, 1 shorter than example_tokens = 16 tokens" in note
    for record, w in zip(records, windows):
        assert decode(tok, encode(tok, record)) == record and encode(tok, record)[:16] == w
    assert dominant_script(text) == ("CJK" if family == "CJK" else family)


def test_tokens_per_character_grow_with_bytes_per_character(tok):
    table = script_token_table(tok, {name: [t] for name, t in SCRIPTS.items()}, example_tokens=32).set_index("source")
    assert table.loc["Latin", "tokens_per_char"] < table.loc["Cyrillic", "tokens_per_char"]
    assert table.loc["Cyrillic", "tokens_per_char"] < table.loc["CJK", "tokens_per_char"]
    # An English-trained byte-level BPE spends about one token per byte on scripts it never saw.
    for name in ("Cyrillic", "CJK", "Arabic"):
        row = table.loc[name]
        assert row.tokens_per_char == pytest.approx(row.bytes_per_char, rel=0.25)
        assert row.example_chars == pytest.approx(32 / row.tokens_per_char)


def test_missing_file_names_the_fix(tmp_path):
    with pytest.raises(us.CustomSourceError, match="does not exist.*fix the path or set custom_source"):
        us.read_records(tmp_path / "nope.txt")
    with pytest.raises(ParameterError, match="custom_source .*does not exist"):
        load_params("smoke", {"forget_kinds": ["id", "custom"], "custom_source": str(tmp_path / "nope.txt")})


def test_empty_file_names_the_fix(tmp_path):
    path = tmp_path / "empty.txt"
    path.write_text("", encoding="utf-8")
    with pytest.raises(us.CustomSourceError, match="is empty: add text"):
        us.read_records(path)
    with pytest.raises(ParameterError, match="is empty: add text"):
        load_params("smoke", {"forget_kinds": ["custom"], "custom_source": str(path)})
    path.write_text("\n   \n\n", encoding="utf-8")
    with pytest.raises(us.CustomSourceError, match="no non-blank records.*add text"):
        us.read_records(path)


def test_not_utf8_names_the_fix(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes("caf\xe9 au lait\n".encode("latin-1"))
    with pytest.raises(us.CustomSourceError, match="not UTF-8.*save it as UTF-8"):
        us.read_records(path)


def test_custom_kind_without_a_source_is_refused():
    with pytest.raises(ParameterError, match="forget_kinds has 'custom' but custom_source is empty"):
        load_params("smoke", {"forget_kinds": ["id", "custom"]})
    with pytest.raises(ParameterError, match="custom_format"):
        load_params("smoke", {"custom_format": "docx"})


def test_too_few_records_for_the_roles_stop_before_the_long_work(tmp_path):
    path = tmp_path / "few.txt"
    path.write_text("\n".join(f"line {i} of my own text" for i in range(5)) + "\n", encoding="utf-8")
    p = load_params("smoke", {"forget_kinds": ["custom"], "custom_source": str(path), "reference_data": "twins"})
    with pytest.raises(us.CustomSourceError, match=r"has 5 records but the custom kind needs 36 .*'twin': 4.*add "
                                                   r"records .*or lower forget_size"):
        fs.build_study_data(p)


def test_relative_paths_resolve_against_the_repository(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert us.resolve_source("papermill_params/smoke.yaml") == us.REPO_ROOT / "papermill_params" / "smoke.yaml"


def test_digest_changes_with_the_content(tmp_path):
    path = tmp_path / "mine.txt"
    path.write_text("one\n", encoding="utf-8")
    first = us.source_digest(path)
    path.write_text("two\n", encoding="utf-8")
    assert us.source_digest(path) != first and us.source_digest("") == ""


def test_formats_match_the_schema():
    from forgetlab.config import SCHEMA

    assert all(SCHEMA["custom_format"].check(f) for f in us.FORMATS)
