"""One exception type for bad input: a message that names the problem and the fix.

The CLI prints it as one line (no traceback) and the napari widgets show it as a notification.
"""

from __future__ import annotations


class MaeprobeInputError(ValueError):
    """Bad input the user can fix: wrong axes, missing channels, truncated files, no cells, ..."""

    def __init__(self, problem: str, fix: str | None = None) -> None:
        self.problem = problem.rstrip(".")
        self.fix = fix.rstrip(".") if fix else None
        super().__init__(f"{self.problem}. Fix: {self.fix}." if self.fix else f"{self.problem}.")


class NoCellsFoundError(MaeprobeInputError):
    """Segmentation ran but found no cells."""


class WeightsNotFoundError(MaeprobeInputError):
    """Model weights are neither on this machine nor downloadable."""
