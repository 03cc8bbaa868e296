"""Run a job: plan it, open its store, embed every unfinished unit here (the engine's worker
process) or on a dask cluster."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from napari_maeprobe.embed.engine import (
    InferenceEngine,
)
from napari_maeprobe.embed.job import EmbedJob
from napari_maeprobe.embed.labels import labels_for
from napari_maeprobe.embed.plan import (
    cells_per_unit,
    crop_size_for,
    describe_inputs,
    job_facts,
    job_signature,
    plan_image,
    plan_units,
    prepare_image,
    use_statistics,
)
from napari_maeprobe.embed.run_dask import remote_model_info, run_distributed
from napari_maeprobe.embed.store import EmbeddingStore
from napari_maeprobe.embed.units import embed_unit
from napari_maeprobe.errors import MaeprobeInputError, NoCellsFoundError
from napari_maeprobe.io.crops import CropStack, check_crop_job
from napari_maeprobe.io.image import MicroscopyImage
from napari_maeprobe.pp.boundaries import boundary_map
from napari_maeprobe.pp.segment_batch import say, skip_line
from napari_maeprobe.pp.segmentation import SKIPPABLE
from napari_maeprobe.progress import ProgressCallback, report


@dataclass
class EmbedResult:
    """What an embedding job did."""

    store: EmbeddingStore
    units_done: int
    units_skipped: int
    rows: dict[str, int]
    seconds: float
    facts: dict


def _nucleus_channels(images, given, job: EmbedJob) -> dict[tuple[str, ...], tuple[int, str]]:
    """The nucleus channel of each channel set among the images this run segments (by name,
    else by content over the run), so that every image uses the same one."""
    from napari_maeprobe.pp.segmentation import choose_nucleus_channel_for_run

    if job.segmentation == "none":
        return {}
    todo = [im for im, g in zip(images, given) if g is None and not isinstance(im, CropStack)]
    return choose_nucleus_channel_for_run(todo) if todo else {}


def run_embedding(
    images: Sequence[MicroscopyImage],
    out: str | Path,
    job: EmbedJob,
    labels: Sequence[np.ndarray | None] | None = None,
    progress: ProgressCallback | None = None,
    scheduler: str | None = None,
    overwrite: bool = False,
    engine: InferenceEngine | None = None,
    per_unit: int | None = None,
) -> EmbedResult:
    """Embed every cell of ``images`` into the store at ``out`` (resuming a matching store).

    ``labels``: one label image per image (None entries: segment or tile as ``job`` says).
    ``scheduler``: a dask.distributed scheduler address (or ``"local"`` for a LocalCluster):
    one task per unit, results gathered into the store here. ``per_unit``: cells per unit of
    work (default: what keeps a unit's crops under :data:`UNIT_BYTES`).

    The store's write lock is held while the job runs (a second writer is refused, naming this
    process); the plan (units and cells) is recorded, so the store says whether it is complete.
    A run that fails before any unit is complete removes the store if it created it.
    """
    t0 = time.perf_counter()
    job.check()
    if not images:
        raise MaeprobeInputError("no images to embed", "pass at least one image file or folder")
    names = [img.name for img in images]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise MaeprobeInputError(
            f"several images are named {', '.join(dupes)}",
            "give each image its own file name (names key the store's rows)",
        )
    given = list(labels) if labels is not None else [None] * len(images)
    if len(given) != len(images):
        raise MaeprobeInputError(
            f"{len(given)} label images for {len(images)} images", "pass one label image per image"
        )
    own_engine = engine is None and scheduler is None
    if own_engine:
        engine = InferenceEngine(job.engine_config())
    store = None
    try:
        info = engine.info if engine is not None else remote_model_info(scheduler, job)
        model_3d = len(info.patch_size) == 3
        images = [prepare_image(img, job, model_3d, info) for img in images]
        crop_size = crop_size_for(job, info)
        seg_kind = "given" if any(g is not None for g in given) else job.segmentation
        if any(isinstance(img, CropStack) for img in images):
            check_crop_job(images, job, given)
            seg_kind = "crops" if all(isinstance(i, CropStack) for i in images) else seg_kind
        n_c = max(img.n_channels for img in images)
        per_unit = per_unit or cells_per_unit((n_c, *crop_size))
        signature = job_signature(job, describe_inputs(images), info, seg_kind, per_unit)
        store = EmbeddingStore.open_for_job(out, signature, overwrite=overwrite)
        planned, skipped = [], []
        nucleus = _nucleus_channels(images, given, job)  # chosen once per run, said once
        for names, (index, how) in nucleus.items():
            n = sum(tuple(im.channel_names) == names for im in images)
            say(f"nucleus channel '{names[index]}' ({how}): {n} image{'s' if n > 1 else ''}")
        for i, img in enumerate(images):
            report(progress, i, len(images), "segmenting")
            try:  # one bad image (no cells, empty plane, unreadable pixels) is skipped
                if isinstance(img, CropStack):  # each crop is one cell: nothing to segment
                    lab, method = None, "crops"
                elif given[i] is not None and not np.any(given[i]):  # before it is stored
                    raise NoCellsFoundError(
                        f"{img.name}: its label image holds no cells",
                        "pass the label image made from this image (maeprobe segment)",
                    )
                else:  # stored labels are keyed by the index among the images kept
                    lab, method = labels_for(store, len(planned), img, job, given[i],
                                             nucleus.get(tuple(img.channel_names)))
                planned.append(plan_image(img, job, lab, crop_size, tuple(info.patch_size)))
            except SKIPPABLE as exc:
                if len(images) == 1:
                    raise  # a single image: its own error, as one line
                skipped.append(img.name)
                say(skip_line(img.name, exc))
                continue
            planned[-1].metadata["segmentation"] = method
        if not planned:
            raise MaeprobeInputError(
                f"none of the {len(images)} image(s) could be used (each is named above)",
                "check the images and their nucleus channel",
            )
        if skipped:
            say(f"{len(skipped)} of {len(images)} image(s) skipped")
        if job.exclude_border:  # said once per run, of the segmented cells it applies to
            cells = [p for p in planned if p.labels is not None]
            n_out = sum(p.excluded_border for p in cells)
            n_all = n_out + sum(len(p.cell_ids) for p in cells)
            if cells:
                say(f"border cells excluded: {n_out:,} of {n_all:,} cells touch the image border")
            if len(cells) < len(planned):
                say("border exclusion applies to segmented cells only: tiles and crop stacks "
                    "are kept whole")  # fmt: skip
        report(progress, len(images), len(images), "segmenting")
        share_statistics(planned, job, crop_size, tuple(info.patch_size))
        store.set_images([p.info() for p in planned])
        n_patches = int(np.prod([s // q for s, q in zip(crop_size, info.patch_size)]))
        rows_per_cell = {"global": 1, "channel": n_c if info.channel_agnostic else 0,
                         "patch": n_patches * (n_c if info.channel_agnostic else 1)}  # fmt: skip
        rows_per_cell = {k: v for k, v in rows_per_cell.items() if k in job.levels and v}
        units = plan_units(planned, per_unit, rows_per_cell)
        store.set_plan(units)
        todo = [u for u in units if not store.unit_complete(u.key)]
        facts = job_facts(job, info, crop_size)
        fits = {p.image.name: p.crop_fit for p in planned if p.crop_fit}
        if fits:  # crop stacks: how crops met the model's input (pad | resize)
            facts["crop_fit"] = fits.popitem()[1] if len(set(fits.values())) == 1 else fits
            if seg_kind == "crops":
                facts["segmentation"] = "crops"
        store.set_facts(facts)
        total = sum(len(u.cell_ids) for u in units)
        done = total - sum(len(u.cell_ids) for u in todo)
        if scheduler is None:
            _run_local(store, planned, todo, engine, job, crop_size, progress, done, total)
        else:
            run_distributed(store, planned, todo, job, crop_size, scheduler, progress, done, total)
    except BaseException:
        if store is not None:  # a store this run created, with no unit done, is removed
            store.close(discard_if_empty=True)
        raise
    finally:
        if own_engine and engine is not None:
            engine.close()
        if store is not None:
            store.close()  # lets go of the write lock
    rows = {lvl: store.n_rows(lvl) for lvl in store.levels()}
    return EmbedResult(store, len(todo), len(units) - len(todo), rows,
                       time.perf_counter() - t0, facts)  # fmt: skip


def _run_local(store, planned, todo, engine, job, crop_size, progress, done, total) -> None:
    boundaries: dict[int, np.ndarray] = {}
    for unit in todo:
        p = planned[unit.image_index]
        if p.labels is not None and unit.image_index not in boundaries:
            boundaries.clear()  # one image's boundary map at a time
            boundaries[unit.image_index] = boundary_map(p.labels)
        inner = _offset_progress(progress, done, total)
        for kind, *payload in embed_unit(p, unit, engine, job, crop_size,
                                         boundaries.get(unit.image_index), inner):  # fmt: skip
            if kind == "begin":
                obs, extras = payload
                store.begin_unit(unit, obs, engine.info.embed_dim, job.dtype, extras)
            else:
                for name, start, values in payload[0]:
                    store.write_rows(unit.key, name, start, values)
        store.finish_unit(unit.key)
        done += len(unit.cell_ids)
        report(progress, done, total, "embedding")


def _offset_progress(progress, done: int, total: int):
    if progress is None:
        return None

    def inner(d: int, _t: int, desc: str):
        return progress(done + d, total, desc)

    return inner


def share_statistics(
    planned: list, job: EmbedJob, crop_size: tuple[int, ...], patch_size: tuple[int, ...]
) -> None:
    """Give the images of each normalisation group (``job.normalize_by``, optionally from
    ``job.normalize_reference`` images only) their group's statistics
    (:mod:`napari_maeprobe.pp.normalization_groups`); per-image scaling leaves them alone."""
    from napari_maeprobe.pp.normalization_groups import pool_statistics

    if job.normalize_by == "image" and not job.normalize_reference:
        return
    stats, notes = pool_statistics(
        [p.stats for p in planned], [p.metadata for p in planned],
        [p.image.dataset for p in planned], [p.image.name for p in planned],
        job.normalize_by, job.normalize_reference,
    )  # fmt: skip
    for p, s, note in zip(planned, stats, notes):
        use_statistics(p, s, note, job, crop_size, patch_size)
    groups = len({tuple(map(tuple, s)) for s in stats})
    say(f"normalisation statistics shared by {job.normalize_by}: {groups} group(s)"
        + (f", from the {job.normalize_reference} images" if job.normalize_reference else ""))
