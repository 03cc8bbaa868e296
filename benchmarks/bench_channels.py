"""Benchmark: the bundled ``default`` model's time and memory per crop against channel count.

The model is channel-agnostic: a crop of C channels becomes C x 64 patch tokens (96 px crops,
12 px patches) plus a CLS token, so the token projections and MLPs grow linearly with C and
attention (tokens x tokens) quadratically. This measures where that shows: real 96 x 96
windows of the 6-channel Cell Painting field, their channels repeated to C = 1, 6, 11, 21, 41,
embedded in float32 with ``torch.no_grad`` (batches of 8; time: the best of 5 batches after a
warm-up, as other processes share the machine), each C in a fresh process. Memory is the
median peak resident-set growth during the forward pass (sampled every millisecond from /proc,
with glibc giving large blocks back on free: ``MALLOC_MMAP_THRESHOLD_``) per crop; with
attention maps the last block also materialises its (heads x tokens x tokens) probabilities.

Run: ``.venv/bin/python benchmarks/bench_channels.py`` (writes its section of
docs/benchmarks.md); ``--device cuda`` measures on a GPU (peak ``torch.cuda`` memory).
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

CHANNELS = (1, 6, 11, 21, 41)
COMMAND = ".venv/bin/python benchmarks/bench_channels.py"
BATCH = 8
REPEATS = 5


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def _peak_during(fn) -> tuple[float, int]:
    """Seconds fn takes and the peak RSS growth (bytes) while it runs."""
    base, peak, stop = _rss(), [0], threading.Event()

    def watch():
        while not stop.is_set():
            peak[0] = max(peak[0], _rss() - base)
            time.sleep(0.001)

    t = threading.Thread(target=watch, daemon=True)
    t.start()
    t0 = time.perf_counter()
    fn()
    dt = time.perf_counter() - t0
    stop.set()
    t.join()
    return dt, max(peak[0], _rss() - base)


def measure_one(c: int, device: str = "cpu") -> dict:
    """Time and peak memory per crop for ``c`` channels (run in a fresh process)."""
    import numpy as np
    import torch

    from napari_maeprobe.io.samples import load_sample
    from napari_maeprobe.models.registry import create_model
    from napari_maeprobe.pp.preprocessing import normalize

    torch.manual_seed(0)
    im, _ = load_sample("cellpainting")
    field = normalize(im.data[:, 300:684, 300:492].compute())  # 6 x 384 x 192
    windows = [field[:, y : y + 96, x : x + 96] for y in range(0, 384, 96) for x in (0, 96)]
    x = torch.from_numpy(np.stack(windows))[:, [i % 6 for i in range(c)]].contiguous()
    x = x.to(device)
    model = create_model("default").eval().to(device)
    out = {"channels": c, "tokens": c * 64 + 1}
    for attention in (False, True):

        def step(attention=attention):
            with torch.no_grad():
                model(x, attention=attention)
            if device != "cpu":
                torch.cuda.synchronize()

        step()  # warm-up
        times, peaks = [], []
        for _ in range(REPEATS):
            if device != "cpu":
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
                t0 = time.perf_counter()
                step()
                times.append(time.perf_counter() - t0)
                peaks.append(torch.cuda.max_memory_allocated() - base)
            else:
                dt, peak = _peak_during(step)
                times.append(dt)
                peaks.append(peak)
        key = "att" if attention else "emb"
        out[f"{key}_ms"] = float(np.min(times)) / BATCH * 1e3
        out[f"{key}_mb"] = float(np.median(peaks)) / BATCH / 2**20
    return out


def run(device: str = "cpu") -> tuple[str, list[dict]]:
    """Every channel count in its own process; the markdown section and the raw rows."""
    import os

    # large blocks mmap-ed and given back on free, so the resident set follows live tensors
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    rows = []
    for c in CHANNELS:
        res = subprocess.run(
            [sys.executable, __file__, "--one", str(c), "--device", device],
            capture_output=True, text=True, check=True, env=env,
        )  # fmt: skip
        rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
    base = rows[0]
    lines = [
        f"### Channels: the default model's time and memory per crop ({device.upper()})",
        "",
        "Real 96 x 96 Cell Painting windows with their 6 channels repeated to C channels, "
        f"float32, batches of {BATCH}, time: best of {REPEATS} batches, memory: median, each C "
        "in a fresh process "
        "(`benchmarks/bench_channels.py`). Memory: peak growth during the forward pass per crop "
        "(" + ("resident set, sampled every ms" if device == "cpu" else "torch.cuda peak") + "). "
        "'per channel' is the figure divided by C; 'x linear' compares it with C times the "
        "1-channel figure. 'attention FLOPs' is computed, not measured: per block the "
        "projections and MLP cost 24 T D^2 and attention 4 T^2 D (T tokens, D = 144), so "
        "attention is T / (T + 6 D) of the work and outweighs the rest past 864 tokens (13 "
        "channels). Command: `.venv/bin/python benchmarks/bench_channels.py`.",
        "",
        "| channels | tokens | attention FLOPs | ms / crop | ms / crop / channel | x linear | "
        "MB / crop | MB / crop / channel | with attention maps: ms / crop | MB / crop |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        c, t = r["channels"], r["tokens"]
        lines.append(
            f"| {c} | {t} | {100 * t / (t + 6 * 144):.0f}% | {r['emb_ms']:.2f} | "
            f"{r['emb_ms'] / c:.2f} | {r['emb_ms'] / (c * base['emb_ms']):.2f} | "
            f"{r['emb_mb']:.2f} | {r['emb_mb'] / c:.2f} | {r['att_ms']:.2f} | "
            f"{r['att_mb']:.2f} |"
        )
    return "\n".join(lines), rows


def main(argv: list[str]) -> None:
    device = argv[argv.index("--device") + 1] if "--device" in argv else "cpu"
    if "--one" in argv:
        print(json.dumps(measure_one(int(argv[argv.index("--one") + 1]), device)))
        return
    body, rows = run(device)
    print(body)
    if "--no-write" not in argv:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from run import write_section

        key = f"channels-{device}"
        write_section(key, body)
        doc = Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"
        text = doc.read_text()  # the stamp names this script, not scripts/bench.sh
        start, end = text.index(f"<!-- bench:{key} -->"), text.index(f"<!-- /bench:{key} -->")
        own = text[start:end].replace("`bash scripts/bench.sh`", "`" + COMMAND + "`")
        doc.write_text(text[:start] + own + text[end:])
        print("\nwritten to docs/benchmarks.md")


if __name__ == "__main__":
    main(sys.argv[1:])
