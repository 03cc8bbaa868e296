"""The long-lived analysis process: same results as in-process, numba compiled once, prompt
cancel, and no process left behind (close, or the parent killed)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from napari_maeprobe.embed.job import EmbedJob
from napari_maeprobe.embed.run_local import run_embedding
from napari_maeprobe.embed.store import EmbeddingStore
from napari_maeprobe.tl.analysis_process import AnalysisProcess
from napari_maeprobe.tl.analyze import AnalysisSettings, analyze_store

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="uses /proc")

LEVELS = ["global", "channel"]
SETTINGS = AnalysisSettings(resolution=0.8, seed=3)


@pytest.fixture(scope="module")
def store_path(tmp_path_factory, imc) -> Path:
    """The IMC sample (55 cells, 5 markers) embedded at the global and channel levels."""
    image, labels = imc
    path = tmp_path_factory.mktemp("ap") / "imc.zarr"
    run_embedding([image], path, EmbedJob(levels=tuple(LEVELS)), [labels])
    return path


def copy_of(store_path: Path, tmp_path: Path, name: str) -> Path:
    out = tmp_path / name
    shutil.copytree(store_path, out)
    return out


def running(pid: int) -> bool:
    """Whether ``pid`` is a live process (a zombie waiting for init to reap it counts as
    gone)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    state = next((ln for ln in status.splitlines() if ln.startswith("State:")), "")
    return "Z" not in state.split()[1:2]


