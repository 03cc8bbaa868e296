"""Which images share normalisation statistics: each image its own (the default), a group of
images (a plate, the whole data set), or a reference set inside each group (the control wells),
as screens are usually normalised.

Per-image scaling removes every image-wide difference before the model sees it: a compound that
dims every cell, or a plate imaged brighter on another date, looks the same as the control.
Pooling the statistics over a plate keeps differences between the plate's images and removes
only the differences between plates; statistics taken from the control images keep every
difference from the control. :func:`describe_normalization` says this in one line for the
report, next to the verdict.

The pooled statistic of a channel is the median, over the group's (reference) images, of each
image's own statistic (:func:`napari_maeprobe.pp.preprocessing.normalization_stats`): robust to
one odd field, and it needs no second pass over the pixels (exact pooled percentiles would hold
every pixel of a plate in memory).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from napari_maeprobe.errors import MaeprobeInputError

#: the named scopes; any other value names a metadata column (e.g. plate)
NAMED_SCOPES = ("image", "dataset")


def parse_reference(reference: str | None) -> tuple[str, str] | None:
    """``"compound=DMSO"`` -> ``("compound", "DMSO")``; None stays None."""
    if reference is None or not str(reference).strip():
        return None
    column, sep, value = str(reference).partition("=")
    if not sep or not column.strip() or not value.strip():
        raise MaeprobeInputError(
            f"reference {reference!r} is not COLUMN=VALUE",
            "name the reference images by a metadata value, e.g. --normalize-reference "
            "compound=DMSO",
        )
    return column.strip(), value.strip()


def check_scope(by: str, reference: str | None) -> None:
    """Refuse settings that cannot mean anything before any image is read."""
    if not str(by).strip():
        raise MaeprobeInputError(
            "normalise by: no scope given",
            "use --normalize-by image, dataset or a metadata column such as plate",
        )
    ref = parse_reference(reference)
    if ref is not None and by == "image":
        raise MaeprobeInputError(
            f"a reference set ({reference}) needs images to share statistics, but each image "
            "is normalised by itself",
            "add --normalize-by plate (or dataset) to scale each plate by its reference images",
        )


def group_of(metadata: Mapping[str, object], dataset: str, by: str, name: str) -> str:
    """The group an image belongs to under scope ``by``."""
    if by == "image":
        return name
    if by == "dataset":
        return str(dataset)
    if by not in metadata or metadata[by] is None or str(metadata[by]) in ("", "nan", "<NA>"):
        have = ", ".join(sorted(str(k) for k in metadata)) or "none"
        raise MaeprobeInputError(
            f"{name}: no value of {by!r} to group its normalisation by (its metadata: {have})",
            "attach a table with that column (--metadata CSV), or use --normalize-by image or "
            "dataset",
        )
    return str(metadata[by])


def pool_statistics(
    stats: Sequence[np.ndarray],
    metadata: Sequence[Mapping[str, object]],
    datasets: Sequence[str],
    names: Sequence[str],
    by: str = "image",
    reference: str | None = None,
) -> tuple[list[np.ndarray], list[str]]:
    """The statistics each image is normalised with, and a note per image saying where they
    came from.

    ``stats``: each image's own (C, 2) statistics; images of one group must have the same
    channels. With ``by == "image"`` and no reference they are returned unchanged. Otherwise
    every image of a group gets the median of the statistics of the group's images (only the
    images whose ``reference`` column holds the reference value, when given).
    """
    check_scope(by, reference)
    ref = parse_reference(reference)
    if by == "image" and ref is None:
        return [np.asarray(s) for s in stats], ["own statistics"] * len(stats)
    groups = [group_of(m, d, by, n) for m, d, n in zip(metadata, datasets, names)]
    out: list[np.ndarray] = [np.asarray(s) for s in stats]
    notes = [""] * len(stats)
    for g in dict.fromkeys(groups):
        members = [i for i, gi in enumerate(groups) if gi == g]
        shapes = {np.asarray(stats[i]).shape for i in members}
        if len(shapes) > 1:
            raise MaeprobeInputError(
                f"the images of {by} {g} have different channel counts, so they cannot share "
                "normalisation statistics",
                "pick the same channels for every image (--channels NAME,...), or use "
                "--normalize-by image",
            )
        refs = members
        if ref is not None:
            column, value = ref
            refs = [i for i in members if _same_value(metadata[i].get(column), value)]
            if not refs:
                raise MaeprobeInputError(
                    f"{by} {g} has no image with {column}={value} to take its normalisation "
                    "statistics from",
                    "pick a reference present in every group, or normalise by a larger group "
                    "(--normalize-by dataset)",
                )
        pooled = np.median(np.stack([np.asarray(stats[i]) for i in refs]), axis=0)
        what = f"{len(refs)} {'reference ' if ref else ''}image{'s' if len(refs) != 1 else ''}"
        for i in members:
            out[i] = pooled
            notes[i] = f"median of the statistics of {what} of {by} {g}"
    return out, notes


def describe_normalization(
    method: str,
    by: str = "image",
    reference: str | None = None,
    model_standardizes: bool = False,
) -> str:
    """One line for the report: how images were normalised and what that hides from the
    model (``model_standardizes``: the model z-scores every crop channel itself, as CA-MAE
    does, which removes brightness whatever the normalisation)."""
    line = _scope_text(method, by, reference)
    if model_standardizes:
        line += (
            "; on top of that the model standardises every crop channel by its own mean and "
            "standard deviation, so brightness differences between cells do not reach the "
            "embedding whatever this setting (the intensity/shape baseline and the "
            "mean_intensity_* columns still see them)"
        )
    return line


def _scope_text(method: str, by: str, reference: str | None) -> str:
    if method == "none":
        return ("raw intensities (no normalisation): every brightness difference, technical or "
                "biological, reaches the model")  # fmt: skip
    how = {"percentile": "1st-99.8th percentiles", "zscore": "mean and standard deviation"}
    stat = how.get(method, method)
    ref = parse_reference(reference)
    if by == "image" and ref is None:
        return (
            f"each image scaled by its own {stat}: image-wide differences (a compound that "
            "dims every cell, a plate imaged brighter) are removed before the model sees "
            "them; the raw per-cell means (mean_intensity_*) still show them"
        )
    scope = "all images together" if by == "dataset" else f"each {by}"
    if ref is not None:
        column, value = ref
        return (
            f"{scope} scaled by the {stat} of its {column}={value} images: differences from "
            f"{value} are kept; differences between "
            f"{'data sets' if by == 'dataset' else by + 's'} in the {value} images are removed"
        )
    if by == "dataset":
        return (f"all images of a data set scaled by the same {stat}: image-wide differences "
                "are kept (technical ones too, such as a plate imaged brighter)")  # fmt: skip
    return (
        f"the images of each {by} scaled by the same {stat}: differences between images of "
        f"one {by} are kept, differences between {by}s are removed"
    )


def _same_value(held: object, wanted: str) -> bool:
    """A metadata value equals the reference value as text, or as numbers (``0`` and
    ``0.0`` are one dose)."""
    if str(held) == wanted:
        return True
    try:
        return float(str(held)) == float(wanted)
    except ValueError:
        return False
