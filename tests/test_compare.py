"""forgetlab.compare on hand-built run folders: equal, differing, and different but within the reported intervals."""
from __future__ import annotations

import json

import pytest

from forgetlab.compare import Tolerance, compare_runs, interval_groups, main

SUMMARY = {
    "03_gradient_ascent": {"per_forget_set": {"id": {"initial_genex_bits": 50.25, "steps_to_target": 12},
                                              "canary": {"initial_genex_bits": 4.0, "steps_to_target": None}},
                           "model": "tiny-gpt2"},
    "04_tradeoffs": {"claims": [{"claim": "C1", "verdict": "agrees", "gap": 5.0, "gap_lo": 3.0, "gap_hi": 7.0}]},
    "05_memorization": {"correlations": {"memorization~difficulty": {"spearman": 0.5, "ci_low": 0.2, "ci_high": 0.7,
                                                                      "n": 10}}},
}
TABLE = ("kind,method,estimate,low,high,n_seeds,verdict\n"
         "id,ga,10.0,8.0,12.0,3,agrees\n"
         "canary,ga,2.5,1.0,4.0,3,inconclusive\n")


def _run(root, summary=SUMMARY, table=TABLE, extra=None):
    (root / "tables").mkdir(parents=True)
    (root / "summary.json").write_text(json.dumps(summary, indent=2))
    (root / "tables" / "claims.csv").write_text(table)
    for name, text in (extra or {}).items():
        (root / name).write_text(text)
    return root


def _edit(obj, path, value):
    obj = json.loads(json.dumps(obj))
    node = obj
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return obj