def wait_gone(pid: int, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if not running(pid):
            return True
        time.sleep(0.1)
    return not running(pid)


def test_results_match_an_in_process_analysis_and_numba_compiles_once(store_path, tmp_path):
    a, b, ref = (copy_of(store_path, tmp_path, n) for n in ("a.zarr", "b.zarr", "ref.zarr"))
    with AnalysisProcess() as proc:
        seconds = []
        for path in (a, b):
            t0 = time.perf_counter()
            job = proc.submit(path, LEVELS, SETTINGS)
            assert proc.busy
            end = proc.wait(job, timeout=600)
            seconds.append(time.perf_counter() - t0)
            assert end is not None and end[0] == "done", end
            assert set(end[2]) == set(LEVELS) and end[2]["channel"]["rows"] == 275
        messages = proc.poll()
        pid = proc.pid
        assert not proc.busy
    print(f"first analysis {seconds[0]:.1f} s (numba compiles), second {seconds[1]:.1f} s, "
          f"same process {pid}")  # fmt: skip
    assert [m[0] for m in messages].count("started") == 2
    assert len({m[2] for m in messages if m[0] == "started"}) == 1  # one child did both
    stages = [m[2] for m in messages if m[0] == "progress"]
    assert "global (1 of 2): PCA" in stages and "channel (2 of 2): Leiden clustering" in stages
    assert "channel (2 of 2): UMAP: fitting (275 of 275 rows)" in stages, stages
    for m in messages:
        if m[0] == "progress":
            assert 0 <= m[3] <= m[4]

    analyze_store(EmbeddingStore(ref, mode="a"), LEVELS, SETTINGS)  # the CLI's way
    for path in (a, b):
        for level in LEVELS:
            arrays, cols, attrs = EmbeddingStore(path).read_analysis(level)
            want_arrays, want_cols, want_attrs = EmbeddingStore(ref).read_analysis(level)
            np.testing.assert_allclose(arrays["X_pca"], want_arrays["X_pca"], atol=1e-4)
            # seeded, single-threaded umap-learn: the same map in any process
            np.testing.assert_allclose(arrays["X_umap"], want_arrays["X_umap"], atol=1e-3)
            leiden, want = cols["leiden"].astype(str), want_cols["leiden"].astype(str)
            np.testing.assert_array_equal(leiden, want)
            assert attrs["n_leiden"] == want_attrs["n_leiden"]
            assert attrs["settings"] == want_attrs["settings"]


def test_cancel_is_prompt_and_leaves_the_store_consistent(store_path, tmp_path):
    path = copy_of(store_path, tmp_path, "c.zarr")
    proc = AnalysisProcess()
    try:
        job = proc.submit(path, LEVELS, SETTINGS)
        child, seen = None, []
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:  # wait until UMAP runs (numba compiles: seconds)
            for m in proc.poll():
                seen.append(m)
                if m[0] == "started":
                    child = m[2]
            if any(m[0] == "progress" and "UMAP: fitting" in m[2] for m in seen):
                break
            time.sleep(0.05)
        assert child is not None and proc.busy, seen
        t0 = time.perf_counter()
        proc.cancel(job)
        latency = time.perf_counter() - t0
        after = proc.poll()
        print(f"cancel took {latency:.2f} s")
        assert ("cancelled", job) in after
        assert latency < 3.0
        assert not proc.busy and wait_gone(child, 3)
        # the store: readable, each level analysed in full or not at all, its lock free
        store = EmbeddingStore(path, mode="a")
        for level in store.analysed_levels():
            arrays, cols, _ = store.read_analysis(level)
            assert arrays["X_umap"].shape[0] == len(cols) == store.n_rows(level)
        with store.lock("analyze"):
            pass
        # the next job starts a new child and finishes
        job2 = proc.submit(path, ["global"], SETTINGS)
        end = proc.wait(job2, timeout=600)
        assert end is not None and end[0] == "done", end
        assert "global" in EmbeddingStore(path).analysed_levels()
    finally:
        proc.close()


def test_close_leaves_no_process_and_is_idempotent():
    proc = AnalysisProcess()
    proc.start()
    pid = proc.pid
    assert pid is not None and running(pid)
    proc.close()
    proc.close()
    assert wait_gone(pid, 3)
    with pytest.raises(RuntimeError):
        proc.submit("x.zarr", None)


def test_bad_input_is_one_line_and_the_process_goes_on(tmp_path):
    with AnalysisProcess() as proc:
        job = proc.submit(tmp_path / "missing.zarr", None)
        end = proc.wait(job, timeout=120)
        assert end[0] == "error" and "\n" not in end[2], end
        pid = proc.pid
        job2 = proc.submit(tmp_path / "missing.zarr", ["global"])
        assert proc.wait(job2, timeout=120)[0] == "error" and proc.pid == pid


PARENT = """
import sys, threading, time
from napari_maeprobe.tl.analysis_process import AnalysisProcess
from napari_maeprobe.tl.analyze import AnalysisSettings

proc = AnalysisProcess()
def go():
    proc.submit(sys.argv[1], ["global", "channel"], AnalysisSettings())
if sys.argv[2] == "thread":  # started from a short-lived thread: no PDEATHSIG, the watchdog
    t = threading.Thread(target=go); t.start(); t.join()
else:
    go()
while True:
    for m in proc.poll():
        if m[0] == "started":
            print(m[2], flush=True)
    time.sleep(0.05)
"""


@pytest.mark.parametrize("started_from", ["main", "thread"])
def test_killing_the_parent_leaves_no_orphan(store_path, tmp_path, started_from):
    path = copy_of(store_path, tmp_path, "k.zarr")
    script = tmp_path / "parent.py"
    script.write_text(textwrap.dedent(PARENT))
    parent = subprocess.Popen([sys.executable, str(script), str(path), started_from],
                              stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        line = parent.stdout.readline()  # the child's pid, once it took the job
        child = int(line)
        assert running(child)
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait(10)
        t0 = time.perf_counter()
        assert wait_gone(child, 5), f"the analysis process {child} outlived its parent"
        print(f"{started_from}: the child ended {time.perf_counter() - t0:.2f} s after its "
              "parent was killed")  # fmt: skip
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()


def test_an_analysis_write_cut_short_reads_as_not_analysed(store_path, tmp_path):
    """What a kill in the middle of ``write_analysis`` leaves (a group without its attrs,
    which go last) is not taken for an analysis; the next write replaces it."""
    import pandas as pd

    path = copy_of(store_path, tmp_path, "w.zarr")
    store = EmbeddingStore(path, mode="a")
    n = store.n_rows("global")
    group = store.root.create_group("analysis/global")
    group.create_array("X_umap", shape=(n, 2), dtype="float32")  # cut short here
    store = EmbeddingStore(path)
    assert store.analysed_levels() == [] and store.read_analysis("global") is None
    store = EmbeddingStore(path, mode="a")
    umap = np.zeros((n, 2), np.float32)
    store.write_analysis("global", {"X_umap": umap}, {"leiden": pd.Series(["0"] * n)}, {"a": 1})
    store = EmbeddingStore(path)
    assert store.analysed_levels() == ["global"]
    arrays, cols, attrs = store.read_analysis("global")
    assert arrays["X_umap"].shape == (n, 2) and len(cols) == n and attrs["a"] == 1
