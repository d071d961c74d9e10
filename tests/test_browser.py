"""Notebooks 03 and 06 in a real browser: JupyterLab on a loopback port, headless Chromium driven by Playwright.

Each case copies its notebook into a temporary folder with the smoke parameters, starts JupyterLab there
(random token, free port, settings and runtime files in the temporary folder), opens the notebook in
Debian's Chromium, runs every cell from the Run menu, then drives the step explorer (forgetlab.widgets.Explorer)
through its DOM. Notebook 03 (tiny GPT-2): drags the step slider and checks that both rendered plots (pixel
screenshots) and the per-example table change; picks another forget set; asks for -3 and 2.5 more steps
(refused with a visible message) and for 2 (the trajectory grows). Notebook 06 (SmolLM2, through the same
engine and trajectories.StepRunner): the explorer shows the backend's kind labels, and 2 more steps run.
Screenshots go to outputs/browser/<notebook>/. Every process it starts (JupyterLab, its kernels, Playwright's
driver, Chromium) is ended in a finally block, by process id.

The studies come from the cache: the entries of FORGETLAB_CACHE (or the repository's cache) are linked
read-only into a temporary cache, so after the smoke batch the notebooks only load tables; with a cold
cache the kernel builds what is missing (minutes on 2 cores). Run it with ``pytest -m browser``.
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

from forgetlab.cache import default_cache_dir

pytestmark = pytest.mark.browser

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = os.environ.get("FORGETLAB_CHROMIUM", "/usr/bin/chromium")
SHOTS = REPO / "outputs" / "browser"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]
STEP_TIMEOUT_S = 60          # one widget update
EXTENSION_KIND = "trajectory-extension"    # the cache kind of "run more steps" (forgetlab.trajectories)


@dataclass(frozen=True)
class Case:
    """One notebook and what its explorer must show."""
    notebook: str
    first_kind: str                 # label of the first forget set (the backend's labels)
    other_kind: str                 # label of another forget set to pick
    other_uid: str                  # an example of that forget set, in the per-example table
    full: bool                      # drive the slider and the refusals too (else: labels, selector, one run)
    run_all_timeout_s: float        # the whole notebook, smoke parameters (seconds warm; 06 took 909 s cold)
    more_steps_timeout_s: float     # two more steps, the first call rebuilding the recorded trajectory


CASES = [Case("03_gradient_ascent.ipynb", "ID (Shakespeare)", "OOD: canaries", "canary-forget-000", True, 480, 240),
         Case("06_real_llm.ipynb", "ID (English)", "OOD: Persian", "language-forget-000", False, 1500, 420)]


def _require_browser() -> None:
    if Path(CHROMIUM).is_file():
        return
    msg = f"{CHROMIUM} not found: install Debian's chromium (apt-get install -y chromium)"
    if os.environ.get("FORGETLAB_REQUIRE_BROWSER") == "1":
        pytest.fail(msg)
    pytest.skip(msg)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _children() -> dict[int, int]:
    """pid -> parent pid of every process we can see."""
    out = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                stat = (d / "stat").read_text()
                out[int(d.name)] = int(stat[stat.rindex(")") + 2:].split()[1])
            except (OSError, ValueError, IndexError):
                pass
    return out


def descendants(pid: int) -> list[int]:
    parents = _children()
    found, frontier = [], [pid]
    while frontier:
        p = frontier.pop()
        kids = [c for c, pp in parents.items() if pp == p]
        found += kids
        frontier += kids
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text()
        return state[state.rindex(")") + 2] != "Z"
    except (OSError, ValueError):
        return False


def end_processes(pids: list[int], grace_s: float = 10.0) -> list[int]:
    """SIGTERM the given pids, wait, SIGKILL what is left; returns pids still alive (should be none)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            if _alive(pid):
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline and any(_alive(p) for p in pids):
            time.sleep(0.2)
    return [p for p in pids if _alive(p)]


