"""Benchmark: the embedding store, and memory while embedding the patch level of many cells.

1. Store write throughput: real patch embeddings of the default model (ExampleHuman, 346 cells,
   66,432 patch rows x 144) written batch by batch into a fresh store, float16 and float32,
   then read back (one level; one image).
2. Peak memory of a whole patch-level embedding job with 1x, 4x and 16x the cells: copies of
   the ExampleHuman field under different names (346 cells each), each job in a fresh process.
   Peak resident memory of the calling process and of the model's worker process should not
   grow with the number of cells (rows stream batch by batch into the store).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

JOB_SCRIPT = r"""
import json, resource, sys, time
from napari_maeprobe.embed.job import EmbedJob
from napari_maeprobe.embed.run_local import run_embedding
from napari_maeprobe.io.samples import load_sample
from napari_maeprobe.pp.segmentation import segment
copies, out = int(sys.argv[1]), sys.argv[2]
image, _ = load_sample("examplehuman")
labels = segment(image, "builtin").labels
images = [image.with_data(image.data, name=f"{image.name}_copy{i}") for i in range(copies)]
t0 = time.perf_counter()
res = run_embedding(images, out, EmbedJob(levels=("patch",)), [labels] * copies)
seconds = time.perf_counter() - t0
print(json.dumps({
    "rows": res.rows["patch"], "seconds": seconds,
    "rss_main_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    "rss_worker_mib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
}))
"""


def _throughput(tmp: Path) -> list[tuple]:
    from napari_maeprobe.embed.job import EmbedJob
    from napari_maeprobe.embed.run_local import run_embedding
    from napari_maeprobe.embed.store import EmbeddingStore, UnitSpec
    from napari_maeprobe.io.samples import load_sample
    from napari_maeprobe.pp.segmentation import segment
    from napari_maeprobe.table import read_level

    image, _ = load_sample("examplehuman")
    labels = segment(image, "builtin").labels
    src = run_embedding([image], tmp / "src.zarr", EmbedJob(levels=("patch",)), [labels])
    table = read_level(src.store, "patch")
    obs, X = table.obs.reset_index(drop=True), np.asarray(table.X)
    rows = []
    for dtype in ("float16", "float32"):
        store = EmbeddingStore.open_for_job(tmp / f"w_{dtype}.zarr", {"bench": dtype})
        t0 = time.perf_counter()
        unit = UnitSpec("00000-00000", 0, np.arange(len(obs) // 192), {"patch": len(obs)})
        store.begin_unit(unit, {"patch": obs}, X.shape[1], dtype)
        batch = 64 * 192  # rows of one batch of 64 cells (3 channels x 64 patches)
        for start in range(0, len(X), batch):
            store.write_rows(unit.key, "patch/X", start, X[start : start + batch])
        store.finish_unit(unit.key)
        t_write = time.perf_counter() - t0
        size = sum(f.stat().st_size for f in (tmp / f"w_{dtype}.zarr").rglob("*") if f.is_file())
        t0 = time.perf_counter()
        read_level(store, "patch")
        t_read = time.perf_counter() - t0
        rows.append((dtype, len(X), t_write, len(X) / t_write, X.nbytes / 2**20 / t_write,
                     size / 2**20, t_read))  # fmt: skip
    return rows


def _memory(tmp: Path, copies_list=(1, 4, 16)) -> list[dict]:
    out = []
    for copies in copies_list:
        target = tmp / f"mem{copies}.zarr"
        proc = subprocess.run([sys.executable, "-c", JOB_SCRIPT, str(copies), str(target)],
                              capture_output=True, text=True, check=True)  # fmt: skip
        res = json.loads(proc.stdout.strip().splitlines()[-1])
        res["cells"] = 346 * copies
        res["store_mib"] = sum(f.stat().st_size for f in target.rglob("*") if f.is_file()) / 2**20
        out.append(res)
        shutil.rmtree(target)
    return out


def run() -> tuple[str, dict]:
    tmp = Path(tempfile.mkdtemp(prefix="maeprobe-bench-store-"))
    try:
        thr = _throughput(tmp)
        mem = _memory(tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    lines = [
        "### Embedding store: write throughput and memory while embedding",
        "",
        "Write: real patch embeddings of the default model (ExampleHuman, 346 cells x 3 "
        "channels x 64 patches, 144-d) written in batches of 64 cells into a fresh store "
        "(zarr v3, zstd), then the level read back as float32.",
        "",
        "| dtype | rows | write (s) | rows/s | MiB/s (float32 input) | on disk (MiB) | read (s) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for dtype, n, tw, rps, mbs, size, tr in thr:
        lines.append(
            f"| {dtype} | {n:,} | {tw:.2f} | {rps:,.0f} | {mbs:.0f} | {size:.1f} | {tr:.2f} |"
        )
    lines += [
        "",
        "Memory: `run_embedding(..., EmbedJob(levels=('patch',)))` on N copies of the "
        "ExampleHuman field, each job in a fresh process; peak resident memory of the caller "
        "(reads images, writes the store) and of the model's worker process.",
        "",
        "| cells | patch rows | time (s) | cells/s | peak RSS caller (MiB) | "
        "peak RSS worker (MiB) | store (MiB) |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in mem:
        lines.append(
            f"| {r['cells']:,} | {r['rows']:,} | {r['seconds']:.1f} | "
            f"{r['cells'] / r['seconds']:.1f} | {r['rss_main_mib']:.0f} | "
            f"{r['rss_worker_mib']:.0f} | {r['store_mib']:.0f} |"
        )
    growth = mem[-1]["rss_main_mib"] / mem[0]["rss_main_mib"]
    lines += [
        "",
        f"{mem[-1]['cells'] // mem[0]['cells']}x the cells: the caller's peak memory grows "
        f"{growth:.2f}x, the worker's {mem[-1]['rss_worker_mib'] / mem[0]['rss_worker_mib']:.2f}x.",
    ]
    return "\n".join(lines), {"throughput": thr, "memory": mem}


if __name__ == "__main__":
    print(run()[0])
