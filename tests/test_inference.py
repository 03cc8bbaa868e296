"""The inference engine: worker process, streaming, precision, cancellation, crashes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from napari_maeprobe.embed.engine import (
    EngineConfig,
    InferenceEngine,
    WorkerCrashedError,
    WorkerTraceback,
)
from napari_maeprobe.errors import MaeprobeInputError
from napari_maeprobe.io.samples import load_sample
from napari_maeprobe.pp.preprocessing import cell_crops, normalize
from napari_maeprobe.progress import Cancelled, Job

TINY = dict(random_init=True, model="default")


@pytest.fixture(scope="module")
def crops() -> np.ndarray:
    """Real 96-px single-cell crops of the CellProfiler ExampleHuman field (3 channels)."""
    im, _ = load_sample("examplehuman")
    from napari_maeprobe.pp.segmentation import segment

    seg = segment(im, "builtin")
    return cell_crops(normalize(im.to_numpy()), seg.labels, 96).crops[:24]


def test_worker_streams_batches_in_order(crops):
    cfg = EngineConfig(**TINY, batch_size=10, precision="fp32", attention=True)
    seen = []
    with InferenceEngine(cfg) as eng:
        assert eng.info.device == "cpu" and eng.pid is not None
        results = list(eng.embed(crops, progress=lambda d, t, s: seen.append((d, t))))
    assert [r.index[0] for r in results] == [0, 10, 20]
    assert results[0].global_embedding.shape == (10, 144)
    assert results[0].channel_embeddings.shape == (10, 3, 144)
    assert results[0].patch_embeddings.shape == (10, 3, 8, 8, 144)
    assert results[0].attention.shape == (10, 4, 3, 8, 8)
    assert seen[0] == (0, 24) and seen[-1] == (24, 24)


def test_worker_matches_in_process_and_is_deterministic(crops):
    cfg = EngineConfig(**TINY, batch_size=8, precision="fp32")
    with InferenceEngine(cfg) as eng:
        a = np.concatenate([r.global_embedding for r in eng.embed(crops)])
    b = np.concatenate(
        [r.global_embedding for r in InferenceEngine(cfg, in_process=True).embed(crops)]
    )
    np.testing.assert_array_equal(a, b)


def test_bf16_close_to_fp32(crops):
    fp32 = InferenceEngine(EngineConfig(**TINY, precision="fp32"), in_process=True)
    bf16 = InferenceEngine(EngineConfig(**TINY, precision="bf16"), in_process=True)
    a = np.concatenate([r.global_embedding for r in fp32.embed(crops)])
    b = np.concatenate([r.global_embedding for r in bf16.embed(crops)])
    cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    assert cos.min() > 0.999  # the stated tolerance (docs/models.md)


def test_masking_and_reconstruction_through_the_engine(crops):
    cfg = EngineConfig(**TINY, masking="random", reconstruction=True, seed=5)
    eng = InferenceEngine(cfg, in_process=True)
    (r,) = list(eng.embed(crops[:4]))
    assert r.mask.shape == (4, 3, 8, 8) and r.mask.reshape(4, -1).sum(1).tolist() == [144] * 4
    visible = ~np.repeat(np.repeat(r.mask, 12, axis=2), 12, axis=3)
    np.testing.assert_allclose(r.reconstruction[visible], crops[:4][visible], atol=1e-5)
    (again,) = list(InferenceEngine(cfg, in_process=True).embed(crops[:4]))
    np.testing.assert_array_equal(again.mask, r.mask)  # same seed, same mask
    cfg.batch_size = 1  # ... whatever the batching
    single = list(InferenceEngine(cfg, in_process=True).embed(crops[:4]))
    np.testing.assert_array_equal(np.concatenate([s.mask for s in single]), r.mask)


def test_cancel_stops_the_worker(crops):
    eng = InferenceEngine(EngineConfig(**TINY, batch_size=2))
    calls = []

    def progress(done, total, desc):
        calls.append(done)
        return done < 4  # cancel after two batches

    with pytest.raises(Cancelled):
        for _ in eng.embed(crops, progress=progress):
            pass
    assert eng.pid is None  # the worker was stopped


def test_killed_worker_gives_a_clear_error(crops):
    eng = InferenceEngine(EngineConfig(**TINY, batch_size=1))
    pid = eng.pid
    many = np.repeat(crops, 40, axis=0)
    threading.Timer(0.5, lambda: os.kill(pid, signal.SIGKILL)).start()
    t = time.monotonic()
    with pytest.raises(WorkerCrashedError, match="worker stopped while embedding.*killed"):
        for _ in eng.embed(many):
            pass
    assert time.monotonic() - t < 30  # no hang


def test_bad_model_and_channels(crops):
    with pytest.raises(MaeprobeInputError, match="no model named 'nope'"):
        InferenceEngine(EngineConfig(model="nope", random_init=True))
    eng = InferenceEngine(EngineConfig(**TINY))
    with pytest.raises(MaeprobeInputError, match=r"crop size \(64, 64\) is not a multiple"):
        list(eng.embed(np.zeros((2, 3, 64, 64), np.float32)))
    eng = InferenceEngine(EngineConfig(**TINY))  # channel-agnostic: 12 channels embed
    (res,) = list(eng.embed(np.zeros((2, 12, 96, 96), np.float32)))
    assert res.channel_embeddings.shape[:2] == (2, 12)
    with pytest.raises(MaeprobeInputError, match="at least 1 channel, got 0"):
        list(eng.embed(np.zeros((2, 0, 96, 96), np.float32)))


def test_input_errors_are_not_swallowed_and_closed_engines_say_so(crops):
    def batches():
        yield crops[:3]
        raise FileNotFoundError("crop file vanished")

    eng = InferenceEngine(EngineConfig(**TINY))
    with pytest.raises(FileNotFoundError, match="vanished"):
        for _ in eng.embed(batches()):
            pass
    with pytest.raises(MaeprobeInputError, match="engine was closed"):
        list(eng.embed(crops[:2]))


def test_unusable_device_is_an_input_error():
    with pytest.raises(MaeprobeInputError, match="'cuda:7' was asked for but is not usable"):
        InferenceEngine(EngineConfig(**TINY, device="cuda:7"))


# --------------------------------------------------------------------------- the job layer


def test_engine_says_when_it_started_and_cancels_from_another_thread(crops):
    started = []
    eng = InferenceEngine(EngineConfig(**TINY, batch_size=1), on_started=started.append)
    assert started == [eng] and eng.started.is_set() and eng.pid is not None
    many = np.repeat(crops, 40, axis=0)  # ~1000 batches of one crop: minutes of work
    got = []
    clicked: list[float] = []

    def cancel_later() -> None:
        while len(got) < 3:
            time.sleep(0.01)
        clicked.append(time.perf_counter())
        eng.cancel()
        eng.cancel()  # twice, as impatient users do: harmless

    threading.Thread(target=cancel_later, daemon=True).start()
    with pytest.raises(Cancelled):
        for res in eng.embed(many):
            got.append(res)
    latency = time.perf_counter() - clicked[0]
    print(f"\n[cancel] engine idle {latency * 1000:.0f} ms after cancel() from another thread")
    assert latency < 1.0
    assert eng.pid is None and len(got) < len(many)
    with pytest.raises(Cancelled):  # a cancelled engine stays cancelled
        list(eng.embed(crops[:2]))


def test_cancel_while_the_model_starts():
    """The task's token hooks the engine's cancel once the worker exists (as EmbedTask does)."""
    job = Job("embedding")
    engines = []

    def on_started(engine) -> None:
        engines.append(engine)
        job.token.on_cancel(engine.cancel)

    threading.Timer(0.3, job.cancel).start()
    t0 = time.perf_counter()
    with pytest.raises(Cancelled):
        InferenceEngine(EngineConfig(**TINY), on_started=on_started)
    assert time.perf_counter() - t0 < 1.5  # cancel at 0.3 s, then idle within a second
    assert engines and engines[0].pid is None  # the worker is gone


def test_job_events_and_outcomes():
    events = []
    job = Job(
        "demo",
        on_started=lambda j: events.append(("started", j.label)),
        on_progress=lambda d, t, s: events.append(("progress", d, t, s)),
        on_finished=lambda o: events.append(("finished", o.status)),
    )
    assert job(1, 4, "embedding") is True  # a job is a progress callback
    outcome = job.run(lambda: 42)
    assert outcome.ok and outcome.value == 42 and job.finished and job.outcome is outcome
    assert events == [("progress", 1, 4, "embedding"), ("started", "demo"), ("finished", "done")]

    failed = Job().run(lambda: 1 / 0)
    assert failed.failed and isinstance(failed.error, ZeroDivisionError)
    bad = Job().run(lambda: (_ for _ in ()).throw(MaeprobeInputError("no cells", "segment")))
    assert bad.failed and bad.error.fix == "segment"

    stopping = Job()
    hooked = []
    stopping.token.on_cancel(lambda: hooked.append("engine.cancel"))

    def work():
        for i in range(10):
            if not stopping(i, 10, "embedding"):  # what report() does: stop when False
                raise Cancelled("cancelled during: embedding")
            if i == 2:
                threading.Thread(target=stopping.cancel).start()
                stopping.token.wait(5)

    out = stopping.run(work)
    assert out.cancelled and hooked == ["engine.cancel"]
    late = []
    stopping.token.on_cancel(lambda: late.append(1))  # hooked after the cancel: runs at once
    assert late == [1]
    # an error after a cancel counts as cancelled (the worker was killed under the library)
    j = Job()
    j.cancel()
    assert j.run(lambda: (_ for _ in ()).throw(OSError("pipe closed"))).cancelled


# --------------------------------------------------------------------------- worker errors

#: imported in the worker (EngineConfig.imports): makes the worker's runner raise what the test
#: asks for, as a bug deep in torch or a model's input check would
FAILING = """
import os
import sys

