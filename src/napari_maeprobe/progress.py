"""The job layer: progress, cancellation and outcomes, shared by the CLI, the GUI and the engine.

- Long functions take ``progress: ProgressCallback | None``; they call it with
  ``(done, total, description)`` (through :func:`report`) and stop with :class:`Cancelled` when
  it returns ``False``.
- :class:`CancelToken`: a thread-safe "stop" flag; other parts hook what stops the work at once
  (e.g. :meth:`~napari_maeprobe.embed.engine.InferenceEngine.cancel`) with
  :meth:`CancelToken.on_cancel`.
- :class:`Job`: one run as the outside sees it: a token, the events *started*, *progress* and
  *finished*, and its :class:`Outcome` (ok, cancelled, or failed with the error). A job is itself
  a progress callback (it relays to its listeners and returns ``False`` once cancelled), so it is
  passed wherever a ``progress`` is taken.
- The CLI's job is :class:`TqdmProgress` (bars on stderr); the napari widgets run their work
  through :meth:`Job.run` in thread workers (:mod:`napari_maeprobe._napari.jobs`); the inference
  engine says when its worker process has started and can be cancelled, and cancels from any
  thread.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

ProgressCallback = Callable[[int, int, str], "bool | None"]


class Cancelled(RuntimeError):
    """Raised inside long work when the progress callback asked to stop."""


def report(progress: ProgressCallback | None, done: int, total: int, description: str) -> None:
    """Send one progress update; raise :class:`Cancelled` if the callback returns ``False``."""
    if progress is not None and progress(done, total, description) is False:
        raise Cancelled(f"cancelled during: {description}")


class CancelToken:
    """A thread-safe "please stop": set once by :meth:`cancel`, read anywhere.

    Callbacks hooked with :meth:`on_cancel` run once, in the thread that cancels (or at once
    when hooked after the cancel): keep them short and thread-safe (e.g. kill a process).
    """

    def __init__(self) -> None:
        self._event = threading.Event()
        self._lock = threading.Lock()
        self._callbacks: list[Callable[[], Any]] = []

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()

    def cancel(self) -> bool:
        """Set the flag and run the hooked callbacks; ``True`` the first time only."""
        with self._lock:
            if self._event.is_set():
                return False
            self._event.set()
            callbacks, self._callbacks = self._callbacks, []
        for callback in callbacks:
            _call_safely(callback)
        return True

    def on_cancel(self, callback: Callable[[], Any]) -> Callable[[], None]:
        """Run ``callback`` on cancel (now, if already cancelled); returns a function that unhooks
        it."""
        with self._lock:
            if not self._event.is_set():
                self._callbacks.append(callback)

                def unhook() -> None:
                    with self._lock:
                        if callback in self._callbacks:
                            self._callbacks.remove(callback)

                return unhook
        _call_safely(callback)
        return lambda: None

    def wait(self, timeout: float | None = None) -> bool:
        """Block until cancelled (or ``timeout`` seconds); ``True`` if cancelled."""
        return self._event.wait(timeout)

    def check(self, description: str = "") -> None:
        """Raise :class:`Cancelled` if cancelled."""
        if self._event.is_set():
            raise Cancelled(f"cancelled during: {description}" if description else "cancelled")


def _call_safely(callback: Callable[..., Any], *args) -> None:
    """Listeners must not break the job (or the thread that cancels): log what they raise."""
    try:
        callback(*args)
    except Exception:
        log.exception("maeprobe: a job listener failed")


@dataclass
class Outcome:
    """How a job ended: ``status`` is ``"done"`` (with ``value``), ``"cancelled"`` or ``"error"``
    (with ``error``); ``seconds`` it ran. Jobs run through :meth:`Job.run` return this instead of
    raising, so the caller decides what the user sees."""

    status: str
    value: Any = None
    error: BaseException | None = None
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.status == "done"

    @property
    def cancelled(self) -> bool:
        return self.status == "cancelled"

    @property
    def failed(self) -> bool:
        return self.status == "error"


class Job:
    """One long run: a :class:`CancelToken`, the events *started*, *progress* and *finished*,
    and its :class:`Outcome`.

    ``on_started(job)``, ``on_progress(done, total, description)`` and ``on_finished(outcome)``
    are listeners (one callable or a list; more can be appended to the lists of the same name).
    They are called from the thread doing the work. A progress listener that returns ``False``
    cancels the job. The job itself is a :data:`ProgressCallback`: pass it as ``progress`` to the
    library, which then stops with :class:`Cancelled` at its next report after a cancel.
    """

    def __init__(
        self,
        label: str = "",
        *,
        on_started=None,
        on_progress=None,
        on_finished=None,
        token: CancelToken | None = None,
    ) -> None:
        self.label = label
        self.token = token if token is not None else CancelToken()
        self.on_started: list[Callable[[Job], Any]] = _listeners(on_started)
        self.on_progress: list[ProgressCallback] = _listeners(on_progress)
        self.on_finished: list[Callable[[Outcome], Any]] = _listeners(on_finished)
        self.outcome: Outcome | None = None
        self._started = threading.Event()
        self._finished = threading.Event()

    # -- state -------------------------------------------------------------------------------
    @property
    def cancelled(self) -> bool:
        return self.token.cancelled

    @property
    def has_started(self) -> bool:
        return self._started.is_set()

    @property
    def finished(self) -> bool:
        return self._finished.is_set()

    def cancel(self) -> None:
        """Ask the job to stop (thread-safe; hooked callbacks of the token run now)."""
        self.token.cancel()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the job finished (or ``timeout`` seconds); ``True`` if it finished."""
        return self._finished.wait(timeout)

    # -- events ------------------------------------------------------------------------------
    def start(self) -> None:
        """Emit *started* (once)."""
        if self._started.is_set():
            return
        self._started.set()
        for listener in list(self.on_started):
            _call_safely(listener, self)

    def progress(self, done: int, total: int, description: str) -> bool:
        """Emit *progress*; ``False`` once the job is cancelled (the library then stops)."""
        for listener in list(self.on_progress):
            if listener(done, total, description) is False:
                self.cancel()
        return not self.token.cancelled

    def __call__(self, done: int, total: int, description: str) -> bool:
        return self.progress(done, total, description)

    def finish(self, outcome: Outcome) -> Outcome:
        """Record ``outcome`` and emit *finished* (once)."""
        if self._finished.is_set():
            return self.outcome
        self.outcome = outcome
        self._finished.set()
        for listener in list(self.on_finished):
            _call_safely(listener, outcome)
        return outcome

    def run(self, fn: Callable[..., Any], *args, **kwargs) -> Outcome:
        """Run ``fn(*args, **kwargs)`` as this job: emit *started*, sort its end into an
        :class:`Outcome` (an error after a cancel counts as cancelled), emit *finished*."""
        self.start()
        t0 = time.perf_counter()
        try:
            outcome = guarded(lambda: fn(*args, **kwargs), lambda: self.token.cancelled)
        except BaseException as exc:  # KeyboardInterrupt, SystemExit: finished, then re-raised
            status = "cancelled" if isinstance(exc, KeyboardInterrupt) else "error"
            self.finish(Outcome(status, error=exc, seconds=time.perf_counter() - t0))
            raise
        return self.finish(outcome)