def test_identical_runs_are_equal_bitwise_and_within_tolerance(tmp_path, capsys):
    a, b = _run(tmp_path / "a"), _run(tmp_path / "b")
    assert main([str(a), str(b)]) == 0
    assert main([str(a), str(b), "--exact"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("EQUAL: ") and "2 files agree (rtol=1e-05, atol=1e-08" in out[0]
    assert out[1].startswith("EQUAL: ") and "(bitwise)" in out[1]
    result = compare_runs(a, b)
    # json: 5 values in 03, 2 + a group of 3 in 04, a group of 3 + n in 05; csv: 2 rows x 7 columns
    assert result.files == 2 and result.values == 5 + 5 + 4 + 2 * 7


def test_a_last_digit_differs_only_bitwise(tmp_path, capsys):
    a = _run(tmp_path / "a")
    b = _run(tmp_path / "b", _edit(SUMMARY, ["03_gradient_ascent", "per_forget_set", "id", "initial_genex_bits"],
                                   50.250000001))
    assert main([str(a), str(b)]) == 0
    assert main([str(a), str(b), "--exact"]) == 1
    out = capsys.readouterr().out.splitlines()
    assert out[1] == "summary.json  03_gradient_ascent.per_forget_set.id.initial_genex_bits  A=50.25  B=50.250000001"
    assert out[2].startswith("DIFFERENT: 1 difference(s) in 1 file(s)")


def test_every_difference_is_printed_with_file_key_and_both_values(tmp_path, capsys):
    a = _run(tmp_path / "a", extra={"tables/only_a.csv": "x\n1\n"})
    summary = _edit(SUMMARY, ["03_gradient_ascent", "per_forget_set", "id", "steps_to_target"], 14)
    summary = _edit(summary, ["04_tradeoffs", "claims", 0, "verdict"], "inconclusive")
    summary = _edit(summary, ["03_gradient_ascent", "model"], None)
    del summary["05_memorization"]
    table = TABLE.replace("canary,ga,2.5,1.0,4.0,3,inconclusive", "canary,ga,2.5,1.0,4.0,4,inconclusive")
    b = _run(tmp_path / "b", summary, table.replace("id,ga", "code,ga"))
    assert main([str(a), str(b)]) == 1
    out = capsys.readouterr().out.splitlines()
    assert out[:-1] == [
        "summary.json  05_memorization  A={'correlations': {'memorization~difficulty': {'spearman': 0.5, "
        "'ci_low': 0.2, 'ci_high': 0.7, 'n': 10}}}  B='(missing)'  (key in one run only)",
        "summary.json  03_gradient_ascent.per_forget_set.id.steps_to_target  A=12  B=14",
        "summary.json  03_gradient_ascent.model  A='tiny-gpt2'  B=None",
        "summary.json  04_tradeoffs.claims[0].verdict  A='agrees'  B='inconclusive'",
        "tables/only_a.csv  (file)  A='present'  B='(missing)'  (table in one run only)",
        "tables/claims.csv  row kind = code  A='(missing)'  B='present'  (row in one run only)",
        "tables/claims.csv  row kind = id  A='present'  B='(missing)'  (row in one run only)",
        "tables/claims.csv  row kind = canary column n_seeds  A=3  B=4",
    ]
    assert out[-1].startswith("DIFFERENT: 8 difference(s) in 3 file(s)")


def test_values_within_each_others_interval_agree(tmp_path, capsys):
    a = _run(tmp_path / "a")
    summary = _edit(SUMMARY, ["04_tradeoffs", "claims", 0], {"claim": "C1", "verdict": "agrees",
                                                             "gap": 5.5, "gap_lo": 3.4, "gap_hi": 7.6})
    summary = _edit(summary, ["05_memorization", "correlations", "memorization~difficulty"],
                    {"spearman": 0.6, "ci_low": 0.3, "ci_high": 0.8, "n": 10})
    within = TABLE.replace("id,ga,10.0,8.0,12.0", "id,ga,11.0,9.0,13.5")
    b = _run(tmp_path / "b", summary, within)
    assert main([str(a), str(b)]) == 0
    assert main([str(a), str(b), "--exact"]) == 1                 # not bitwise, of course
    capsys.readouterr()
    # outside: B's estimate is beyond A's interval (and A's below B's)
    far = _edit(summary, ["04_tradeoffs", "claims", 0, "gap"], 7.7)
    far = _edit(far, ["04_tradeoffs", "claims", 0, "gap_lo"], 7.2)
    c = _run(tmp_path / "c", far, TABLE.replace("canary,ga,2.5,1.0,4.0", "canary,ga,4.5,4.1,5.0"))
    assert main([str(a), str(c)]) == 1
    out = capsys.readouterr().out.splitlines()
    assert out[:2] == [
        "summary.json  04_tradeoffs.claims[0].gap  A=5.0  B=7.7  (outside tolerance and intervals: "
        "A [3.0, 7.0], B [7.2, 7.6])",
        "tables/claims.csv  row kind = canary column estimate  A=2.5  B=4.5  (outside tolerance and intervals: "
        "A [1.0, 4.0], B [4.1, 5.0])"]


def test_which_keys_count_as_intervals():
    floats = lambda k: True  # noqa: E731
    assert interval_groups(["gap", "gap_lo", "gap_hi", "x"], floats) == {"gap": ("gap_lo", "gap_hi")}
    assert interval_groups(["auc", "auc_ci_low", "auc_ci_high"], floats) == {"auc": ("auc_ci_low", "auc_ci_high")}
    assert interval_groups(["estimate", "low", "high", "level"], floats) == {"estimate": ("low", "high")}
    assert interval_groups(["spearman", "ci_low", "ci_high", "n"], lambda k: k != "n") == \
        {"spearman": ("ci_low", "ci_high")}
    assert interval_groups(["a", "b", "low", "high"], floats) == {}          # ambiguous: no interval assumed
    assert interval_groups(["gap_lo", "gap_hi"], floats) == {}               # bounds without their value


def test_missing_folders_and_bad_tolerances(tmp_path, capsys):
    assert main([str(tmp_path / "nope"), str(tmp_path)]) == 2
    assert "does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([str(tmp_path), str(tmp_path), "--rtol", "nan"])
    assert compare_runs(tmp_path, tmp_path, Tolerance(exact=True)).differences == []