from napari_maeprobe.embed import engine
from napari_maeprobe.errors import MaeprobeInputError


class BlankCropsError(MaeprobeInputError):
    pass


def run(self, index, crops, boundary):
    how = os.environ["MAEPROBE_TEST_FAIL"]
    if how == "value":
        raise ValueError("mat1 and mat2 shapes cannot be multiplied (8x144 and 96x144)")
    if how == "input":
        raise BlankCropsError("every crop is blank", "pick the channels with signal")
    raise RuntimeError(how)


if os.path.basename(sys.argv[0]) == "_worker.py":  # the caller only imports the error type
    engine._Runner.run = run
"""


@pytest.fixture
def failing_worker(tmp_path, monkeypatch):
    (tmp_path / "maeprobe_failing_worker.py").write_text(FAILING)
    monkeypatch.setenv(
        "PYTHONPATH", os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])
    )
    monkeypatch.syspath_prepend(str(tmp_path))  # the caller can rebuild the worker's error type

    def start(how: str) -> InferenceEngine:
        monkeypatch.setenv("MAEPROBE_TEST_FAIL", how)
        return InferenceEngine(EngineConfig(**TINY, imports=("maeprobe_failing_worker",)))

    return start


def test_a_plain_value_error_in_the_worker_is_a_bug_not_bad_input(failing_worker, crops):
    eng = failing_worker("value")
    with pytest.raises(WorkerCrashedError) as info:
        list(eng.embed(crops[:2]))
    err = info.value
    assert not isinstance(err, MaeprobeInputError)
    msg = str(err)
    assert "bug" in msg and "ValueError" in msg and "mat1 and mat2" in msg and "--debug" in msg
    assert "\n" not in msg  # one line for the CLI
    assert "Traceback" in err.worker_traceback and "in run" in err.worker_traceback
    assert isinstance(err.__cause__, WorkerTraceback)  # what --debug prints under the error
    assert eng.pid is None


def test_bad_input_in_the_worker_arrives_as_the_same_error_with_its_fix(failing_worker, crops):
    eng = failing_worker("input")
    with pytest.raises(MaeprobeInputError) as info:
        list(eng.embed(crops[:2]))
    err = info.value
    assert type(err).__name__ == "BlankCropsError"  # the same product error type
    assert err.problem == "every crop is blank" and err.fix == "pick the channels with signal"
    assert str(err) == "every crop is blank. Fix: pick the channels with signal."
    assert "Traceback" in err.worker_traceback
    from napari_maeprobe.embed.engine import _Runner

    assert _Runner.run.__module__ == "napari_maeprobe.embed.engine"  # patched in the worker only


def test_product_errors_at_start_keep_their_type():
    from napari_maeprobe.errors import WeightsNotFoundError

    with pytest.raises(WeightsNotFoundError) as info:  # a subclass, by isinstance in the worker
        InferenceEngine(EngineConfig(model="default", weights="/nonexistent/weights.safetensors"))
    assert info.value.fix


# --------------------------------------------------------------------------- quiet workers

#: the caller of an engine: prints the worker's pid once started, then embeds without end
PARENT = """
import signal, sys
import numpy as np
from napari_maeprobe.embed.engine import EngineConfig, InferenceEngine

