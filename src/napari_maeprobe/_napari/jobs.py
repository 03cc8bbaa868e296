"""The work behind the dock widgets, without Qt: build images from layer arrays, segment, embed.

The widgets only collect settings and show results; everything here runs in a worker thread
(except :func:`build_image`, which is cheap and lazy) and talks back through plain callbacks, so
it can be tested without a display.

Jobs use the package's job layer (:mod:`napari_maeprobe.progress`): a :class:`Job` with a cancel
token, started / progress / finished events and an :class:`Outcome`, as the CLI and the engine.

Cancelling an embedding (:class:`EmbedTask`) cancels its job's token, which does two things: the
job, as the library's progress callback, returns ``False`` (so the library raises
:class:`~napari_maeprobe.progress.Cancelled` at its next report), and the engine is cancelled
(:meth:`~napari_maeprobe.embed.engine.InferenceEngine.cancel`, hooked on the token when the
engine says its worker process has started). The second is what makes a cancel take effect
within a fraction of a second: the engine reports progress only after each batch it sends (64
crops on a CPU, seconds of work), and starting the model reports nothing at all.
"""

from __future__ import annotations

import gc
import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import dask.array as da
import numpy as np

from napari_maeprobe.errors import MaeprobeInputError
from napari_maeprobe.io.image import MicroscopyImage, guess_axes
from napari_maeprobe.pp.preprocessing import Z_MODES, project_z
from napari_maeprobe.progress import Cancelled, Job, Outcome, guarded

__all__ = ["Job", "Outcome", "guarded"]  # the job layer, re-exported for the widgets

if TYPE_CHECKING:
    from napari_maeprobe.embed.job import EmbedJob
    from napari_maeprobe.embed.run_local import EmbedResult

log = logging.getLogger(__name__)



# --------------------------------------------------------------------------- images from layers


@dataclass
class ChannelSource:
    """One channel of the image: a layer's array, or one index along its channel axis."""

    data: Any  # numpy, dask or zarr array of the layer (level 0 of a multiscale layer)
    name: str
    layer: str  # the layer's name, for messages
    axis: int | None = None  # the layer's channel axis, None when the layer is one channel
    index: int = 0
    scale: tuple[float, ...] = ()  # the layer's scale and translate, channel axis included
    translate: tuple[float, ...] = ()
    metadata: dict = field(default_factory=dict)

    def array(self) -> da.Array:
        """The channel as a lazy array with only spatial axes."""
        arr = da.asarray(self.data) if not isinstance(self.data, da.Array) else self.data
        if self.axis is not None:
            arr = da.take(arr, self.index, axis=self.axis)
        return arr

    def spatial(self, values: Sequence[float]) -> tuple[float, ...]:
        """``values`` (per layer axis) without the channel axis."""
        out = [float(v) for v in values]
        if self.axis is not None and len(out) == np.ndim(self.data):
            del out[self.axis]
        return tuple(out)


@dataclass
class BuiltImage:
    """The image built from layers, with where it sits in the viewer (for aligned labels)."""

    image: MicroscopyImage
    scale: tuple[float, ...]  # per spatial axis of ``image`` (after projection)
    translate: tuple[float, ...]
    #: what became of a z-stack: "max" (projection), "slice" (``z_index``) or "keep" (native
    #: 3D); ``None`` for a 2D image. The store's facts record it (:meth:`EmbedTask.run`).
    z_mode: str | None = None
    z_index: int | None = None

    def z_facts(self) -> dict:
        """The facts that say which plane of a z-stack was embedded (empty for 2D images)."""
        if self.z_mode is None:
            return {}
        return {"projection": self.z_mode, "z_index": self.z_index}


