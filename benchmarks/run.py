"""Run every benchmark and write its section of docs/benchmarks.md (with machine and date)."""

from __future__ import annotations

import datetime as dt
import os
import platform
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "benchmarks.md"
sys.path.insert(0, str(Path(__file__).resolve().parent))

BENCHMARKS = {
    "preprocessing": "bench_preprocessing",
    "inference": "bench_inference",
    "analysis": "bench_analysis",
    "store": "bench_store",
    "gui": "bench_gui",
    "truth": "bench_truth",
    "linked": "bench_gui_linked",
}


def machine() -> str:
    cpu = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import numpy

    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return (
        f"{cpu}, {os.cpu_count()} cores, {mem:.0f} GiB RAM, {platform.system()} "
        f"{platform.release()}, Python {platform.python_version()}, NumPy {numpy.__version__}"
    )


def write_section(key: str, body: str) -> None:
    start, end = f"<!-- bench:{key} -->", f"<!-- /bench:{key} -->"
    stamp = f"_Measured {dt.date.today().isoformat()} on {machine()} with `bash scripts/bench.sh`._"
    block = f"{start}\n{body}\n\n{stamp}\n{end}"
    text = DOC.read_text() if DOC.exists() else "# Benchmarks\n"
    if start in text:
        text = re.sub(re.escape(start) + r".*?" + re.escape(end), lambda _: block, text, flags=re.S)
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    DOC.write_text(text)


def main(argv: list[str]) -> None:
    keys = argv or list(BENCHMARKS)
    for key in keys:
        module = __import__(BENCHMARKS[key])
        body, _ = module.run()
        print(body)
        write_section(key, body)
    print(f"\nwritten to {DOC}")


if __name__ == "__main__":
    main(sys.argv[1:])
