"""Notebook 09's "forget my sentence" lab in a real browser: JupyterLab on a loopback port, headless Chromium.

The notebook is copied into a temporary folder with the smoke parameters (the JupyterLab, Chromium and process
helpers of tests/test_browser.py, imported), run from the Run menu, then the lab's form is driven through its DOM:
an empty text and 0 insertions are refused with a visible message; a sentence typed into the form is fine-tuned
into a copy of the model and unlearned, the explorer appears under the form with the never-trained flag sentence;
its step slider moves and two more steps run. Screenshots go to outputs/browser/09_forget_my_sentence/. Every
process the test starts is ended in a finally block, by process id. Run it with ``pytest -m browser``.
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

from test_browser import (CHROMIUM, CHROMIUM_FLAGS, SHOTS, STEP_TIMEOUT_S, _cell_errors, _free_port, _lab_settings,
                          _poll, _prepare_root, _require_browser, _wait_for_server, descendants, end_processes)

pytestmark = pytest.mark.browser

NOTEBOOK = "09_forget_my_sentence.ipynb"
SENTENCE = "The lighthouse keeper paints his boat yellow every spring."
RUN_ALL_TIMEOUT_S = 600       # the whole notebook, smoke parameters (seconds warm; minutes from a cold cache)
LAB_TIMEOUT_S = 300           # one click: two fine-tunes and the first unlearning steps (smoke)


def _smoke_parameters(root: Path, out: Path) -> None:
    """The notebook's parameters cell with the smoke profile (and its own lab parameters kept)."""
    path = root / "notebooks" / NOTEBOOK
    nb = json.loads(path.read_text())
    cell = next(c for c in nb["cells"] if "parameters" in c.get("metadata", {}).get("tags", []))
    original = json.loads((Path(__file__).resolve().parents[1] / "notebooks" / NOTEBOOK).read_text())
    own = next(c for c in original["cells"] if "parameters" in c.get("metadata", {}).get("tags", []))
    lab_lines = [line for line in "".join(own["source"]).splitlines(keepends=True)
                 if line.split("=")[0].strip() in ("sentence", "kind", "insertions")]
    cell["source"] = f'profile = "smoke"\noverrides = {{}}\noutput_dir = {str(out)!r}\n' + "".join(lab_lines)
    path.write_text(json.dumps(nb, indent=1))


