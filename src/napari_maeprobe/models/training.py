"""Training MAE models with the package's own loop: random or boundary-guided masking.

The training set is a list of real images, normalised and quantised to uint8 with their
boundary maps and cell centres (:func:`collect_training_images`, saved as one ``.npz`` so a
GPU machine without the image stack can train from it). A sampler cuts random windows (half
of them centred on cells) with a random subset and order of channels, so a channel-agnostic
model sees 1 to ``max_channels`` channels.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from napari_maeprobe.pp.masking import make_mask
from napari_maeprobe.progress import ProgressCallback, report


@dataclass
class TrainingImage:
    """One normalised image (C, Y, X) uint8 with its boundary map and cell centres."""

    name: str
    data: np.ndarray
    boundary: np.ndarray | None
    centres: np.ndarray  # (N, 2) y, x


def collect_training_images(
    roots: list[Path], max_side: int = 1100, progress: ProgressCallback | None = None
) -> list[TrainingImage]:
    """Open every image under ``roots`` (z-stacks max-projected), normalise, segment (built-in)
    for boundary maps and cell centres, and downsample images larger than ``max_side``."""
    from scipy import ndimage

    from napari_maeprobe.errors import MaeprobeInputError
    from napari_maeprobe.io.reading import IMAGE_EXTS, read_images
    from napari_maeprobe.pp.boundaries import boundary_map
    from napari_maeprobe.pp.preprocessing import normalize, project_z
    from napari_maeprobe.pp.segmentation import segment

    folders = []
    for root in roots:
        for d in sorted(
            {p.parent for p in Path(root).rglob("*") if p.suffix.lower() in IMAGE_EXTS}
        ):
            if not any(w in d.name.lower() for w in ("mask", "outline")):
                folders.append(d)
    out: list[TrainingImage] = []
    seen: set[str] = set()
    for i, folder in enumerate(folders):
        report(progress, i, len(folders), "collecting training images")
        try:
            images = read_images(folder)
        except MaeprobeInputError:
            continue
        for im in images:
            key = f"{im.dataset}/{im.name}"
            if key in seen or any(w in im.name.lower() for w in ("label", "mask")):
                continue
            seen.add(key)
            im = project_z(im, "max")
            arr = im.to_numpy()
            if min(arr.shape[1:]) < 24:
                continue
            factor = int(math.ceil(max(arr.shape[1:]) / max_side))
            try:
                seg = segment(im, "builtin")
                labels = seg.labels
            except MaeprobeInputError:
                labels = None
            norm = normalize(arr, nan_policy="zero")
            if factor > 1:
                norm = norm[:, ::factor, ::factor]
                labels = labels[::factor, ::factor] if labels is not None else None
            ids = np.unique(labels[labels > 0]) if labels is not None else np.array([])
            centres = (
                np.asarray(ndimage.center_of_mass(labels > 0, labels, ids)).reshape(-1, 2)
                if ids.size
                else np.zeros((0, 2))
            )
            out.append(
                TrainingImage(
                    name=key,
                    data=np.round(norm * 255).astype(np.uint8),
                    boundary=boundary_map(labels) if labels is not None else None,
                    centres=centres,
                )
            )
    report(progress, len(folders), len(folders), "collecting training images")
    return out


def save_training_set(images: list[TrainingImage], path: Path) -> None:
    """Store a training set in one compressed ``.npz``."""
    arrays = {}
    for i, im in enumerate(images):
        arrays[f"data_{i}"] = im.data
        arrays[f"centres_{i}"] = im.centres
        if im.boundary is not None:
            arrays[f"boundary_{i}"] = np.packbits(im.boundary, axis=-1)
            arrays[f"bshape_{i}"] = np.asarray(im.boundary.shape)
    arrays["names"] = np.asarray([im.name for im in images])
    np.savez_compressed(path, **arrays)


def load_training_set(path: Path) -> list[TrainingImage]:
    """Read a training set written by :func:`save_training_set`."""
    from napari_maeprobe.errors import MaeprobeInputError

    if not Path(path).is_file():
        raise MaeprobeInputError(
            f"training set {path} does not exist",
            "write one with --save-training-set, or pass --data FOLDER",
        )
    images = []
    with np.load(path, allow_pickle=False) as z:
        for i, name in enumerate(z["names"]):
            b = None
            if f"boundary_{i}" in z:
                shape = tuple(z[f"bshape_{i}"])
                b = np.unpackbits(z[f"boundary_{i}"], axis=-1)[..., : shape[-1]].astype(bool)
            images.append(TrainingImage(str(name), z[f"data_{i}"], b, z[f"centres_{i}"]))
    return images


class CropSampler:
    """Random training windows: size ``size``, a random subset (1..``max_channels``) and order
    of channels, half centred on cells, random flips and 90-degree rotations."""

    def __init__(
        self, images: list[TrainingImage], size: int, patch: int, max_channels: int, seed: int = 0
    ) -> None:
        if not images:
            from napari_maeprobe.errors import MaeprobeInputError

            raise MaeprobeInputError(
                "no usable training images were found",
                "pass folders that contain microscopy images (--data)",
            )
        self.images = images
        self.size = size
        self.patch = patch
        self.max_channels = max_channels
        self.rng = np.random.default_rng(seed)
        areas = np.array([im.data.shape[1] * im.data.shape[2] for im in images], dtype=float)
        self.weights = np.sqrt(areas) / np.sqrt(areas).sum()

    def sample(self, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, C, S, S) float crops in [0, 1] and (B, g, g) boundary fractions."""
        idx = self.rng.choice(len(self.images), p=self.weights)
        im = self.images[idx]
        n_c = int(self.rng.integers(1, min(im.data.shape[0], self.max_channels) + 1))
        s, g = self.size, self.size // self.patch
        crops = np.zeros((batch, n_c, s, s), np.float32)
        bfrac = np.zeros((batch, g, g), np.float32)
        _, h, w = im.data.shape
        for b in range(batch):
            chans = self.rng.permutation(im.data.shape[0])[:n_c]
            if len(im.centres) and self.rng.random() < 0.5:
                cy, cx = im.centres[self.rng.integers(len(im.centres))]
                y0, x0 = int(cy) - s // 2, int(cx) - s // 2
            else:
                y0 = int(self.rng.integers(-s // 4, max(h - 3 * s // 4, -s // 4 + 1)))
                x0 = int(self.rng.integers(-s // 4, max(w - 3 * s // 4, -s // 4 + 1)))
            ys, xs = slice(max(y0, 0), min(y0 + s, h)), slice(max(x0, 0), min(x0 + s, w))
            dy, dx = ys.start - y0, xs.start - x0
            win = np.zeros((n_c, s, s), np.float32)
            win[:, dy : dy + ys.stop - ys.start, dx : dx + xs.stop - xs.start] = im.data[
                chans, ys, xs
            ]
            bw = np.zeros((s, s), np.float32)
            if im.boundary is not None:
                bw[dy : dy + ys.stop - ys.start, dx : dx + xs.stop - xs.start] = im.boundary[ys, xs]
            k, flip = int(self.rng.integers(4)), bool(self.rng.integers(2))
            win, bw = np.rot90(win, k, axes=(1, 2)), np.rot90(bw, k)
            if flip:
                win, bw = win[:, :, ::-1], bw[:, ::-1]
            crops[b] = win / 255.0
            bfrac[b] = bw.reshape(g, self.patch, g, self.patch).mean(axis=(1, 3))
        return torch.from_numpy(crops), torch.from_numpy(bfrac)


class _Batches(torch.utils.data.IterableDataset):
    """Endless batches from a :class:`CropSampler`, one differently seeded sampler per worker."""

    def __init__(self, sampler: CropSampler, batch: int, seed: int) -> None:
        self.sampler, self.batch, self.seed = sampler, batch, seed

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        s = self.sampler
        if info is not None:
            s = CropSampler(
                s.images, s.size, s.patch, s.max_channels, self.seed + 7919 * (info.id + 1)
            )
        while True:
            yield s.sample(self.batch)


def train_mae(
    model,
    sampler: CropSampler,
    steps: int = 2000,
    batch_size: int = 64,
    lr: float = 1e-3,
    weight_decay: float = 0.05,
    warmup: int = 100,
    mask_ratio: float = 0.75,
    boundary_share: float = 0.5,
    tau: float = 0.5,
    fft_weight: float = 0.01,
    device: str = "cpu",
    seed: int = 0,
    workers: int = 0,
    progress: ProgressCallback | None = None,
) -> list[dict]:
    """Train an MAE with AdamW, linear warm-up and cosine decay. ``boundary_share`` of the
    batches use boundary-guided masking (softmax(boundary / tau)), the rest random masking.
    Batches are cut by ``workers`` background processes (0: in this process).
    Returns the training curve (one row per step)."""
    torch.manual_seed(seed)
    model.to(device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=weight_decay)
    rng = np.random.default_rng(seed)
    curve = []
    start = time.perf_counter()
    use_amp = device.startswith("cuda")
    batches = iter(
        torch.utils.data.DataLoader(
            _Batches(sampler, batch_size, seed),
            batch_size=None,
            num_workers=workers,
            pin_memory=use_amp,
        )
    )
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = (
                lr * min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * step / steps))
            )
        x, bfrac = next(batches)
        grid = model.token_grid(tuple(x.shape[1:]))
        kind = "boundary" if rng.random() < boundary_share else "random"
        mask = make_mask(
            kind,
            grid,
            x.shape[0],
            mask_ratio,
            tau,
            bfrac if kind == "boundary" else None,
            seed=seed * 1_000_003 + step,
        )
        with torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=use_amp):
            loss, parts = model.loss(x.to(device), mask.to(device), fft_weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        curve.append(
            dict(
                step=step + 1,
                loss=float(loss.detach()),
                mse=parts["mse"],
                fft=parts["fft"],
                masking=kind,
                lr=opt.param_groups[0]["lr"],
                seconds=round(time.perf_counter() - start, 2),
            )
        )
        report(progress, step + 1, steps, "training")
    model.eval()
    return curve


def save_model(model, path: Path, config, info: dict) -> None:
    """Save weights as float16 safetensors with the architecture (``config``: the model's
    config dataclass, e.g. ``model.config``, or its dict) and provenance as metadata."""
    from safetensors.torch import save_file

    from napari_maeprobe.models.registry import config_to_dict

    state = {
        k: v.detach().to("cpu", torch.float16).contiguous() for k, v in model.state_dict().items()
    }
    if not isinstance(config, dict):
        config = config_to_dict(config)
    meta = {"maeprobe_config": json.dumps(config), "maeprobe_info": json.dumps(info)}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file(state, str(tmp), metadata=meta)
    tmp.replace(path)
