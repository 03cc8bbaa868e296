"""``maeprobe demo``: the main job on the bundled sample data.

So far: open the samples, segment them, compute boundary maps, cut single-cell crops, write
their patch table, and embed every cell of the 2D samples with the bundled default model at
three levels (global, per channel, per patch). The store, analysis and report join with the
next issue.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from .progress import ProgressCallback
from .samples import load_sample
from .workflows import (
    SegmentedImage,
    _atomic_write,
    embed_segmented,
    overlay_png,
    prepare_patches,
    segment_images,
    write_json,
    write_segmentation_outputs,
)

DEMO_SAMPLES = ("cellpainting", "examplehuman", "imc", "nuclei3d")


@dataclass
class DemoResult:
    """What the demo computed and where it wrote it."""

    out_dir: Path
    segmented: list[SegmentedImage]
    summary: pd.DataFrame
    patches: pd.DataFrame
    embeddings: dict[str, pd.DataFrame]
    model: dict

    def describe(self) -> str:
        lines = []
        for _, r in self.summary.iterrows():
            lines.append(
                f"{r['dataset']}/{r['image']} ({r['shape']}, {r['channels']}): "
                f"{r['n_cells']} cells "
                f"by {r['method']}"
            )
        n_fg = int(self.patches["foreground"].sum())
        lines.append(
            f"patch table: {len(self.patches)} rows (cell x channel x patch), {n_fg} foreground, "
            f"mean boundary fraction {self.patches['boundary_fraction'].mean():.3f}"
        )
        sizes = ", ".join(f"{lvl} {len(t)}" for lvl, t in self.embeddings.items())
        lines.append(
            f"embeddings ({self.model['model']}, {self.model['embed_dim']}-d, weights sha256 "
            f"{self.model['weights_sha256'][:12]}...): {sizes} rows"
        )
        return "\n".join(lines)


def run_demo(
    out_dir: Path,
    method: str = "auto",
    diameter: float | None = None,
    weights: str | None = None,
    progress: ProgressCallback | None = None,
) -> DemoResult:
    """Segment the bundled samples and write labels, boundary maps, overlays and patch tables."""
    out_dir = Path(out_dir)
    images = [load_sample(k)[0] for k in DEMO_SAMPLES]
    segmented = segment_images(images, method, None, None, diameter, weights, progress=progress)
    summary = write_segmentation_outputs(segmented, out_dir / "segmentation")
    for s in segmented:
        overlay_png(
            out_dir / f"overlay_{s.image.name}.png",
            s.image,
            s.boundary,
            s.segmentation.nucleus_channel,
        )
    patches = prepare_patches(segmented, crop_size=96, patch_size=12, progress=progress)
    _atomic_write(out_dir / "patches.parquet", lambda p: patches.to_parquet(p, index=False))
    _atomic_write(out_dir / "patches.csv", lambda p: patches.to_csv(p, index=False))
    embeddings, model_facts = embed_segmented(segmented, "default", progress=progress)
    for level, table in embeddings.items():
        _atomic_write(
            out_dir / f"embeddings_{level}.parquet", lambda p, t=table: t.to_parquet(p, index=False)
        )
    write_json(
        out_dir / "demo.json",
        {
            "samples": list(DEMO_SAMPLES),
            "segmentation": summary.to_dict(orient="records"),
            "patch_rows": len(patches),
            "embeddings": {lvl: len(t) for lvl, t in embeddings.items()},
            "model": model_facts,
        },
    )
    return DemoResult(out_dir, segmented, summary, patches, embeddings, model_facts)


def show_demo(result: DemoResult) -> None:
    """Open the demo's images, labels and boundary maps in napari."""
    import napari

    from ._napari.layers import image_layers

    viewer = napari.Viewer(title="maeprobe demo")
    for s in result.segmented[:1]:
        for data, meta, _ in image_layers(s.image):
            viewer.add_image(data, **meta)
        viewer.add_labels(s.segmentation.labels, name=f"{s.image.name} cells", opacity=0.3)
        viewer.add_labels(
            s.boundary.astype("uint8"), name=f"{s.image.name} boundaries", opacity=0.8
        )
    napari.run()