def _drive_lab(page, shots: Path, timings: dict[str, float]) -> None:
    """The lab's form after every cell ran: refusals, one real lab, the explorer's slider and more steps."""
    form = page.locator(".forgetlab-lab")
    form.scroll_into_view_if_needed()
    text = page.locator(".forgetlab-lab-text textarea")
    count = page.locator(".forgetlab-lab-insertions input")
    button = page.locator("button.forgetlab-lab-run")
    message = page.locator(".forgetlab-lab-message")
    form.screenshot(path=str(shots / "02_form.png"))

    text.fill("")
    button.click()
    _poll(lambda: "type a sentence" in message.inner_text(), STEP_TIMEOUT_S, "the refusal of an empty text")
    assert message.is_visible() and page.locator(".forgetlab-lab .forgetlab-explorer").count() == 0
    form.screenshot(path=str(shots / "03_refused_empty.png"))
    text.fill(SENTENCE)
    count.fill("0")
    count.press("Tab")
    button.click()
    _poll(lambda: "at least once" in message.inner_text(), STEP_TIMEOUT_S, "the refusal of 0 insertions")

    t0 = time.monotonic()
    count.fill("20")
    count.press("Tab")
    button.click()
    _poll(lambda: "at least once" not in message.inner_text(), STEP_TIMEOUT_S, "the refusal to be replaced")  # no stale read
    _poll(lambda: message.inner_text().startswith("Done") or "Failed" in message.inner_text()
          or "Not run" in message.inner_text(), LAB_TIMEOUT_S, "the lab to be built and unlearned")
    assert message.inner_text().startswith("Done"), message.inner_text()
    timings["lab_click"] = time.monotonic() - t0
    explorer = page.locator(".forgetlab-lab .forgetlab-explorer")
    _poll(lambda: explorer.count() == 1, STEP_TIMEOUT_S, "the explorer under the form")
    title = explorer.locator(".forgetlab-title")
    assert "your sentence" in title.inner_text() and "Step 0" in title.inner_text(), title.inner_text()
    assert "Not flagged" in page.locator(".forgetlab-lab-flag").inner_text()
    assert "sentence-yours" in explorer.locator(".forgetlab-table").inner_text()
    form.screenshot(path=str(shots / "04_lab_explorer.png"))

    # the step slider: drag its handle to the right end
    t0 = time.monotonic()
    track = explorer.locator(".forgetlab-step-slider .noUi-target").first
    handle = explorer.locator(".forgetlab-step-slider .noUi-handle").first
    handle.scroll_into_view_if_needed()
    tb, hb = track.bounding_box(), handle.bounding_box()
    page.mouse.move(hb["x"] + hb["width"] / 2, hb["y"] + hb["height"] / 2)
    page.mouse.down()
    page.mouse.move(tb["x"] + tb["width"] * 0.99, hb["y"] + hb["height"] / 2, steps=12)
    page.mouse.up()
    _poll(lambda: "Step 0 " not in title.inner_text(), STEP_TIMEOUT_S, "the title to show another step")
    timings["slider_update"] = time.monotonic() - t0
    form.screenshot(path=str(shots / "05_slider_moved.png"))

    # two more steps
    t0 = time.monotonic()
    last = int(title.inner_text().split("of", 1)[1].split()[0].split("–")[-1])
    explorer.locator(".forgetlab-more-steps input").fill("2")
    explorer.locator("button.forgetlab-run-more").click()
    more = explorer.locator(".forgetlab-message")
    _poll(lambda: f"ends at step {last + 2}" in more.inner_text() or "Failed" in more.inner_text(),
          LAB_TIMEOUT_S, "two more steps")
    assert f"ends at step {last + 2}" in more.inner_text(), more.inner_text()
    _poll(lambda: f"Step {last + 2}" in title.inner_text(), STEP_TIMEOUT_S, "the slider to move to the new end")
    timings["run_two_more_steps"] = time.monotonic() - t0
    form.screenshot(path=str(shots / "06_two_more_steps.png"))