def _prepare_root(tmp: Path, notebook: str) -> tuple[Path, Path, Path]:
    """A folder holding the notebook with the smoke parameters, a cache linked to the warm one, an output dir."""
    root, out, cache = tmp / "lab", tmp / "out", tmp / "cache"
    (root / "notebooks").mkdir(parents=True)
    nb = json.loads((REPO / "notebooks" / notebook).read_text())
    params = [c for c in nb["cells"] if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert params, f"{notebook} has no cell tagged 'parameters'"
    params[0]["source"] = f'profile = "smoke"\noverrides = {{}}\noutput_dir = {str(out)!r}\n'
    (root / "notebooks" / notebook).write_text(json.dumps(nb, indent=1))
    cache.mkdir()
    warm = default_cache_dir()
    for kind in (sorted(d for d in warm.iterdir() if d.is_dir()) if warm.is_dir() else []):
        if kind.name == EXTENSION_KIND:          # never: "run more steps" starts from a clean state
            continue
        (cache / kind.name).mkdir()
        for entry in kind.iterdir():
            if (entry / "meta.json").is_file():
                (cache / kind.name / entry.name).symlink_to(entry.resolve(), target_is_directory=True)
    return root, out, cache


def _lab_settings(settings: Path) -> None:
    """Every notebook cell in the DOM (no virtual scrolling); no news or update checks (closed network)."""
    tracker = settings / "@jupyterlab" / "notebook-extension"
    tracker.mkdir(parents=True)
    (tracker / "tracker.jupyterlab-settings").write_text(json.dumps({"windowingMode": "none"}))
    notes = settings / "@jupyterlab" / "apputils-extension"
    notes.mkdir(parents=True)
    (notes / "notification.jupyterlab-settings").write_text(
        json.dumps({"fetchNews": "false", "checkForUpdates": False}))


def _wait_for_server(proc: subprocess.Popen, url: str, log: Path, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"JupyterLab exited with code {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"JupyterLab did not answer within {timeout_s:.0f} s:\n{log.read_text()[-3000:]}")


def _poll(check, timeout_s: float, what: str, interval: float = 0.5):
    deadline = time.monotonic() + timeout_s
    last = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what} (last: {last!r})")


def _cell_errors(page) -> list[str]:
    """Texts of the error outputs (tracebacks) in the notebook."""
    errors = page.locator(".jp-OutputArea-output[data-mime-type='application/vnd.jupyter.stderr'] , "
                          ".jp-RenderedText[data-mime-type='application/vnd.jupyter.error']")
    return [t for t in errors.all_inner_texts() if "Error" in t or "Traceback" in t]


def _drive_explorer(page, case: Case, shots: Path, timings: dict[str, float]) -> None:
    """The explorer of a notebook whose cells have all run: labels, step slider, selector, refusals, more steps."""
    explorer = page.locator(".forgetlab-explorer")
    explorer.scroll_into_view_if_needed()
    title = page.locator(".forgetlab-title")
    table = page.locator(".forgetlab-table")
    metric_plot, utility_plot = page.locator(".forgetlab-metric-plot"), page.locator(".forgetlab-utility-plot")
    _poll(lambda: metric_plot.bounding_box() and metric_plot.bounding_box()["height"] > 50, STEP_TIMEOUT_S,
          "the plot image to render")
    assert "Step 0" in title.inner_text()
    assert case.first_kind in title.inner_text(), title.inner_text()          # the backend's labels, not global ones
    kind_select = page.locator(".forgetlab-kind select")
    options = [t.replace("\xa0", " ") for t in kind_select.locator("option").all_inner_texts()]   # nbsp in the DOM
    assert case.first_kind in options and case.other_kind in options, options
    explorer.screenshot(path=str(shots / "02_explorer_step0.png"))
    table0 = table.inner_text()
    assert "Per-example values at step 0" in table0

    if case.full:
        shots0 = (metric_plot.screenshot(), utility_plot.screenshot())
        # drag the slider's handle most of the way to the right
        t0 = time.monotonic()
        track = page.locator(".forgetlab-step-slider .noUi-target").first
        handle = page.locator(".forgetlab-step-slider .noUi-handle").first
        handle.scroll_into_view_if_needed()
        tb, hb = track.bounding_box(), handle.bounding_box()
        page.mouse.move(hb["x"] + hb["width"] / 2, hb["y"] + hb["height"] / 2)
        page.mouse.down()
        page.mouse.move(tb["x"] + tb["width"] * 0.7, hb["y"] + hb["height"] / 2, steps=12)
        page.mouse.up()
        moved = _poll(lambda: (lambda t: t if "Step 0 " not in t and "Step" in t else None)(title.inner_text()),
                      STEP_TIMEOUT_S, "the title to show another step")
        step = int(moved.split("Step", 1)[1].split()[0])
        assert step > 0
        readout = page.locator(".forgetlab-step-slider .widget-readout").inner_text().strip()
        assert readout == str(step), (readout, step)
        _poll(lambda: f"Per-example values at step {step}" in table.inner_text(), STEP_TIMEOUT_S,
              "the table to show the new step")
        _poll(lambda: metric_plot.screenshot() != shots0[0] and utility_plot.screenshot() != shots0[1],
              STEP_TIMEOUT_S, "both plots to change")
        assert table.inner_text() != table0
        timings["slider_update"] = time.monotonic() - t0
        explorer.screenshot(path=str(shots / f"03_explorer_step{step}.png"))

    # another forget set, same step
    t0 = time.monotonic()
    shot = metric_plot.screenshot()
    kind_select.select_option(label=case.other_kind)
    _poll(lambda: case.other_kind in title.inner_text(), STEP_TIMEOUT_S, f"the selection of {case.other_kind}")
    _poll(lambda: metric_plot.screenshot() != shot, STEP_TIMEOUT_S, f"the plot of {case.other_kind}")
    assert case.other_uid in table.inner_text()
    timings["selector_update"] = time.monotonic() - t0
    explorer.screenshot(path=str(shots / "04_explorer_other_kind.png"))

    box = page.locator(".forgetlab-more-steps input")
    button = page.locator("button.forgetlab-run-more")
    message = page.locator(".forgetlab-message")
    if case.full:
        # a bad request is refused, visibly
        box.fill("-3")
        button.click()
        _poll(lambda: "negative" in message.inner_text(), STEP_TIMEOUT_S, "the refusal message")
        assert message.is_visible()
        explorer.screenshot(path=str(shots / "05_refused_negative_steps.png"))
        box.fill("2.5")
        button.click()
        _poll(lambda: "not a whole number" in message.inner_text(), STEP_TIMEOUT_S, "the refusal message")

    # a good one extends the trajectory from its last step, with a progress bar
    t0 = time.monotonic()
    last = int(title.inner_text().split("of", 1)[1].split()[0].split("–")[-1])
    box.fill("2")
    button.click()
    _poll(lambda: f"ends at step {last + 2}" in message.inner_text() or "Failed" in message.inner_text(),
          case.more_steps_timeout_s, "two more steps to run")
    assert f"ends at step {last + 2}" in message.inner_text(), message.inner_text()
    _poll(lambda: f"Step {last + 2}" in title.inner_text(), STEP_TIMEOUT_S, "the slider to move to the new end")
    assert page.locator(".forgetlab-step-slider .widget-readout").inner_text().strip() == str(last + 2)
    assert page.locator(".forgetlab-progress").is_visible()
    assert case.other_kind in message.inner_text()
    timings["run_two_more_steps"] = time.monotonic() - t0
    explorer.screenshot(path=str(shots / "06_two_more_steps.png"))


@pytest.mark.parametrize("case", CASES, ids=[c.notebook.split("_")[0] for c in CASES])
def test_notebook_explorer_in_chromium(tmp_path, case):
    _require_browser()
    from playwright.sync_api import sync_playwright

    timings: dict[str, float] = {}
    t_start = time.monotonic()
    shots = SHOTS / Path(case.notebook).stem
    if shots.exists():
        shutil.rmtree(shots)
    shots.mkdir(parents=True)
    root, out, cache = _prepare_root(tmp_path, case.notebook)
    n_cells = len(json.loads((root / "notebooks" / case.notebook).read_text())["cells"])
    jupyter_dirs = {name: tmp_path / name for name in ("jconfig", "jdata", "jruntime", "lab-settings", "lab-ws")}
    for d in jupyter_dirs.values():
        d.mkdir()
    _lab_settings(jupyter_dirs["lab-settings"])
    token, port = secrets.token_hex(16), _free_port()
    env = dict(os.environ, FORGETLAB_CACHE=str(cache), FORGETLAB_OUTPUTS=str(out), PYTHONHASHSEED="0",
               JUPYTER_CONFIG_DIR=str(jupyter_dirs["jconfig"]), JUPYTER_DATA_DIR=str(jupyter_dirs["jdata"]),
               JUPYTER_RUNTIME_DIR=str(jupyter_dirs["jruntime"]),
               JUPYTERLAB_SETTINGS_DIR=str(jupyter_dirs["lab-settings"]),
               JUPYTERLAB_WORKSPACES_DIR=str(jupyter_dirs["lab-ws"]))
    log = tmp_path / "jupyterlab.log"
    base = f"http://127.0.0.1:{port}"
    before = set(descendants(os.getpid()))
    lab = pw = context = None
    log_file = open(log, "w")
    try:
        lab = subprocess.Popen(
            [sys.executable, "-m", "jupyterlab", "--no-browser", f"--ServerApp.token={token}", f"--port={port}",
             "--ServerApp.port_retries=0", "--ServerApp.ip=127.0.0.1", f"--ServerApp.root_dir={root}",
             "--LabApp.extension_manager=readonly"] + (["--allow-root"] if os.geteuid() == 0 else []),
            cwd=root, env=env, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True)
        _wait_for_server(lab, f"{base}/api/status?token={token}", log)
        timings["jupyterlab_start"] = time.monotonic() - t_start

        pw = sync_playwright().start()
        profile = Path(tempfile.mkdtemp(prefix="chromium-profile-", dir=tmp_path))
        context = pw.chromium.launch_persistent_context(
            str(profile), executable_path=CHROMIUM, headless=True, args=CHROMIUM_FLAGS,
            viewport={"width": 1500, "height": 1900})
        page = context.pages[0] if context.pages else context.new_page()
        page.set_default_timeout(STEP_TIMEOUT_S * 1000)
        t0 = time.monotonic()
        page.goto(f"{base}/lab/tree/notebooks/{case.notebook}?token={token}", wait_until="domcontentloaded")
        # every cell loaded, and the kernel up and idle (status bar: "Python 3 (forgetlab) | Idle")
        page.wait_for_function(f"document.querySelectorAll('.jp-NotebookPanel .jp-Cell').length >= {n_cells}",
                               timeout=120_000)
        _poll(lambda: any("| Idle" in t for t in page.locator(".jp-StatusBar-TextItem").all_inner_texts()),
              120, "the kernel to be idle")
        timings["open_notebook"] = time.monotonic() - t0
        page.screenshot(path=str(shots / "01_notebook_opened.png"))

        # Run > Run All Cells, through the menu as a reader would
        t0 = time.monotonic()
        page.locator(".lm-MenuBar-item", has_text="Run").first.click()
        page.locator(".lm-Menu-item:visible", has_text="Run All Cells").first.click()
        # the explorer's cell ran, or a cell failed (Run All stops there: fail now, with its traceback)
        _poll(lambda: page.locator(".forgetlab-explorer").count() or _cell_errors(page), case.run_all_timeout_s,
              "the explorer to appear")
        assert not _cell_errors(page), f"a cell failed:\n{_cell_errors(page)[0][:3000]}"

        def finished():
            prompts = page.locator(".jp-NotebookPanel .jp-CodeCell .jp-InputPrompt").all_inner_texts()
            return prompts and not any("*" in p or p.strip() in ("[ ]:", "") for p in prompts)
        _poll(lambda: finished() or _cell_errors(page), case.run_all_timeout_s, "every cell to finish")
        assert not _cell_errors(page), f"a cell failed:\n{_cell_errors(page)[0][:3000]}"
        timings["run_all"] = time.monotonic() - t0
        # static figures of the batch run are there too
        assert page.locator(".jp-OutputArea-output img").count() >= 2

        _drive_explorer(page, case, shots, timings)
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
        if lab is not None and lab.poll() is None:
            try:       # let the server stop its kernels itself first
                req = urllib.request.Request(f"{base}/api/shutdown?token={token}", method="POST", data=b"")
                urllib.request.urlopen(req, timeout=10).close()
                lab.wait(timeout=20)
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
        print(f"browser test timings of {case.notebook} (s):", {k: round(v, 1) for k, v in timings.items()})
        assert not left, f"processes still alive after cleanup: {left}"
