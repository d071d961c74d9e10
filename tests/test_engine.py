"""The study engine on a fake backend: the table it writes, step 0 shared, per-trajectory caching and resuming."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from forgetlab import engine, metrics
from forgetlab.cache import ArtifactCache
from forgetlab.trajectories import StepRunner

sys.path.insert(0, str(Path(__file__).parent))
from fake_backend import FakeBackend  # noqa: E402

JOBS = 2 * 2 * 2      # kinds x methods x original seeds


def test_run_study_table_shape_and_genex(tmp_path):
    backend = FakeBackend()
    table = engine.run_study(backend, ArtifactCache(tmp_path))
    assert list(table.columns) == list(engine.COLUMNS)
    assert set(table.step) == {0, 2, 4} and set(table.kind) == {"a", "b"} and set(table.method) == {"ga", "npo"}
    assert set(table.seed) == {-1, 0, 1}                      # -1: GenEx over both unlearned seeds
    # GenEx at step 4 by hand: log-mean-exp over the two unlearned seeds' ll minus over the two references'.
    uid = "a-forget-0"
    ll = table[(table.metric == "ll") & (table.uid == uid) & (table.step == 4) & (table.method == "ga")]
    ref = backend.reference_logprobs(backend.examples[backend.examples.uid == uid])[:, 0]
    want = (np.log(np.mean(np.exp(ll.value.to_numpy()))) - np.log(np.mean(np.exp(ref)))) / np.log(2)
    got = table[(table.metric == "genex_bits") & (table.uid == uid) & (table.step == 4) & (table.method == "ga")]
    assert got.value.iloc[0] == pytest.approx(want, rel=1e-9)
    # Every method starts from the same original: step 0 is scored once and is the same for both.
    s0 = table[(table.step == 0) & (table.metric == "ll")].pivot_table(index=["uid", "seed"], columns="method",
                                                                        values="value")
    np.testing.assert_array_equal(s0.ga, s0.npo)
    # Ascent lowers the forget examples' likelihood.
    forget = table[(table.metric == "genex_bits") & (table.role == "forget")].groupby("step").value.mean()
    assert forget.loc[4] < forget.loc[0]


def test_unknown_forget_set_is_refused_before_work(tmp_path):
    with pytest.raises(engine.StudyInputError, match="unknown forget set 'c'"):
        engine.run_study(FakeBackend(), ArtifactCache(tmp_path), kinds=["a", "c"])


def test_each_trajectory_is_its_own_cache_entry(tmp_path, monkeypatch):
    cache = ArtifactCache(tmp_path)
    first = engine.run_study(FakeBackend(), cache)
    assert len(list((tmp_path / "trajectory").iterdir())) == JOBS

    def boom(*args, **kwargs):
        raise AssertionError("recomputed although cached")
    monkeypatch.setattr(engine, "unlearn_trajectory", boom)
    pd.testing.assert_frame_equal(engine.run_study(FakeBackend(), cache), first)


KILLED_RUN = textwrap.dedent("""
    import sys
    sys.path.insert(0, {tests!r})
    from fake_backend import FakeBackend
    from forgetlab import engine
    from forgetlab.cache import ArtifactCache
    engine.run_study(FakeBackend(), ArtifactCache({root!r}))
""")


def test_a_killed_study_resumes_with_the_finished_trajectories(tmp_path, monkeypatch):
    root = tmp_path / "cache"
    env = dict(os.environ, FAKE_BACKEND_SLEEP="1.5")
    child = subprocess.Popen([sys.executable, "-c", KILLED_RUN.format(tests=str(Path(__file__).parent),
                                                                        root=str(root))], env=env)
    entries = root / "trajectory"
    deadline = time.time() + 120
    while time.time() < deadline and (not entries.is_dir() or len(list(entries.iterdir())) < 2):
        time.sleep(0.1)
    child.send_signal(signal.SIGKILL)
    child.wait()
    finished = len([e for e in entries.iterdir() if (e / "meta.json").is_file()])
    assert 2 <= finished < JOBS

    built = []
    real = engine.unlearn_trajectory
    monkeypatch.setattr(engine, "unlearn_trajectory", lambda *a, **k: built.append(a[1:4]) or real(*a, **k))
    resumed = engine.run_study(FakeBackend(), ArtifactCache(root))
    assert len(built) == JOBS - finished                      # only the unfinished trajectories ran again
    monkeypatch.setattr(engine, "unlearn_trajectory", real)
    fresh = engine.run_study(FakeBackend(), ArtifactCache(tmp_path / "fresh"))
    pd.testing.assert_frame_equal(resumed, fresh)             # and the table is the uninterrupted one


def test_run_more_steps_resumes_bit_for_bit(tmp_path):
    cache = ArtifactCache(tmp_path)
    backend = FakeBackend()
    runner = StepRunner(backend, cache)
    assert runner.end_step("a", "ga") == 4
    more = runner("a", "ga", 2)
    assert set(more.step) == {6} and runner.end_step("a", "ga") == 6
    again = StepRunner(FakeBackend(), cache)("a", "ga", 2)       # a new runner resumes from the cached state
    assert set(again.step) == {8}
    long = engine.unlearn_forget_set(FakeBackend(steps=8), "a", "ga")
    for step, rows in ((6, more), (8, again)):
        want = long[(long.step == step) & (long.metric == "ll")].sort_values(["seed", "uid"]).value.to_numpy()
        got = rows[rows.metric == "ll"].sort_values(["seed", "uid"]).value.to_numpy()
        np.testing.assert_array_equal(got, want)
    with pytest.raises(ValueError, match="whole number"):
        runner("a", "ga", 0)
    with pytest.raises(ValueError, match="not in this run"):
        runner("a", "graddiff", 1)


def test_exact_exposure_reads_the_secret_from_the_candidate_array():
    cand = np.log(np.array([0.1, 0.4, 0.2, 0.3]))
    targets = pd.DataFrame({"uid": ["x", "y"], "role": ["forget", "control"], "secret": ["1", "3"]})
    recs = engine.exact_exposure_records(targets, cand)
    assert [r["value"] for r in recs] == pytest.approx([2.0, 1.0])   # rank 1 of 4 -> 2 bits; rank 2 -> 1 bit
    assert metrics.exposure_max_bits(2) == pytest.approx(2 * np.log2(10))