if sys.argv[1] == "sigint":
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # only the worker reacts to this Ctrl-C
eng = InferenceEngine(EngineConfig(model="default", random_init=True, batch_size=1))
print(eng.pid, flush=True)


def forever():
    while True:
        yield np.zeros((1, 3, 96, 96), np.float32)


try:
    for _ in eng.embed(forever()):
        pass
except Exception as exc:
    print(type(exc).__name__, exc, flush=True)
"""

#: runs PARENT in its own process group as a child subreaper (so an orphaned worker becomes its
#: child and its exit status can be read), stops it as asked, and reports as JSON
DRIVER = """
import ctypes, json, os, signal, subprocess, sys, time

how, parent_code, err_path = sys.argv[1], sys.argv[2], sys.argv[3]
ctypes.CDLL(None).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER
with open(err_path, "wb") as err:
    parent = subprocess.Popen([sys.executable, "-c", parent_code, how], stdout=subprocess.PIPE,
                              stderr=err, start_new_session=True)
pid = int(parent.stdout.readline())
time.sleep(1.0)  # the worker is busy embedding
if how == "kill-parent":
    parent.kill()
else:  # Ctrl-C in a terminal: SIGINT to the whole process group
    os.killpg(parent.pid, signal.SIGINT)
t0 = time.monotonic()
status = None
while time.monotonic() - t0 < 20:
    try:
        done, code = os.waitpid(pid, os.WNOHANG)  # ours once orphaned
    except ChildProcessError:  # still the parent's child (it reaps it)
        if parent.poll() is not None and not os.path.exists(f"/proc/{pid}"):
            break
        time.sleep(0.05)
        continue
    if done:
        status = os.waitstatus_to_exitcode(code)
        break
    time.sleep(0.05)