def guess_channel_axis(shape: Sequence[int], rgb: bool = False, sample=None) -> int | None:
    """The channel axis of a multichannel layer, or ``None`` for a single-channel layer.

    RGB layers split along their last axis. A 3D layer counts as multichannel only when its
    planes are unlike one another (needs the pixels: ``sample``); 4D layers go by their shape.
    """
    ndim = len(shape)
    if rgb:
        return ndim - 1
    if ndim < 3 or (ndim == 3 and sample is None):
        return None
    try:
        axes = guess_axes(tuple(int(s) for s in shape), None, sample=sample)
    except MaeprobeInputError:
        return None
    if "C" not in axes or shape[axes.index("C")] < 2:
        return None
    return axes.index("C")


def build_image(
    channels: Sequence[ChannelSource],
    z_mode: str = "max",
    z_index: int | None = None,
    name: str | None = None,
) -> BuiltImage:
    """One ``MicroscopyImage`` (CYX or CZYX, lazy) from the chosen channels, in their order.

    ``z_mode``: what to do with z-stacks: ``max`` (projection), ``slice`` (``z_index``) or
    ``keep`` (native 3D). Refuses channels of different shapes, with the layers named.
    """
    if not channels:
        raise MaeprobeInputError(
            "no image layers are chosen",
            "tick the layers that form the image under 'Data and segmentation'",
        )
    if z_mode not in Z_MODES:
        raise MaeprobeInputError(f"unknown z handling {z_mode!r}", "use max, slice or keep")
    arrays = [c.array() for c in channels]
    first = channels[0]
    shape = arrays[0].shape
    for c, arr in zip(channels, arrays):
        if arr.shape != shape:
            raise MaeprobeInputError(
                f"channel '{c.name}' (layer '{c.layer}') is {arr.shape} but '{first.name}' "
                f"(layer '{first.layer}') is {shape}",
                "tick only layers of one image (same size), or choose the channel axis of a "
                "multichannel layer",
            )
    if len(shape) not in (2, 3):
        raise MaeprobeInputError(
            f"layer '{first.layer}' has {len(shape)} dimensions per channel {shape}; time series "
            "and other extra axes are not supported",
            "choose the channel axis of the layer, or open one time point",
        )
    data = da.stack(arrays)
    scale = first.spatial(first.scale) if first.scale else (1.0,) * len(shape)
    translate = first.spatial(first.translate) if first.translate else (0.0,) * len(shape)
    meta = first.metadata or {}
    image_name = name or str(meta.get("maeprobe_image") or first.layer)
    physical = tuple(scale) if any(abs(s - 1.0) > 1e-9 for s in scale) else None
    image = MicroscopyImage(
        data,
        [c.name for c in channels],
        image_name,
        source_axes="CZYX" if data.ndim == 4 else "CYX",
        scale=physical,
        dataset=str(meta.get("dataset", "")),
    )
    z_done, z_at = None, None
    if image.is_3d:
        z_done = z_mode
        if z_mode == "slice":
            z_at = int(image.data.shape[1] // 2 if z_index is None else z_index)
        if z_mode != "keep":  # the one z rule (preprocessing.project_z)
            image = project_z(image, z_mode, z_at)
            scale, translate = scale[1:], translate[1:]
    return BuiltImage(image, tuple(scale), tuple(translate), z_done, z_at)


# --------------------------------------------------------------------------- outcomes


class NamedJob:
    """What a napari thread worker runs: ``fn`` as a :class:`Job` (``job``, or a new one), so it
    returns an :class:`Outcome` instead of raising (the widget decides what the user sees, a
    notification with the problem and its fix, and napari prints no traceback).

    Its ``str`` is what napari's task status shows (instead of ``<function ...>``).
    """

    def __init__(self, label: str, fn: Callable[[], Any], job: Job | None = None) -> None:
        self.label = label
        self.fn = fn
        self.job = job if job is not None else Job(label)

    def __call__(self) -> Outcome:
        return self.job.run(self.fn)

    def __str__(self) -> str:
        return self.label

    __repr__ = __str__


def error_message(exc: BaseException) -> str:
    """What the user reads: the problem and its fix (the product's errors format themselves,
    as on the command line), or the error's type and message."""
    from napari_maeprobe.embed.engine import WorkerCrashedError

    if isinstance(exc, (MaeprobeInputError, WorkerCrashedError)):
        return str(exc)
    return f"{type(exc).__name__}: {exc}"


# --------------------------------------------------------------------------- segmentation


@dataclass
class SegmentationResult:
    """Cells and their boundary map (the pixels that boundary-guided masking weights)."""

    labels: np.ndarray
    boundaries: np.ndarray  # uint8, 1 on boundary pixels
    method: str
    n_cells: int
    notes: list[str]


def segment_image(
    image: MicroscopyImage,
    method: str = "auto",
    nucleus_channel: str | None = None,
    cell_channel: str | None = None,
    diameter: float | None = None,
) -> SegmentationResult:
    """Segment the cells of ``image`` and compute their boundary map (worker thread)."""
    from napari_maeprobe.pp.boundaries import boundary_map
    from napari_maeprobe.pp.segmentation import segment

    seg = segment(image, method, nucleus_channel, cell_channel, diameter)
    labels = compact_labels(np.asarray(seg.labels))
    return SegmentationResult(
        labels, boundary_map(labels).astype(np.uint8), seg.method, seg.n_cells, list(seg.notes)
    )


def compact_labels(labels: np.ndarray) -> np.ndarray:
    """``labels`` as uint16 (uint32 past 65,535 cells), C-contiguous; negatives kept as they are.

    napari draws uint8/uint16 labels as they are, while wider dtypes are recast for the
    texture (on the GUI thread, when the layer is added); the compact copy is made here, in
    the worker (uint16 at least, so cells painted by hand in napari still have room).
    """
    labels = np.asarray(labels)
    if labels.dtype.kind not in "iu":
        labels = labels.astype(np.int64)
    top = int(labels.max()) if labels.size else 0
    low = int(labels.min()) if labels.size else 0
    if low < 0:
        return np.ascontiguousarray(labels)
    for dtype in (np.uint16, np.uint32):
        if top <= np.iinfo(dtype).max:
            return np.ascontiguousarray(labels, dtype=dtype)
    return np.ascontiguousarray(labels)


# --------------------------------------------------------------------------- embedding

#: keep the objects that exist when a run starts out of full garbage collections while it runs
#: (see :func:`hold_full_gc`); measured on the GUI tests: a 450-620 ms gen-2 collection in the
#: middle of an embedding run froze the GUI, as any thread that triggers it holds the GIL
DEFER_FULL_GC = True
_gc_lock = threading.Lock()
_gc_holds = 0


def hold_full_gc() -> None:
    """Move every object tracked now into Python's permanent GC generation (``gc.freeze``).

    A full (gen-2) collection walks every object of the process: with napari and torch loaded
    that takes hundreds of milliseconds, during which the GUI thread cannot run. While a job
    runs, collections then only walk the objects made since it started. Nested holds are
    counted; :func:`release_full_gc` undoes the last one (``gc.unfreeze``).
    """
    global _gc_holds
    if not DEFER_FULL_GC:
        return
    with _gc_lock:
        _gc_holds += 1
        if _gc_holds == 1:
            gc.freeze()


def release_full_gc() -> None:
    """Give the objects held by :func:`hold_full_gc` back to the collector (last hold only)."""
    global _gc_holds
    with _gc_lock:
        if _gc_holds == 0:
            return
        _gc_holds -= 1
        if _gc_holds == 0:
            gc.unfreeze()


def warm_imports() -> None:
    """Import (and run once) what an embedding run needs, on the GUI thread at widget creation.

    First calls in the worker thread held the GIL long enough to freeze the GUI: dask's first
    ``compute`` imports its scheduler machinery (``distributed``, 0.5 s here) and
    scikit-image loads its submodules lazily. A widget that takes a moment to open is expected;
    a GUI that freezes in the middle of a run is not.
    """
    import dask.array as da
    from skimage.filters import threshold_otsu  # noqa: F401  (the lazy loader imports it here)

    from napari_maeprobe.embed import run_local, store  # noqa: F401

    da.zeros(2, chunks=1).sum().compute()


def add_facts(out: str | Path, facts: dict) -> None:
    """Add ``facts`` to the facts of the store at ``out`` (under its write lock)."""
    from napari_maeprobe.embed.store import EmbeddingStore

    store = EmbeddingStore(out, mode="a")
    with store.lock("embed"):
        store.set_facts({**store.facts, **facts})


def finished_units(out: str | Path) -> int:
    """How many finished units the store at ``out`` holds (0 when there is no store)."""
    from napari_maeprobe.embed.store import EmbeddingStore

    try:
        if not (Path(out) / "zarr.json").is_file():
            return 0
        return len(EmbeddingStore(out).units())
    except Exception:  # a half-written or removed store: nothing to resume from
        return 0


class EmbedTask:
    """One embedding run that can be cancelled from another thread: a :class:`Job` (``job``)
    whose token, once the engine says its worker process has started, also cancels the engine.

    ``on_progress(done, total, description)`` is called from the worker thread for each report
    of the library, plus ``(0, 0, "starting the model")`` before the engine starts. Run it in a
    thread worker as ``NamedJob(label, partial(task.run, ...), job=task.job)``.
    """

    def __init__(self, on_progress: Callable[[int, int, str], None] | None = None) -> None:
        self.job = Job("embedding", on_progress=on_progress)
        self.engine = None  # the InferenceEngine, from the moment it starts its worker
        #: after a cancel: the finished units left in the store (0: nothing was written)
        self.kept_units = 0
        self._unhook: Callable[[], None] | None = None

    @property
    def cancelled(self) -> bool:
        return self.job.cancelled

    @property
    def finished(self) -> bool:
        return self.job.finished

    def progress(self, done: int, total: int, description: str) -> bool:
        """The library's progress callback: relay, and return ``False`` once cancelled."""
        return self.job.progress(done, total, description)

    def cancel(self) -> None:
        """Ask the run to stop: the engine (now, or as soon as it starts) stops at once."""
        self.job.cancel()

    def _engine_started(self, engine) -> None:
        """The engine's ``on_started``: from now on a cancel cancels the engine (at once, if
        the task was cancelled already)."""
        self.engine = engine
        self._unhook = self.job.token.on_cancel(engine.cancel)

    def run(
        self,
        image: MicroscopyImage,
        out: str | Path,
        job: EmbedJob,
        labels: np.ndarray | None = None,
        overwrite: bool = False,
        facts: dict | None = None,
    ) -> EmbedResult:
        """Embed ``image`` into the store at ``out`` (worker thread); returns the EmbedResult.

        ``facts`` are added to the store's facts once it is complete (e.g. which z-plane of a
        stack the image is: :meth:`BuiltImage.z_facts`). Raises :class:`Cancelled` when
        cancelled, whatever the library was doing then.
        """
        hold_full_gc()
        try:
            result = self._run(image, out, job, labels, overwrite)
            if facts:
                add_facts(out, facts)
                result.facts.update(facts)
            return result
        except Cancelled:
            self.kept_units = finished_units(out)
            raise
        except BaseException as exc:
            if self.cancelled:
                self.kept_units = finished_units(out)
                raise Cancelled("cancelled") from exc
            raise
        finally:
            unhook, self._unhook = self._unhook, None
            if unhook is not None:
                unhook()
            release_full_gc()

    def _run(self, image, out, job: EmbedJob, labels, overwrite: bool) -> EmbedResult:
        from napari_maeprobe.embed.engine import InferenceEngine
        from napari_maeprobe.embed.run_local import run_embedding

        job.check()
        self.job.token.check("starting the model")
        self.progress(0, 0, "starting the model")
        engine = InferenceEngine(job.engine_config(), on_started=self._engine_started)
        try:
            result = run_embedding(
                [image],
                out,
                job,
                labels=[labels],
                progress=self.progress,
                overwrite=overwrite,
                engine=engine,
            )
        except BaseException:
            engine.close(kill=True)
            raise
        # the store is complete: let the worker exit in the background (about a second)
        threading.Thread(target=engine.close, daemon=True, name="maeprobe-close").start()
        return result
