import numpy as np
import pytest

from forgetlab import forget_sets as fs
from forgetlab.tokenizer import decode, train_tokenizer


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(["alpha beta gamma\ndelta epsilon\n"] * 50, vocab_size=300)


def test_line_start_windows_have_exact_length_and_start_lines(tok):
    text = "alpha beta gamma\ndelta epsilon\nalpha beta\ngamma delta epsilon alpha\n"
    windows = fs.line_start_windows(tok, text, 3)
    assert windows and all(len(w) == 3 for w in windows)
    for w in windows:
        assert (text.startswith(decode(tok, w))) or ("\n" + decode(tok, w)) in text
    flat = [i for w in windows for i in w]
    assert len(flat) <= len(tok.encode(text).ids)  # non-overlapping


def test_pad_rows_masks_padding(tok):
    ids, labels = fs.pad_rows([[0, 5, 6], [0, 7]], block=5, pad=0)
    assert ids.tolist() == [[0, 5, 6, 0, 0], [0, 7, 0, 0, 0]]
    assert labels.tolist() == [[0, 5, 6, -100, -100], [0, 7, -100, -100, -100]]


def test_canary_digits_are_single_tokens(tok):
    ids = fs.canary_ids(tok, "0427")
    prefix = fs.canary_prefix_ids(tok)
    assert ids[: len(prefix)] == prefix
    assert [decode(tok, [i]) for i in ids[len(prefix): len(prefix) + 4]] == list("0427")
    assert len(ids) == len(prefix) + 4
    assert decode(tok, ids) == "My secret number is 0427"


def test_roles_counts_and_lengths(small_data, small_params):
    ex = small_data.examples
    p = small_params
    for kind in p["forget_kinds"]:
        sel = ex[ex.kind == kind]
        assert (sel.role == "forget").sum() == p["forget_size"]
        assert (sel.role == "control").sum() == p["control_size"]
        if kind != "canary":
            assert (sel.n_tokens == p["example_tokens"]).all()
            assert (sel.role == "population").sum() == p["population_size"]
    assert ex.uid.is_unique
    # no example appears in two roles
    assert len({tuple(i) for i in ex.ids}) == len(ex)


def test_canary_scoring_covers_exactly_the_secret(small_data, small_params):
    can = small_data.select("canary")
    assert (can.n_scored == small_params["canary_digits"]).all()
    for r in can.itertuples():
        assert decode(small_data.tokenizer, r.ids[r.score_start:]) == r.secret


def test_insertion_counts(small_data, small_params):
    ids, labels, row_uid = fs.training_rows(small_data, include_forget=True)
    counts = fs.insertion_counts(row_uid)
    ex = small_data.examples.set_index("uid")
    for uid, n in counts.items():
        expected = {"forget": small_params["insertions"], "background": small_params["background_insertions"]}[ex.role[uid]]
        assert n == expected
    assert set(counts.index) == set(ex.index[ex.role.isin(["forget", "background"])])
    _, _, ref_uid = fs.training_rows(small_data, "reference")
    assert (fs.training_rows(small_data, include_forget=False)[2] == ref_uid).all()     # the older spelling
    ref_counts = fs.insertion_counts(ref_uid)
    n_forget = (ex.role == "forget").sum()
    if small_data.reference_data == "twins":        # the references hold twins exactly where the originals hold forget
        assert set(ref_counts.index) == set(ex.index[ex.role.isin(["background", "twin"])])
        assert len(ids) == len(ref_uid)
    else:
        assert set(ref_counts.index) == set(ex.index[ex.role == "background"])
        assert len(ids) - len(ref_uid) == n_forget * small_params["insertions"]
    # labels ignore the padding of inserted rows only
    assert (labels[: len(small_data.train_rows)] != -100).all()


def test_id_forget_passages_are_cut_out_of_the_shared_stream(small_data):
    stream = small_data.train_rows.reshape(-1).tolist()
    text_stream = " ".join(map(str, stream))
    for ids in small_data.select("id", "forget").ids:
        passage = " ".join(map(str, ids[1:]))
        assert passage not in text_stream


def test_never_trained_roles_are_not_in_training_rows(small_data):
    ids, _, _ = fs.training_rows(small_data, include_forget=True)
    rows = {tuple(r) for r in ids.tolist()}
    for r in small_data.examples[small_data.examples.role.isin(["population", "control"])].itertuples():
        padded = tuple(list(r.ids) + [small_data.bos] * (small_data.block_size - len(r.ids)))
        assert padded not in rows


def test_build_is_deterministic(small_params, small_data):
    again = fs.build_study_data(small_params)
    assert again.fingerprint() == small_data.fingerprint()
    assert np.array_equal(again.train_rows, small_data.train_rows)
    assert again.examples.uid.tolist() == small_data.examples.uid.tolist()


def test_too_small_source_is_a_clear_error(tok):
    import random
    windows = [[5, 6], [7, 8], [5, 6]]  # the duplicate counts once
    with pytest.raises(ValueError, match="2 distinct windows but code needs 3"):
        fs._assign_text_roles("code", "python", windows, {"forget": 2, "population": 1}, tok, random.Random(0))


def test_canary_templates_other_than_the_legacy_one(tok):
    prefix = fs.canary_prefix_ids(tok, "PIN:{secret}")
    ids = fs.canary_ids(tok, "0427", "PIN:{secret}")
    assert ids[: len(prefix)] == prefix and decode(tok, ids) == "PIN:0427" and len(ids) == len(prefix) + 4
    assert decode(tok, fs.canary_ids(tok, "99", "Код доступа {secret}")) == "Код доступа 99"
    assert fs.canary_prefix_ids(tok, "{secret}") == [0]
    with pytest.raises(ValueError, match="no {secret} placeholder"):
        fs.canary_prefix_ids(tok, "no placeholder")


def test_study_data_canary_prefix_comes_from_its_canaries(small_data):
    can = small_data.select("canary").iloc[0]
    assert small_data.canary_prefix_ids() == list(can.ids[: can.score_start])
    assert small_data.canary_ids(can.secret) == list(can.ids)


def test_kind_labels_follow_the_parameters(small_params):
    assert fs.kind_labels(small_params)["language"] == "OOD: other language"        # the legacy pool
    labels = fs.kind_labels(dict(small_params, language="japanese", custom_source="/tmp/my_diary.txt"))
    assert labels["language"] == "OOD: Japanese" and labels["custom"] == "custom: my_diary"
    assert fs.kind_labels(dict(small_params, language="russian+traditionalchinese"))["language"] == \
        "OOD: Russian + Traditional Chinese"


def test_kind_token_table_counts_tokens_and_characters(small_data):
    table = fs.kind_token_table(small_data).set_index("kind")
    ex = small_data.examples
    code = ex[ex.kind == "code"]
    assert table.loc["code", "tokens_per_example"] == code.n_tokens.mean()
    assert table.loc["code", "tokens_per_char"] == pytest.approx(code.n_tokens.sum() / code.text.str.len().sum())
    assert table.loc["id", "script"] == "Latin" and table.loc["canary", "examples"] == (ex.kind == "canary").sum()