seconds = time.monotonic() - t0
try:
    out = parent.communicate(timeout=20)[0].decode()
except subprocess.TimeoutExpired:
    parent.kill()
    out = "parent hung"
print(json.dumps({"status": status, "seconds": seconds, "parent_said": out}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="uses prctl (Linux)")
@pytest.mark.parametrize("how", ["kill-parent", "sigint"])
def test_worker_whose_caller_is_gone_exits_quietly(how, tmp_path):
    err = tmp_path / "stderr.txt"
    run = subprocess.run(
        [sys.executable, "-c", DRIVER, how, PARENT, str(err)],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout.strip().splitlines()[-1])
    stderr = err.read_text()
    print(f"\n[{how}] worker gone after {report['seconds']:.2f} s: {report}")
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr, stderr
    assert report["seconds"] < 5
    if how == "kill-parent":
        from napari_maeprobe.embed.engine import EXIT_PARENT_GONE

        assert report["status"] == EXIT_PARENT_GONE  # nonzero, and no output
    else:  # the caller lives on and says it in one sentence
        said = report["parent_said"].strip()
        assert said.startswith("WorkerCrashedError") and "(interrupted)" in said
        assert len(said.splitlines()) == 1


def test_cli_says_a_worker_crash_in_one_line(monkeypatch, capsys):
    from napari_maeprobe import cli

    def crash(args):
        raise WorkerCrashedError("the inference worker stopped while embedding (killed by SIGKILL)")

    monkeypatch.setattr(cli, "cmd_models", crash)
    assert cli.main(["models"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        "maeprobe models: error: the inference worker stopped while embedding (killed by SIGKILL)"
    )
    with pytest.raises(WorkerCrashedError):  # --debug: the traceback
        cli.main(["--debug", "models"])
