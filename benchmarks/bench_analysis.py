"""Benchmark: UMAP of 100k and 1M patch embeddings (384-d), our strategy against plain umap-learn.

Data: patch embeddings of the ``ca-mae`` model (ViT-S/16, 384-d, random weights as the real
ones cannot be downloaded here) on real images from ``sample_data/``: random 128x128 windows
(with a random flip/rotation each) of the Cell Painting field (6 channels), CellProfiler
ExampleHuman (3), the NEUBIAS cell/DNA/MTS/actin image (3) and z-slices of the 3D nuclei stack
(1). Every row is one patch of one channel of one window (8 x 8 patches per channel). The rows
are computed once, shuffled with a fixed seed and cached in ``benchmarks/.cache/`` (not in git);
the 100k set is the first 100k rows of the 1M set.

Each size runs :func:`napari_maeprobe.tl.analysis.umap_embed` with its defaults (fit on 20k rows,
then ``transform`` of the rest in chunks) and ``umap.UMAP().fit_transform`` on every row, each
in its own subprocess (fresh memory, a time cap) on the same data in the same run. Quality:
trustworthiness (scikit-learn, 10 neighbours) on one fixed 10k-row subset for both.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
CACHE = HERE / ".cache"
N_ROWS = 1_000_000
WINDOW = 128
SOURCES = (  # (sample key or neubias file, share of the rows)
    ("cellpainting", 0.6),
    ("examplehuman", 0.2),
    ("neubias", 0.1),
    ("nuclei3d", 0.1),
)
NEUBIAS_FILE = "xyc_16bit__cell_dna_mts_actin.tif"
TRUST_ROWS = 10_000
WARMUP_ROWS = 10_000
TRUST_K = 10
SIZES = (100_000, 1_000_000)
#: plain umap-learn stops after this many minutes (MAEPROBE_BENCH_CAP_MIN overrides)
CAP_MIN = 40


def _images() -> dict[str, tuple[np.ndarray, list[str]]]:
    """Each source as normalised float32 ``(C, [Z,] Y, X)`` with its channel names."""
    from napari_maeprobe.io.reading import read_image
    from napari_maeprobe.io.samples import load_sample, sample_data_dir
    from napari_maeprobe.pp.preprocessing import normalize

    out = {}
    for key, _ in SOURCES:
        if key == "neubias":
            path = sample_data_dir() / "neubias_small_multichannel" / NEUBIAS_FILE
            image = read_image(path, dataset="neubias_small_multichannel")
            names = ["cell", "dna", "mts"]
        else:
            image, _ = load_sample(key)
            names = list(image.channel_names)
        out[key] = (normalize(image.to_numpy()), names)
    return out


def _windows(data: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` random WINDOW x WINDOW windows of ``data`` (a random z-slice for 3D data), each
    flipped/rotated by a random element of the dihedral group."""
    out = np.empty((n, data.shape[0], WINDOW, WINDOW), dtype=np.float32)
    for i in range(n):
        img = data[:, rng.integers(data.shape[1])] if data.ndim == 4 else data
        y = rng.integers(img.shape[-2] - WINDOW + 1)
        x = rng.integers(img.shape[-1] - WINDOW + 1)
        w = img[:, y : y + WINDOW, x : x + WINDOW]
        w = np.rot90(w, k=int(rng.integers(4)), axes=(1, 2))
        out[i] = w[:, :, ::-1] if rng.integers(2) else w
    return out


