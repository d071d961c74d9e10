"""The batch runner's bookkeeping (running notebooks is the smoke batch's job in scripts/run_tests.sh)."""
import json

import pytest

from forgetlab.batch import merge_timings, notebooks


def test_notebooks_in_reading_order_and_selection():
    names = [p.name for p in notebooks()]
    assert names == sorted(names) and names[0].startswith("01_") and len(names) == 6
    assert [p.name[:2] for p in notebooks(["03", "04"])] == ["03", "04"]
    with pytest.raises(SystemExit, match="no notebook matches"):
        notebooks(["99"])


def test_full_run_replaces_the_report(tmp_path):
    path = tmp_path / "timings.json"
    path.write_text(json.dumps({"profile": "default.yaml", "seconds": {"01_a": 5.0, "total": 5.0},
                                "peak_kernel_rss_mib": 9000.0}))
    report = merge_timings(path, "default.yaml", {"01_a": 1.5, "02_b": 2.25}, 100.0, partial=False)
    assert report == {"profile": "default.yaml", "seconds": {"01_a": 1.5, "02_b": 2.25, "total": 3.8},
                      "peak_kernel_rss_mib": 100.0}


def test_partial_run_updates_only_the_notebooks_it_ran(tmp_path):
    path = tmp_path / "timings.json"
    path.write_text(json.dumps({"profile": "default.yaml", "seconds": {"01_a": 30.0, "02_b": 300.0,
                                                                       "03_c": 600.0, "total": 930.0},
                                "peak_kernel_rss_mib": 2800.0}))
    report = merge_timings(path, "default.yaml", {"03_c": 350.0}, 900.0, partial=True)
    assert report["seconds"] == {"01_a": 30.0, "02_b": 300.0, "03_c": 350.0, "total": 680.0}
    assert report["peak_kernel_rss_mib"] == 2800.0          # the larger of the two runs
    # Another profile's report, or a damaged file, is not merged.
    other = merge_timings(path, "smoke.yaml", {"03_c": 10.0}, 50.0, partial=True)
    assert other["seconds"] == {"03_c": 10.0, "total": 10.0}
    path.write_text("{not json")
    assert merge_timings(path, "default.yaml", {"03_c": 1.0}, 1.0, partial=True)["seconds"]["total"] == 1.0