def test_forget_my_sentence_lab_in_chromium(tmp_path):
    _require_browser()
    from playwright.sync_api import sync_playwright

    timings: dict[str, float] = {}
    t_start = time.monotonic()
    shots = SHOTS / Path(NOTEBOOK).stem
    if shots.exists():
        shutil.rmtree(shots)
    shots.mkdir(parents=True)
    root, out, cache = _prepare_root(tmp_path, NOTEBOOK)
    _smoke_parameters(root, out)
    n_cells = len(json.loads((root / "notebooks" / NOTEBOOK).read_text())["cells"])
    dirs = {name: tmp_path / name for name in ("jconfig", "jdata", "jruntime", "lab-settings", "lab-ws")}
    for d in dirs.values():
        d.mkdir()
    _lab_settings(dirs["lab-settings"])
    token, port = secrets.token_hex(16), _free_port()
    env = dict(os.environ, FORGETLAB_CACHE=str(cache), FORGETLAB_OUTPUTS=str(out), PYTHONHASHSEED="0",
               JUPYTER_CONFIG_DIR=str(dirs["jconfig"]), JUPYTER_DATA_DIR=str(dirs["jdata"]),
               JUPYTER_RUNTIME_DIR=str(dirs["jruntime"]), JUPYTERLAB_SETTINGS_DIR=str(dirs["lab-settings"]),
               JUPYTERLAB_WORKSPACES_DIR=str(dirs["lab-ws"]))
    log = tmp_path / "jupyterlab.log"
    base = f"http://127.0.0.1:{port}"
    before = set(descendants(os.getpid()))
    server = pw = context = None
    log_file = open(log, "w")
    try:
        server = subprocess.Popen(
            [sys.executable, "-m", "jupyterlab", "--no-browser", f"--ServerApp.token={token}", f"--port={port}",
             "--ServerApp.port_retries=0", "--ServerApp.ip=127.0.0.1", f"--ServerApp.root_dir={root}",
             "--LabApp.extension_manager=readonly"] + (["--allow-root"] if os.geteuid() == 0 else []),
            cwd=root, env=env, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True)
        _wait_for_server(server, f"{base}/api/status?token={token}", log)
        pw = sync_playwright().start()
        profile = Path(tempfile.mkdtemp(prefix="chromium-profile-", dir=tmp_path))
        context = pw.chromium.launch_persistent_context(
            str(profile), executable_path=CHROMIUM, headless=True, args=CHROMIUM_FLAGS,
            viewport={"width": 1500, "height": 1900})
        page = context.pages[0] if context.pages else context.new_page()
        page.set_default_timeout(STEP_TIMEOUT_S * 1000)
        page.goto(f"{base}/lab/tree/notebooks/{NOTEBOOK}?token={token}", wait_until="domcontentloaded")
        page.wait_for_function(f"document.querySelectorAll('.jp-NotebookPanel .jp-Cell').length >= {n_cells}",
                               timeout=120_000)
        _poll(lambda: any("| Idle" in t for t in page.locator(".jp-StatusBar-TextItem").all_inner_texts()),
              120, "the kernel to be idle")
        page.screenshot(path=str(shots / "01_notebook_opened.png"))

        t0 = time.monotonic()
        page.locator(".lm-MenuBar-item", has_text="Run").first.click()
        page.locator(".lm-Menu-item:visible", has_text="Run All Cells").first.click()
        _poll(lambda: page.locator(".forgetlab-lab").count() or _cell_errors(page), RUN_ALL_TIMEOUT_S,
              "the lab's form to appear")
        assert not _cell_errors(page), f"a cell failed:\n{_cell_errors(page)[0][:3000]}"

        def finished():
            prompts = page.locator(".jp-NotebookPanel .jp-CodeCell .jp-InputPrompt").all_inner_texts()
            return prompts and not any("*" in p or p.strip() in ("[ ]:", "") for p in prompts)
        _poll(lambda: finished() or _cell_errors(page), RUN_ALL_TIMEOUT_S, "every cell to finish")
        assert not _cell_errors(page), f"a cell failed:\n{_cell_errors(page)[0][:3000]}"
        timings["run_all"] = time.monotonic() - t0
        assert page.locator(".jp-OutputArea-output img").count() >= 1       # the batch's GenEx figure

        _drive_lab(page, shots, timings)
        page.screenshot(path=str(shots / "07_jupyterlab_window.png"))
    except Exception:
        if context is not None and context.pages:
            try:
                context.pages[0].screenshot(path=str(shots / "failure.png"))
            except Exception:  # noqa: BLE001 - the original error matters more
                pass
        raise
    finally:
        ours = [p for p in descendants(os.getpid()) if p not in before]   # server, kernels, driver, chromium
        if server is not None and server.poll() is None:
            try:
                req = urllib.request.Request(f"{base}/api/shutdown?token={token}", method="POST", data=b"")
                urllib.request.urlopen(req, timeout=10).close()
                server.wait(timeout=20)
            except (OSError, subprocess.TimeoutExpired):
                pass
        for closer in (context.close if context else None, pw.stop if pw else None):
            try:
                if closer:
                    closer()
            except Exception:  # noqa: BLE001 - cleanup must go on
                pass
        left = end_processes(ours)
        log_file.close()
        timings["total"] = time.monotonic() - t_start
        (shots / "timings.json").write_text(json.dumps({k: round(v, 1) for k, v in timings.items()}, indent=1))
        print(f"browser test timings of {NOTEBOOK} (s):", {k: round(v, 1) for k, v in timings.items()})
        assert not left, f"processes still alive after cleanup: {left}"
