"""Progress reporting and cancellation shared by the CLI (tqdm) and the GUI (napari workers).

Long functions take ``progress: ProgressCallback | None``; they call it with
``(done, total, description)`` and stop with :class:`Cancelled` when it returns ``False``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

ProgressCallback = Callable[[int, int, str], "bool | None"]
T = TypeVar("T")


class Cancelled(RuntimeError):
    """Raised inside long work when the progress callback asked to stop."""


def report(progress: ProgressCallback | None, done: int, total: int, description: str) -> None:
    """Send one progress update; raise :class:`Cancelled` if the callback returns ``False``."""
    if progress is not None and progress(done, total, description) is False:
        raise Cancelled(f"cancelled during: {description}")


def track(
    items: Iterable[T], total: int, description: str, progress: ProgressCallback | None
) -> Iterator[T]:
    """Iterate over ``items`` reporting progress after each one (and once at the start)."""
    report(progress, 0, total, description)
    for i, item in enumerate(items, start=1):
        yield item
        report(progress, i, total, description)


def tqdm_progress(**tqdm_kwargs) -> ProgressCallback:
    """A progress callback that draws a tqdm bar (counts and ETA) on stderr, one bar per stage."""
    from tqdm.auto import tqdm

    state: dict[str, object] = {"bar": None, "desc": None}

    def callback(done: int, total: int, description: str) -> None:
        bar = state["bar"]
        if bar is None or state["desc"] != description:
            if bar is not None:
                bar.close()  # type: ignore[attr-defined]
            bar = tqdm(total=total, desc=description, **tqdm_kwargs)
            state["bar"], state["desc"] = bar, description
        bar.n = done  # type: ignore[attr-defined]
        bar.refresh()  # type: ignore[attr-defined]
        if done >= total:
            bar.close()  # type: ignore[attr-defined]
            state["bar"] = None
        return None

    return callback
