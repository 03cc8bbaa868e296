"""Rebuild the precomputed embeddings behind File > Open Sample > "IMC with embeddings".

The IMC sample (5 markers, 55 cells with the shipped DeepCell masks) embedded with the bundled
default model at three levels with attention maps, then analysed (PCA, UMAP, Leiden,
diagnostics). Run from the repository root: ``.venv/bin/python scripts/make_sample_embeddings.py``.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from napari_maeprobe.embed.job import EmbedJob
from napari_maeprobe.embed.run_local import run_embedding
from napari_maeprobe.embed.store import EmbeddingStore
from napari_maeprobe.io.samples import load_sample, sample_data_dir
from napari_maeprobe.tl.analyze import analyze_store

OUT = sample_data_dir() / "embeddings" / "imc_default.zarr"


def main() -> None:
    image, labels = load_sample("imc")
    if OUT.exists():
        shutil.rmtree(OUT)
    result = run_embedding([image], OUT, EmbedJob(attention=True), [labels])
    analyze_store(EmbeddingStore(OUT, mode="a"))
    size = sum(f.stat().st_size for f in Path(OUT).rglob("*") if f.is_file()) / 2**20
    print(f"{OUT}: {result.rows}, {size:.1f} MiB")


if __name__ == "__main__":
    main()
