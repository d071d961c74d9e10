"""The batch runner's bookkeeping (running notebooks is the smoke batch's job in scripts/run_tests.sh)."""
import json

import pytest

from forgetlab.batch import merge_timings, notebooks


def test_notebooks_in_reading_order_and_selection(tmp_path):
    names = [p.name for p in notebooks()]
    assert names == sorted(names) and names[0].startswith("01_") and len(names) >= 6
    assert [p.name[:2] for p in notebooks(["03", "04"])] == ["03", "04"]
    with pytest.raises(SystemExit, match="no notebook matches"):
        notebooks(["99"])
    for name in ("02_b.ipynb", "10_c.ipynb", "01_a.ipynb", "scratch.ipynb", "03_d.txt"):
        (tmp_path / name).write_text("{}")
    assert [p.name for p in notebooks(directory=tmp_path)] == ["01_a.ipynb", "02_b.ipynb", "10_c.ipynb"]
    assert [p.name for p in notebooks(["10", "01"], tmp_path)] == ["01_a.ipynb", "10_c.ipynb"]


def test_full_run_replaces_the_report(tmp_path):
    path = tmp_path / "timings.json"
    path.write_text(json.dumps({"profile": "default.yaml", "seconds": {"01_a": 5.0, "total": 5.0},
                                "peak_kernel_rss_mib": 9000.0}))
    report = merge_timings(path, "default.yaml", {"01_a": 1.5, "02_b": 2.25}, 100.0, partial=False)
    assert report == {"profile": "default.yaml", "seconds": {"01_a": 1.5, "02_b": 2.25, "total": 3.8},
                      "peak_kernel_rss_mib": 100.0, "failed": []}


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


# ---------------------------------------------------------------- a small batch of throwaway notebooks

def _notebook(path, *sources):
    """A notebook with the batch's parameters cell, then one code cell per source."""
    import nbformat

    params = nbformat.v4.new_code_cell('profile = "default"\noverrides = {}\noutput_dir = "."')
    params.metadata["tags"] = ["parameters"]
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_markdown_cell("# A throwaway notebook"), params]
                                  + [nbformat.v4.new_code_cell(s) for s in sources])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.metadata["language_info"] = {"name": "python"}
    nbformat.write(nb, path)


MARK = "from pathlib import Path\nPath(output_dir, '{name}.ran').write_text('yes')"
FIGURE = ("import matplotlib\nmatplotlib.use('agg')\nimport matplotlib.pyplot as plt\n%matplotlib inline\n"
          "plt.plot([1, 2, 3])\nplt.title('a figure')\nplt.show()")