def _listeners(value) -> list:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


def guarded(fn: Callable[[], Any], cancelled: Callable[[], bool] = lambda: False) -> Outcome:
    """Run ``fn`` and sort its end into an :class:`Outcome` (errors after a cancel: cancelled).

    Errors other than bad input are logged with their traceback (the user sees one line).
    """
    from napari_maeprobe.errors import MaeprobeInputError

    t0 = time.perf_counter()
    try:
        value = fn()
    except Cancelled:
        return Outcome("cancelled", seconds=time.perf_counter() - t0)
    except Exception as exc:
        if cancelled():
            return Outcome("cancelled", seconds=time.perf_counter() - t0)
        if not isinstance(exc, MaeprobeInputError):
            log.exception("maeprobe job failed")
        return Outcome("error", error=exc, seconds=time.perf_counter() - t0)
    return Outcome("done", value, seconds=time.perf_counter() - t0)


class TqdmProgress(Job):
    """The CLI's job: its progress draws a tqdm bar (counts and ETA) on stderr, one per stage.

    Call :meth:`close` before printing anything else (e.g. an error) so no bar is left open.
    """

    def __init__(self, label: str = "maeprobe", **tqdm_kwargs) -> None:
        super().__init__(label)
        self.on_progress.append(self._draw)
        self._kwargs = tqdm_kwargs
        self._bar = None
        self._desc: str | None = None

    def _draw(self, done: int, total: int, description: str) -> None:
        from tqdm.auto import tqdm

        if self._bar is None or self._desc != description:
            self.close()
            self._bar = tqdm(total=total, desc=description, **self._kwargs)
            self._desc = description
        self._bar.n = done
        self._bar.refresh()
        if done >= total:
            self.close()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
            self._desc = None