def real_embeddings(n_rows: int = N_ROWS, batch: int = 8) -> tuple[np.ndarray, dict]:
    """The cached ``(n_rows, 384)`` float32 patch embeddings and their row metadata."""
    CACHE.mkdir(exist_ok=True)
    path = CACHE / f"camae_patches_{n_rows}.npy"
    meta_path = CACHE / f"camae_patches_{n_rows}.json"
    if path.is_file() and meta_path.is_file():
        return np.load(path, mmap_mode="r"), json.loads(meta_path.read_text())

    import torch

    from napari_maeprobe.models.registry import create_model

    torch.set_num_threads(os.cpu_count() or 1)
    model = create_model("ca-mae", random_init=True, input_size=WINDOW)
    grid = (WINDOW // 16) ** 2
    rng = np.random.default_rng(0)
    images = _images()
    chunks, sources, channels = [], [], []
    t0 = time.perf_counter()
    for index, (key, share) in enumerate(SOURCES):
        data, _ = images[key]
        n_windows = int(np.ceil(share * n_rows / (data.shape[0] * grid)))
        for start in range(0, n_windows, batch):
            x = torch.from_numpy(_windows(data, min(batch, n_windows - start), rng))
            with torch.inference_mode():
                pe = model(x).patch_embeddings  # (B, C, gy, gx, D)
            chunks.append(pe.reshape(-1, pe.shape[-1]).numpy().astype(np.float32))
            b, c = pe.shape[:2]
            sources.append(np.full(b * c * grid, index, dtype=np.int8))
            channels.append(np.tile(np.repeat(np.arange(c), grid), b).astype(np.int8))
        print(f"  {key}: {n_windows} windows, {time.perf_counter() - t0:.0f} s", flush=True)
    X = np.concatenate(chunks)
    src = np.concatenate(sources)
    ch = np.concatenate(channels)
    order = np.random.default_rng(1).permutation(len(X))[:n_rows]
    np.save(path, X[order])
    meta = {
        "seconds": time.perf_counter() - t0,
        "sources": [k for k, _ in SOURCES],
        "channel_names": {k: images[k][1] for k, _ in SOURCES},
    }
    np.save(CACHE / f"camae_patches_{n_rows}_source.npy", src[order])
    np.save(CACHE / f"camae_patches_{n_rows}_channel.npy", ch[order])
    meta_path.write_text(json.dumps(meta))
    return np.load(path, mmap_mode="r"), meta


# --------------------------------------------------------------------------- one UMAP run


def _worker(method: str, size: int) -> None:
    """Run one UMAP in this (child) process; write its coordinates and timing to the cache."""
    import resource

    import umap

    from napari_maeprobe.tl.analysis import umap_embed

    X = np.ascontiguousarray(real_embeddings()[0][:size])
    # numba compiles pynndescent and the layout optimiser on first use in every process
    # (~30 s here); warm up on 10k rows so that the timed run measures the work itself
    t0 = time.perf_counter()
    warm = X[:WARMUP_ROWS]
    if method == "ours":
        umap_embed(warm, max_fit=WARMUP_ROWS // 2)
    else:
        umap.UMAP().fit_transform(warm)
    warmup_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    if method == "ours":
        coords, info = umap_embed(X)
    else:
        coords, info = umap.UMAP().fit_transform(X), {"strategy": "full", "fit_rows": size}
    seconds = time.perf_counter() - t0
    np.save(CACHE / f"coords_{method}_{size}.npy", coords.astype(np.float32))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB
    result = {"seconds": seconds, "warmup_s": warmup_s, "peak_gib": peak, **info}
    (CACHE / f"result_{method}_{size}.json").write_text(json.dumps(result))


def _run_case(method: str, size: int, cap_s: float) -> dict:
    """One case in a subprocess with a time limit: its timing, or ``{"timeout": cap_s}``."""
    for stale in (CACHE / f"result_{method}_{size}.json", CACHE / f"coords_{method}_{size}.npy"):
        stale.unlink(missing_ok=True)
    import resource

    cmd = [sys.executable, str(Path(__file__).resolve()), "worker", method, str(size)]
    t0 = time.perf_counter()
    cpu0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    try:
        subprocess.run(cmd, check=True, timeout=cap_s)
        result = json.loads((CACHE / f"result_{method}_{size}.json").read_text())
    except subprocess.TimeoutExpired:
        result = {"timeout": cap_s}
    except subprocess.CalledProcessError as exc:  # e.g. killed for memory
        result = {"failed": f"exit status {exc.returncode}"}
    cpu1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    # CPU time the child got: on a shared machine it can be far below wall time x cores
    result["cpu_s"] = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
    result["wall_s"] = time.perf_counter() - t0
    result["load_1min"] = os.getloadavg()[0]
    return result


def run() -> tuple[str, dict]:
    from sklearn.manifold import trustworthiness

    sizes = [int(s) for s in os.environ.get("MAEPROBE_BENCH_SIZES", "").split(",") if s]
    sizes = sizes or list(SIZES)
    cap_min = float(os.environ.get("MAEPROBE_BENCH_CAP_MIN", CAP_MIN))
    X, meta = real_embeddings()
    results: dict = {"data_seconds": meta["seconds"], "cases": []}
    for size in sizes:
        subset = np.sort(np.random.default_rng(2).choice(size, TRUST_ROWS, replace=False))
        ref = np.asarray(X[subset])
        for method in ("ours", "plain"):
            print(f"[bench] {method} UMAP on {size} rows ...", file=sys.stderr, flush=True)
            res = _run_case(method, size, cap_min * 60)
            if "timeout" not in res and "failed" not in res:
                coords = np.load(CACHE / f"coords_{method}_{size}.npy")[subset]
                res["trust"] = float(trustworthiness(ref, coords, n_neighbors=TRUST_K))
            res.update(method=method, size=size)
            print(f"[bench] {res}", file=sys.stderr, flush=True)
            results["cases"].append(res)
    return _markdown(results, cap_min), results


def _markdown(results: dict, cap_min: float) -> str:
    lines = [
        "### Analysis: UMAP of 384-d patch embeddings, 100k and 1M rows",
        "",
        "Data: patch embeddings of `ca-mae` (ViT-S/16, 384-d; random weights, as the OpenPhenom "
        "weights cannot be downloaded here) on real images from `sample_data/`: random 128x128 "
        "windows, each flipped/rotated at random, of the Cell Painting field (60 % of the "
        "rows), ExampleHuman (20 %), the NEUBIAS cell/DNA/MTS/actin image (10 %) and z-slices "
        "of the 3D nuclei stack (10 %); one row per patch and channel. All 1M rows are real "
        f"model outputs (computed once in {results['data_seconds'] / 60:.0f} min, cached in "
        "`benchmarks/.cache/`); the 100k set is the first 100k of the shuffled 1M rows.",
        "",
        "**ours**: `analysis.umap_embed(X)` with its defaults: umap-learn fitted on 20k rows "
        "(uniform sample), the other rows placed with `transform` in 50k-row chunks, "
        "`random_state=0` (deterministic, single-threaded). **plain**: `umap.UMAP()"
        ".fit_transform(X)` on every row, umap-learn's defaults (unseeded, all cores). Each "
        f"run in its own process, plain umap-learn stopped after {cap_min:.0f} min. "
        f"Trustworthiness: `sklearn.manifold.trustworthiness` with {TRUST_K} neighbours on one "
        f"fixed {TRUST_ROWS // 1000}k-row subset (1 = every 2D neighbour is a true neighbour).",
        "",
        "| rows | method | rows fitted | time (s) | trustworthiness | peak memory (GiB) |",
        "| ---: | --- | ---: | ---: | ---: | ---: |",
    ]
    for c in results["cases"]:
        if "failed" in c:
            lines.append(f"| {c['size']:,} | {c['method']} | - | failed ({c['failed']}) | - | - |")
            continue
        if "timeout" in c:
            lines.append(
                f"| {c['size']:,} | {c['method']} | {c['size']:,} | not finished within "
                f"{c['timeout'] / 60:.0f} min ({c['cpu_s'] / 60:.0f} CPU-min) | - | - |"
            )
            continue
        lines.append(
            f"| {c['size']:,} | {c['method']} | {c['fit_rows']:,} | {c['seconds']:.0f} | "
            f"{c['trust']:.3f} | {c['peak_gib']:.1f} |"
        )
    by = {(c["size"], c["method"]): c for c in results["cases"]}
    notes = []
    for size in sorted({c["size"] for c in results["cases"]}):
        ours, plain = by.get((size, "ours")), by.get((size, "plain"))
        if not (ours and plain) or "trust" not in ours:
            continue
        if "trust" in plain:
            notes.append(
                f"{size:,} rows: ours {plain['seconds'] / ours['seconds']:.1f}x faster, "
                f"trustworthiness {ours['trust'] - plain['trust']:+.3f}"
            )
        elif "timeout" in plain:
            notes.append(
                f"{size:,} rows: ours in {ours['seconds'] / 60:.1f} min; plain umap-learn did "
                f"not finish within {plain['timeout'] / 60:.0f} min"
            )
    if notes:
        lines += ["", "; ".join(notes) + "."]
    warm = [c["warmup_s"] for c in results["cases"] if "warmup_s" in c]
    if warm:
        lines += [
            "",
            "Times exclude numba's compilation, which every fresh process pays once: each run "
            f"first does the same on {WARMUP_ROWS // 1000}k rows (warm-up {min(warm):.0f} to "
            f"{max(warm):.0f} s, compilation included).",
        ]
    return "\n".join(lines)


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "worker":
        _worker(sys.argv[2], int(sys.argv[3]))
    else:
        print(run()[0])
