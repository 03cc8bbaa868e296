"""Benchmark: inference throughput on this machine, ours against a plain Hugging Face loop.

Models (random weights, as real weights cannot be downloaded here): ``vit-mae`` ViT-B/16 at
224x224 with 3 channels, ``ca-mae`` ViT-S/16 with 6 channels at 256x256, and the bundled
``default`` model with 6 channels at 96x96. Each runs through our inference engine in float32
and bfloat16, next to a straightforward transformers loop (``ViTMAEModel``, ``mask_ratio=0``,
float32, ``torch.no_grad``). Images/s are also given as a share of this machine's
matrix-product ceiling (a 2048x2048 matmul) measured in the same run, from the models' FLOPs.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from napari_maeprobe.embed.engine import EngineConfig, InferenceEngine


def matmul_ceiling(dtype: torch.dtype, n: int = 2048, repeats: int = 10) -> float:
    """Best GFLOP/s of an n x n matrix product in ``dtype``."""
    a = torch.randn(n, n).to(dtype)
    b = torch.randn(n, n).to(dtype)
    a @ b
    best = 0.0
    for _ in range(repeats):
        t = time.perf_counter()
        a @ b
        best = max(best, 2 * n**3 / (time.perf_counter() - t) / 1e9)
    return best


def vit_gflop(
    tokens: int, dim: int, depth: int, patch_pixels: int, mlp_ratio: float = 4.0
) -> float:
    """Forward FLOPs of a ViT encoder per image: projections, attention and MLP per block."""
    per_block = 2 * tokens * dim * dim * (4 + 2 * mlp_ratio) + 4 * tokens * tokens * dim
    embed = 2 * (tokens - 1) * patch_pixels * dim
    return (depth * per_block + embed) / 1e9


def images_per_second(fn, batch: int, seconds: float = 20.0, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        fn()
        n += batch
    return n / (time.perf_counter() - t0)


def hf_stepper(batch: int):
    """What a user would write with transformers: ViTMAEModel, mask_ratio 0, float32."""
    from transformers import ViTMAEConfig, ViTMAEModel

    model = ViTMAEModel(ViTMAEConfig(mask_ratio=0.0)).eval()
    x = torch.rand(batch, 3, 224, 224)

    def step():
        with torch.no_grad():
            model(pixel_values=x).last_hidden_state[:, 1:].mean(1)

    return step, batch, batch


def engine_stepper(
    model: str,
    shape: tuple,
    precision: str,
    options: dict | None = None,
    random_init: bool = True,
    compile: bool = False,
):
    """A step that embeds a few batches through the engine at its own batch size."""
    cfg = EngineConfig(
        compile=compile,
        model=model,
        random_init=random_init,
        precision=precision,
        levels=("global", "channel", "patch"),
        model_options=options or {},
    )
    eng = InferenceEngine(cfg, in_process=True)
    batch = eng.batch_size_for(shape)
    n = batch * max(1, 32 // batch)  # a few batches per call, as a stream of crops would be
    x = np.random.default_rng(0).random((n, *shape), dtype=np.float32)

    def step():
        for _ in eng.embed(x):
            pass

    step()  # warm-up (and compilation)
    return step, n, batch


def interleaved(steppers: list, seconds: float, rounds: int) -> list[float]:
    """Median images/s of each stepper over ``rounds`` interleaved runs (this VM is noisy)."""
    rates: list[list[float]] = [[] for _ in steppers]
    for _ in range(rounds):
        for i, (step, n, _) in enumerate(steppers):
            rates[i].append(images_per_second(step, n, seconds, warmup=0))
    return [float(np.median(r)) for r in rates]


def run(seconds: float = 8.0, rounds: int = 3) -> tuple[str, list]:
    torch.manual_seed(0)
    ceil32 = matmul_ceiling(torch.float32)
    ceil16 = matmul_ceiling(torch.bfloat16)
    from napari_maeprobe.models.builtin import DEFAULT_CONFIG, DEFAULT_WEIGHTS

    d = DEFAULT_CONFIG
    cases = [
        (
            "vit-mae ViT-B/16, 3 x 224 x 224",
            "vit-mae",
            (3, 224, 224),
            {},
            vit_gflop(197, 768, 12, 16 * 16 * 3),
            True,
        ),
        (
            "ca-mae ViT-S/16, 6 x 256 x 256",
            "ca-mae",
            (6, 256, 256),
            {},
            vit_gflop(1 + 6 * 256, 384, 12, 16 * 16),
            True,
        ),
        (
            f"default, 6 x {d.input_size} x {d.input_size}",
            "default",
            (6, d.input_size, d.input_size),
            {},
            vit_gflop(
                1 + 6 * (d.input_size // d.patch_size) ** 2,
                d.embed_dim,
                d.depth,
                d.patch_size ** 2,
            ),
            not DEFAULT_WEIGHTS.is_file(),
        ),
    ]
    labels, steppers, gflops = [], [], []
    for b in (16, 64):
        labels.append(("transformers ViTMAEModel loop (fp32), ViT-B/16 3 x 224", "fp32"))
        steppers.append(hf_stepper(b))
        gflops.append(vit_gflop(197, 768, 12, 768))
    for title, name, shape, opts, gflop, rand in cases:
        for prec, comp in (("fp32", False), ("bf16", False), ("bf16", True)):
            labels.append((f"maeprobe {title}" + (", torch.compile" if comp else ""), prec))
            steppers.append(engine_stepper(name, shape, prec, opts, rand, comp))
            gflops.append(gflop)
    rates = interleaved(steppers, seconds, rounds)
    hf_rate, hf_index = max((rates[i], i) for i in (0, 1))  # the loop at its better batch
    hf = hf_rate
    rows = []
    for i, ((title, prec), (_, _, batch), gflop) in enumerate(zip(labels, steppers, gflops)):
        if i < 2 and i != hf_index:
            continue
        rows.append((title, prec, rates[i], gflop, batch))
    lines = [
        "### Inference throughput (CPU)",
        "",
        f"Matrix-product ceiling measured in this run: **{ceil32:.0f} GFLOP/s float32, "
        f"{ceil16:.0f} GFLOP/s bfloat16** (2048 x 2048). Random weights; each row is the median "
        f"of {rounds} interleaved runs of {seconds:.0f} s after a warm-up (this VM's speed "
        "drifts by 10-20% between runs); the transformers loop at the better of batch 16 and "
        "64; our rows go through `InferenceEngine` (in-process) at its own batch size, "
        "returning global, per-channel and per-patch embeddings. `torch.compile` rows compile "
        "once (about 30 s, not counted) with frozen weights.",
        "",
        "| model | precision | batch | images/s | GFLOP/image | share of ceiling "
        "| vs transformers loop |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for title, prec, rate, gflop, batch in rows:
        ceil = ceil16 if prec == "bf16" else ceil32
        vs = f"{rate / hf:.2f}x" if "ViT-B/16" in title else ""
        lines.append(
            f"| {title} | {prec} | {batch} | {rate:.2f} | {gflop:.1f} | "
            f"{100 * rate * gflop / ceil:.0f}% | {vs} |"
        )
    return "\n".join(lines), rows


if __name__ == "__main__":
    print(run()[0])
