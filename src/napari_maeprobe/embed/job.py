"""An embedding job: everything that decides a store's contents, checked before any work."""

from __future__ import annotations

from dataclasses import dataclass, field, fields

from napari_maeprobe.embed.engine import (
    LEVELS,
    EngineConfig,
)
from napari_maeprobe.errors import MaeprobeInputError

#: the choices of each job setting: the command line, the GUI and :meth:`EmbedJob.check` read them
MASKING_CHOICES = ("none", "random", "boundary")
SEGMENTATION_CHOICES = ("auto", "cellpose", "builtin", "none")  # none: tile the images
NORMALIZATION_CHOICES = ("percentile", "zscore", "none")
PRECISION_CHOICES = ("auto", "fp32", "bf16", "fp16")
STORE_DTYPES = ("float16", "float32")


@dataclass
class EmbedJob:
    """What to embed and how: everything that decides the store's contents."""

    model: str = "default"
    weights: str | None = None
    model_options: dict = field(default_factory=dict)
    channels: list[str] | None = None
    levels: tuple[str, ...] = LEVELS
    segmentation: str = "auto"  # auto | cellpose | builtin | none (tiles) | given (labels passed)
    diameter: float | None = None
    crop_size: int | tuple[int, ...] | None = None  # None: the model's input size
    normalization: str = "percentile"
    normalize_by: str = "image"  # image | dataset | a metadata column (plate): shared statistics
    normalize_reference: str | None = None  # COLUMN=VALUE: statistics from those images only
    projection: str = "max"  # z-stacks with a 2D model: max | slice
    masking: str = "none"
    mask_ratio: float = 0.75
    tau: float = 0.5
    seed: int = 0
    dtype: str = "float16"
    attention: bool = False
    reconstruction: bool = False
    device: str = "auto"
    precision: str = "auto"
    batch_size: int | None = None
    random_init: bool = False
    exclude_border: bool = False  # leave out cells whose mask touches the image border

    def engine_config(self) -> EngineConfig:
        """The engine's settings: every :class:`EngineConfig` field this job also has (one
        definition of each setting; the engine's other fields keep their defaults)."""
        mine = {f.name for f in fields(self)}
        values = {f.name: getattr(self, f.name) for f in fields(EngineConfig) if f.name in mine}
        values["model_options"] = dict(self.model_options)
        values["levels"] = tuple(self.levels)
        return EngineConfig(**values)

    def check(self) -> None:
        """Refuse impossible settings before any work is done."""
        bad = [lvl for lvl in self.levels if lvl not in LEVELS]
        if bad or not self.levels:
            raise MaeprobeInputError(
                f"unknown level(s) {', '.join(bad) or '(none)'}",
                "use --levels with some of global,channel,patch",
            )
        if self.masking not in MASKING_CHOICES:
            raise MaeprobeInputError(
                f"unknown masking {self.masking!r}", "use --masking none, random or boundary"
            )
        if not 0.0 <= self.mask_ratio < 1.0:
            raise MaeprobeInputError(
                f"mask ratio {self.mask_ratio} is outside [0, 1)", "pick e.g. --mask-ratio 0.75"
            )
        if self.crop_size is not None:
            size = self.crop_size
            sizes = list(size) if isinstance(size, (tuple, list)) else [size]
            if any(int(v) <= 0 for v in sizes):
                raise MaeprobeInputError(
                    f"crop size {self.crop_size} is not a positive number of pixels",
                    "pass a positive --crop-size (a multiple of the model's patch size), or "
                    "leave it out to crop at the model's input size",
                )
        if self.normalization not in NORMALIZATION_CHOICES:
            raise MaeprobeInputError(
                f"unknown normalisation {self.normalization!r}",
                f"use --normalization {', '.join(NORMALIZATION_CHOICES)}",
            )
        from napari_maeprobe.pp.normalization_groups import check_scope

        check_scope(self.normalize_by, self.normalize_reference)
        if self.tau <= 0:
            raise MaeprobeInputError(f"tau {self.tau} must be positive", "pick e.g. --tau 0.5")
        if self.dtype not in STORE_DTYPES:
            raise MaeprobeInputError(
                f"unknown store dtype {self.dtype!r}", "use --dtype float16 or float32"
            )
        if self.masking == "boundary" and self.segmentation == "none":
            raise MaeprobeInputError(
                "boundary-guided masking needs cell boundaries, but segmentation is off",
                "segment the cells (drop --segmentation none) or use --masking random",
            )
        if self.reconstruction and self.masking == "none":
            raise MaeprobeInputError(
                "reconstructions need masked patches to reconstruct",
                "add --masking random or --masking boundary",
            )
