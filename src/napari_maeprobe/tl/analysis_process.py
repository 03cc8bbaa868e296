"""A long-lived analysis process: ``maeprobe analyze`` on request, without paying numba each time.

UMAP (umap-learn, pynndescent) compiles its numba functions the first time they run in a
process: tens of seconds on a small machine. Running ``maeprobe analyze`` in a fresh subprocess
per store pays that on every click. :class:`AnalysisProcess` keeps one child process that
analyses stores one at a time with :func:`~napari_maeprobe.tl.analyze.analyze_store`, the
function the CLI uses, so the compilation is paid once per session. It never blocks the caller:
:meth:`AnalysisProcess.poll` returns what the child reported since the last call.

Messages (tuples; the first item is the kind, the second the job id)::

    ("ready", None, pid, seconds)                    the child is up (and warmed up: seconds)
    ("started", job_id, pid)                         the child took the job
    ("progress", job_id, stage_text, done, total)    e.g. ("progress", 3, "patch (2 of 2):
                                                     UMAP: mapping the other rows (45,000 of
                                                     95,232 rows)", 45000, 95232)
    ("done", job_id, {level: summary})               analyze_store's return value
    ("error", job_id, one_line_message)              bad input, a failure, or the child died
    ("cancelled", job_id)                            after cancel() (or close() mid-job)

The child is ``python -c`` importing this module, talking over a socket pair, rather than
multiprocessing's ``spawn`` context: spawn re-runs the parent's main script in the child unless
that script has an ``if __name__ == "__main__":`` guard, and napari scripts often have none.

Cancel is prompt: a numba/UMAP call cannot be interrupted from inside, so :meth:`cancel`
terminates the child (SIGTERM, then SIGKILL after 2 s) and the next :meth:`submit` starts a
fresh one, which compiles numba again: the price of a cancel. The store stays consistent: an
analysis is saved level by level, and a level whose write was cut short reads as not analysed
(:meth:`~napari_maeprobe.embed.store.EmbeddingStore.write_analysis` writes its completion mark
last, in one atomic file write); the store's write lock is an ``flock`` that the kernel
releases with the killed child. A multi-level job cancelled after its first level was saved
leaves that level analysed with the new settings.

No process is left behind: :meth:`close` (also run at interpreter exit and when the object is
garbage collected) ends the child; if the parent dies however it dies, the child gets SIGTERM
from the kernel (``PR_SET_PDEATHSIG``, Linux, when the child was started from the main thread:
the signal follows the *thread* that started it, and a GUI worker thread ends early) and in any
case exits within a fraction of a second, when its watchdog sees its parent change or the
parent's end of the socket close.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import threading
import time
import weakref
from dataclasses import asdict
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from napari_maeprobe.tl.analyze import AnalysisSettings

#: what the child runs (its command line names this module: easy to find with ``ps``)
CHILD_COMMAND = "from napari_maeprobe.tl.analysis_process import _child_entry; _child_entry()"
#: seconds between the child's checks that its parent is alive
WATCHDOG_INTERVAL = 0.25
#: seconds a terminated child gets before it is killed
TERMINATE_GRACE = 2.0
#: the kinds of message that end a job
FINAL = ("done", "error", "cancelled")

#: what ``analyze`` does after each of its ``(done, 5, "analysing LEVEL")`` reports
_STEPS = ("PCA", "UMAP", "Leiden clustering", "what drives the clusters",
          "effective rank and comparisons", "writing the results")  # fmt: skip


class AnalysisProcess:
    """One long-lived child process that analyses stores on request, so numba/UMAP compile
    once per session. One job at a time.

    ``warm_up=True``: the child compiles UMAP's numba functions on a small random table as soon
    as it starts (call :meth:`start` early, e.g. when a dock opens, so the first analysis does
    not wait for it). A job submitted meanwhile starts when the warm-up ends.

    Thread-safe; meant to be polled from a GUI timer. After a cancel the next submit starts a
    new child, which compiles numba again.
    """

    def __init__(self, warm_up: bool = False) -> None:
        self.warm_up = warm_up
        self._lock = threading.RLock()
        self._child: dict[str, Any] = {}  # "process" (Popen), "conn": the running child
        self._next_id = 0
        self._job: int | None = None  # the job the child is doing
        self._messages: list[tuple] = []
        self._closed = False
        # ends the child at interpreter exit or when this object is collected
        self._finalizer = weakref.finalize(self, _stop_child, self._child)

    # ------------------------------------------------------------------ public API
    @property
    def busy(self) -> bool:
        """Whether a job is running (its final message may wait in :meth:`poll`)."""
        with self._lock:
            self._drain()
            return self._job is not None

    @property
    def pid(self) -> int | None:
        """The child's process id, or None when no child runs."""
        proc = self._child.get("process")
        return proc.pid if proc is not None and proc.poll() is None else None

    def start(self) -> None:
        """Start the child now (otherwise the first :meth:`submit` does)."""
        with self._lock:
            if self._closed:
                raise RuntimeError("this AnalysisProcess was closed")
            proc = self._child.get("process")
            if proc is not None and proc.poll() is None:
                return
            _stop_child(self._child)
            self._child.update(_spawn(self.warm_up))

    def submit(
        self,
        store: str | Path,
        levels: list[str] | None,
        settings: AnalysisSettings | None = None,
        *,
        allow_incomplete: bool = False,
    ) -> int:
        """Ask the child to analyse ``levels`` of ``store`` (None or empty: all) with
        ``settings`` and save the results into the store; returns the job id. Starts the child
        if none runs. Raises RuntimeError while another job runs (cancel it first)."""
        with self._lock:
            if self._closed:
                raise RuntimeError("this AnalysisProcess was closed")
            self._drain()
            if self._job is not None:
                raise RuntimeError(f"analysis job {self._job} is still running: cancel it first")
            self._next_id += 1
            job = self._next_id
            request = ("analyse", job, str(store), list(levels or []),
                       asdict(settings or AnalysisSettings()), bool(allow_incomplete))  # fmt: skip
            for attempt in (0, 1):
                self.start()
                try:
                    self._child["conn"].send(request)
                    break
                except OSError:  # it died since it started: once more with a new one
                    _stop_child(self._child)
                    if attempt:
                        raise
            self._job = job
            return job

    def poll(self) -> list[tuple]:
        """The messages since the last call (never blocks)."""
        with self._lock:
            self._drain()
            out, self._messages = self._messages, []
            return out

    def wait(self, job_id: int, timeout: float | None = None) -> tuple | None:
        """Block until ``job_id`` ends; its final message ("done", "error" or "cancelled"), or
        None on timeout. Messages stay queued for :meth:`poll`. (For scripts and tests; a GUI
        polls.)"""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            with self._lock:
                self._drain()
                for m in self._messages:
                    if m[1] == job_id and m[0] in FINAL:
                        return m
                conn = self._child.get("conn")
            if deadline is not None and time.monotonic() > deadline:
                return None
            if conn is None:
                time.sleep(0.05)
                continue
            with contextlib.suppress(OSError, EOFError, ValueError):
                conn.poll(0.05)

    def cancel(self, job_id: int | None = None) -> None:
        """Stop the running job (with ``job_id``: only if it is that one) at once: the child is
        terminated and ("cancelled", job_id) queued; the next submit starts a new child (numba
        compiles again there)."""
        with self._lock:
            self._drain()  # a job that ended meanwhile is not cancelled
            job = self._job
            if job is None or (job_id is not None and job_id != job):
                return
            _stop_child(self._child)
            self._job = None
            self._messages.append(("cancelled", job))

    def close(self) -> None:
        """End the child (cancelling its job, if any). Idempotent."""
        with self._lock:
            if self._closed:
                return
            self.cancel()
            conn = self._child.get("conn")
            proc = self._child.get("process")
            if conn is not None and proc is not None and proc.poll() is None:
                with contextlib.suppress(OSError):
                    conn.send(("quit",))
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(1.0)
            _stop_child(self._child)
            self._closed = True
            self._finalizer.detach()

    def __enter__(self) -> AnalysisProcess:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ internals
    def _drain(self) -> None:
        """Move what the child sent into the queue; notice a child that died."""
        conn = self._child.get("conn")
        if conn is None:
            return
        try:
            while conn.poll():
                msg = conn.recv()
                self._messages.append(msg)
                if msg[0] in FINAL and msg[1] == self._job:
                    self._job = None
        except (OSError, EOFError):  # the child died (killed, out of memory)
            proc = self._child.get("process")
            code = None
            if proc is not None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    code = proc.wait(0.5)
            if self._job is not None:
                why = (f"the analysis process ended unexpectedly (exit code {code}), most "
                       "likely out of memory. Fix: analyse fewer rows (a row cap, a smaller UMAP "
                       "fit) or fewer levels at once")  # fmt: skip
                self._messages.append(("error", self._job, why))
                self._job = None
            _stop_child(self._child)


