"""Progress reporting and cancellation shared by the CLI (tqdm) and the GUI (napari workers).

Long functions take ``progress: ProgressCallback | None``; they call it with
``(done, total, description)`` and stop with :class:`Cancelled` when it returns ``False``.
"""

from __future__ import annotations

from collections.abc import Callable

ProgressCallback = Callable[[int, int, str], "bool | None"]


class Cancelled(RuntimeError):
    """Raised inside long work when the progress callback asked to stop."""


def report(progress: ProgressCallback | None, done: int, total: int, description: str) -> None:
    """Send one progress update; raise :class:`Cancelled` if the callback returns ``False``."""
    if progress is not None and progress(done, total, description) is False:
        raise Cancelled(f"cancelled during: {description}")


class TqdmProgress:
    """A progress callback that draws a tqdm bar (counts and ETA) on stderr, one bar per stage.

    Call :meth:`close` before printing anything else (e.g. an error) so no bar is left open.
    """

    def __init__(self, **tqdm_kwargs) -> None:
        self._kwargs = tqdm_kwargs
        self._bar = None
        self._desc: str | None = None

    def __call__(self, done: int, total: int, description: str) -> None:
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