def test_a_failing_notebook_is_reported_and_the_others_still_run(tmp_path, capsys):
    from forgetlab.batch import main, run_batch

    nbs = tmp_path / "nbs"
    nbs.mkdir()
    _notebook(nbs / "01_first.ipynb", MARK.format(name="01"), FIGURE)
    _notebook(nbs / "02_fails.ipynb", "x = 1", "y = x + 1  # the failing cell\nraise ValueError('on purpose\\nsecond line')",
              MARK.format(name="02"))
    _notebook(nbs / "03_after.ipynb", MARK.format(name="03"),
              "Path(output_dir, 'tables').mkdir(exist_ok=True)\nPath(output_dir, 'tables', 't.csv').write_text('a\\n1\\n')")
    out = tmp_path / "out"
    result = run_batch("smoke", output_dir=str(out), notebook_dir=nbs, heartbeat_s=0)
    printed = capsys.readouterr().out
    # every notebook ran, except the cells after the failure
    assert (out / "01.ran").is_file() and (out / "03.ran").is_file() and not (out / "02.ran").exists()
    # code cells of 02: parameters, injected parameters, x = 1, the failing cell (4 of 5)
    assert result["failed"] == [{"notebook": "02_fails", "cell": "4/5 (In [4])",
                                 "source": "y = x + 1  # the failing cell", "error": "ValueError: on purpose\nsecond line"}]
    assert set(result["seconds"]) == {"01_first", "02_fails", "03_after", "total"}
    saved = json.loads((out / "timings.json").read_text())
    assert saved["failed"] == result["failed"] and saved["seconds"] == result["seconds"]
    # the terminal: progress per cell, then the summary table
    assert "[forgetlab] 03_after: cell 3/4" in printed and "notebook 3/3: 03_after.ipynb" in printed
    table = printed[printed.index("1 notebook(s) failed"):]
    assert "02_fails" in table and "4/5 (In [4])" in table and "ValueError: on purpose" in table
    assert "y = x + 1  # the failing cell" in table and "second line" in table
    assert "2 of 3 notebooks ran without error" in printed
    # the rendered report: each notebook as HTML with its figure embedded, and an index linking them
    index = (out / "index.html").read_text()
    for stem in ("01_first", "02_fails", "03_after"):
        assert f'href="notebooks/{stem}.html"' in index and (out / "notebooks" / f"{stem}.html").is_file()
    assert "data:image/png;base64" in (out / "notebooks" / "01_first.html").read_text()
    assert "<title>forgetlab run smoke</title>" in index
    assert "ValueError: on purpose" in index and "npo_beta" in index and 'href="tables/t.csv"' in index
    # the command line exits non-zero when a notebook failed, 0 when none did
    import forgetlab.batch as batch
    for failed, code in ((result["failed"], 1), ([], 0)):
        batch_run = batch.run_batch
        batch.run_batch = lambda *a, **k: {"failed": failed}
        try:
            assert main(["smoke"]) == code
        finally:
            batch.run_batch = batch_run


def test_failure_table_lists_each_failure_with_its_error_lines():
    from forgetlab.batch import failure_table

    table = failure_table([{"notebook": "03_ga", "cell": "7/20 (In [7])", "source": "run_study(P)",
                            "error": "RuntimeError: boom\nmore detail"},
                           {"notebook": "06_llm", "cell": "-", "source": "", "error": "DeadKernelError: died"}])
    lines = table.splitlines()
    assert lines[0].split() == ["notebook", "cell", "source", "error"]
    assert lines[2].startswith("03_ga") and "7/20 (In [7])" in lines[2] and lines[2].endswith("RuntimeError: boom")
    assert lines[3].strip() == "more detail" and lines[4].startswith("06_llm")
    assert failure_table([]) == ""


def test_heartbeat_reports_a_long_cell():
    import io
    import time as _time

    import nbformat

    from forgetlab.batch import CellProgress

    stream = io.StringIO()
    progress = CellProgress("06_llm", heartbeat_s=0.1, stream=stream)
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_markdown_cell("x"), nbformat.v4.new_code_cell("train()"),
                                         nbformat.v4.new_code_cell("plot()")])
    progress.begin(nb)
    progress.cell_started(nb.cells[0], 0)            # markdown: not counted, not printed
    progress.cell_started(nb.cells[1], 1)
    _time.sleep(0.35)
    progress.cell_started(nb.cells[2], 2)         # a short cell: no heartbeat before the end
    progress.end()
    text = stream.getvalue()
    assert text.count("still in cell 1/2") >= 2 and "still in cell 2/2" not in text
    assert "[forgetlab] 06_llm: cell 1/2 [0:00:00] train()" in text
    assert "[forgetlab] 06_llm: still in cell 1/2 (0:00:00 in this cell" in text


def test_failures_of_rerun_notebooks_are_replaced(tmp_path):
    path = tmp_path / "timings.json"
    old_fail = [{"notebook": "02_b", "cell": "3/9", "source": "x", "error": "E: old"},
                {"notebook": "03_c", "cell": "1/9", "source": "y", "error": "E: other"}]
    path.write_text(json.dumps({"profile": "smoke.yaml", "seconds": {"02_b": 1.0, "03_c": 2.0, "total": 3.0},
                                "peak_kernel_rss_mib": 1.0, "failed": old_fail}))
    report = merge_timings(path, "smoke.yaml", {"02_b": 4.0}, 1.0, partial=True, failed=[])
    assert report["failed"] == [old_fail[1]]                  # 02_b was rerun and passed; 03_c still failed