def _spawn(warm_up: bool) -> dict:
    """Start the child (``python -c CHILD_COMMAND``) with one end of a socket pair."""
    import napari_maeprobe

    parent_sock, child_sock = socket.socketpair()
    fd = child_sock.fileno()
    use_pdeathsig = threading.current_thread() is threading.main_thread()
    env = dict(os.environ)  # the package as this process imports it, wherever it lies
    root = str(Path(napari_maeprobe.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    try:
        proc = subprocess.Popen(
            [sys.executable, "-c", CHILD_COMMAND, str(fd), str(os.getpid()),
             str(int(use_pdeathsig)), str(int(warm_up))],
            pass_fds=(fd,), stdin=subprocess.DEVNULL, env=env, close_fds=True,
        )  # fmt: skip
    except BaseException:
        parent_sock.close()
        raise
    finally:
        child_sock.close()  # the parent keeps its own end only: EOF reaches the child
    return {"process": proc, "conn": Connection(parent_sock.detach())}


def _stop_child(child: dict) -> None:
    """Terminate (then kill) the child process and close the socket; empties ``child``."""
    proc = child.pop("process", None)
    conn = child.pop("conn", None)
    if proc is not None and proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(TERMINATE_GRACE)
        except subprocess.TimeoutExpired:
            proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(TERMINATE_GRACE)
    if conn is not None:
        with contextlib.suppress(OSError):
            conn.close()


# ---------------------------------------------------------------------- the child process
def _child_entry() -> None:
    """``python -c CHILD_COMMAND FD PARENT_PID PDEATHSIG WARM_UP``: run :func:`_child_main`."""
    fd, parent_pid, use_pdeathsig, warm_up = (int(a) for a in sys.argv[1:5])
    _child_main(Connection(fd), parent_pid, bool(use_pdeathsig), bool(warm_up))


def _child_main(conn: Connection, parent_pid: int, use_pdeathsig: bool, warm_up: bool) -> None:
    """The child's loop: take requests, analyse, report; exit with the parent."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    if use_pdeathsig:
        _set_parent_death_signal(signal.SIGTERM)
    if os.getppid() != parent_pid:  # the parent died before the signal was set up
        os._exit(0)
    threading.Thread(target=_watchdog, args=(parent_pid,), daemon=True).start()
    send_lock = threading.Lock()

    def send(msg: tuple) -> None:
        try:
            with send_lock:
                conn.send(msg)
        except OSError:  # the parent closed its end or died
            os._exit(0)

    t0 = time.perf_counter()
    if warm_up:
        with contextlib.suppress(Exception):
            _warm_up()
    send(("ready", None, os.getpid(), round(time.perf_counter() - t0, 2)))
    while True:
        try:
            request = conn.recv()
        except (EOFError, OSError):  # the parent closed its end or died
            os._exit(0)
        if request[0] == "quit":
            break
        if request[0] == "analyse":
            _run_job(send, *request[1:])
    conn.close()


def _run_job(send, job: int, store: str, levels: list[str], settings: dict,
             allow_incomplete: bool) -> None:  # fmt: skip
    """One analysis, reported through ``send``; errors become one line."""
    from napari_maeprobe.embed.store import EmbeddingStore
    from napari_maeprobe.tl.analyze import analyze_store

    send(("started", job, os.getpid()))
    stage = _StageText(levels)

    def progress(done: int, total: int, description: str) -> bool:
        send(("progress", job, stage(done, total, description), int(done), int(total)))
        return True

    try:
        s = EmbeddingStore(store, mode="a")
        stage.levels = list(levels or s.levels())
        result = analyze_store(s, levels or None, AnalysisSettings(**settings), progress,
                               allow_incomplete=allow_incomplete)  # fmt: skip
    except Exception as exc:  # noqa: BLE001 - the parent shows it as one line
        send(("error", job, _one_line(exc)))
        return
    send(("done", job, result))


class _StageText:
    """Stage text with counts from ``analyze``'s progress reports, e.g. ``"patch (2 of 2):
    UMAP: mapping the other rows (45,000 of 95,232 rows)"`` or ``"global: Leiden clustering"``."""

    def __init__(self, levels: list[str]) -> None:
        self.levels = list(levels)
        self.level: str | None = None

    def __call__(self, done: int, total: int, description: str) -> str:
        step = description.startswith("analysing ")
        if step:
            self.level = description.removeprefix("analysing ").strip()
        prefix = ""
        if self.level:
            prefix = self.level
            if len(self.levels) > 1 and self.level in self.levels:
                prefix += f" ({self.levels.index(self.level) + 1} of {len(self.levels)})"
            prefix += ": "
        if step and total == len(_STEPS) - 1:
            return f"{prefix}{_STEPS[min(max(done, 0), len(_STEPS) - 1)]}"
        if total > 0:
            unit = " rows" if description.startswith("UMAP") else ""
            return f"{prefix}{description} ({done:,} of {total:,}{unit})"
        return f"{prefix}{description}"


def _one_line(exc: BaseException) -> str:
    from napari_maeprobe.errors import MaeprobeInputError

    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if isinstance(exc, MaeprobeInputError) else f"{type(exc).__name__}: {text}"


def _set_parent_death_signal(sig: int) -> None:
    """Linux: have the kernel send ``sig`` to this process when its parent (thread) dies."""
    import ctypes

    if not sys.platform.startswith("linux"):
        return
    with contextlib.suppress(Exception):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, int(sig), 0, 0, 0)  # PR_SET_PDEATHSIG = 1


def _watchdog(parent_pid: int) -> None:
    """Exit the child when its parent is gone (it was re-parented, e.g. to PID 1)."""
    while True:
        time.sleep(WATCHDOG_INTERVAL)
        if os.getppid() != parent_pid:
            os._exit(0)


def _warm_up() -> None:
    """Compile UMAP's numba functions (nearest-neighbour descent, layout optimisation,
    transform) on a small random table, as an analysis would, so the first job skips it."""
    import numpy as np

    from napari_maeprobe.tl.analysis import umap_embed

    rng = np.random.default_rng(0)
    X = rng.normal(size=(4200, 8)).astype(np.float32)  # >= 4096 rows: pynndescent, not exact
    umap_embed(X, 15, 0.1, seed=0, max_fit=4100)
