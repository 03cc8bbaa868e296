"""Draw the default model's training curve (docs/figures/default-training-curve.png).

Run: .venv/bin/python docs/figures/plot_training_curve.py [CURVE.csv [BATCH]]
"""

from __future__ import annotations

import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

HERE = Path(__file__).parent


def main(curve: Path = HERE / "default-training-curve.csv", batch: int = 48) -> Path:
    c = pd.read_csv(curve)
    fig, ax = plt.subplots(figsize=(7, 3.6), dpi=120)
    for kind, colour in (("random", "tab:blue"), ("boundary", "tab:orange")):
        part = c[c.masking == kind]
        ax.plot(part.step, part.mse, ".", ms=2, alpha=0.25, color=colour)
        ax.plot(part.step, part.mse.rolling(50, min_periods=5).mean(), color=colour,
                label=f"{kind} masking (50-step mean)")
    ax.axhline(1.0, color="grey", lw=0.8, ls="--", label="predicting the mean")
    ax.set_xlabel(f"step (batch of {batch} crops, 96 x 96, 1-6 channels)")
    ax.set_ylabel("masked-patch MSE (standardised)")
    ax.set_ylim(0, 2)
    ax.legend(frameon=False, fontsize=8)
    ax.set_title("maeprobe default model: training on the bundled and shared real images", fontsize=9)
    fig.tight_layout()
    out = curve.with_suffix(".png")
    fig.savefig(out)
    return out


if __name__ == "__main__":
    args = sys.argv[1:]
    print(main(Path(args[0]), int(args[1])) if len(args) > 1 else main(*map(Path, args)))
