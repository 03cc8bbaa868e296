"""The ``maeprobe`` command line (verbs and options as in docs/contract.md).

Bad input ends with one line on stderr and exit status 2; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from napari_maeprobe import __version__
from napari_maeprobe.errors import MaeprobeInputError
from napari_maeprobe.progress import Cancelled, TqdmProgress

EXAMPLES = {
    "segment": (
        "example:\n  maeprobe segment sample_data/cellprofiler_examplehuman_3ch --out out/seg"
    ),
    "demo": "example:\n  maeprobe demo --out out/demo",
    "models": "example:\n  maeprobe models",
    "embed": (
        "examples:\n"
        "  maeprobe embed sample_data/cellprofiler_examplehuman_3ch --out out/eh.zarr\n"
        "  maeprobe embed sample_data/alsf_cellpainting_6ch --model default --levels global,patch"
        " \\\n      --masking boundary --mask-ratio 0.75 --tau 0.5 --with-attention"
        " --out out/cp.zarr\n"
        "  maeprobe embed images/ --labels out/seg --scheduler tcp://10.0.0.5:8786"
        " --out out/big.zarr\n"
        "  maeprobe embed screen/images --metadata screen/fov_metadata.csv --out out/screen.zarr\n"
        "  maeprobe embed crops.npy --axes NCYX --cell-metadata cells.csv --out out/crops.zarr"
    ),
    "analyze": (
        "examples:\n  maeprobe analyze out/eh.zarr\n"
        "  maeprobe analyze out/eh.zarr --levels patch --foreground --central "
        "--balance-by channel --kmeans 8\n"
        "  maeprobe analyze out/screen.zarr --condition compound --batch plate --control DMSO"
    ),
    "evaluate": (
        "examples:\n  maeprobe evaluate out/eh.zarr --probe dataset\n"
        "  maeprobe evaluate out/cp.zarr --levels global --probe condition --json out/eval.json\n"
        "  maeprobe evaluate out/screen.zarr --levels global --probe compound --group-by plate"
    ),
    "report": (
        "examples:\n  maeprobe report out/eh.zarr\n"
        "  maeprobe report out/screen.zarr --condition compound --batch plate --out out/screen"
    ),
    "export": (
        "examples:\n  maeprobe export out/eh.zarr --format h5ad --out out/eh.h5ad\n"
        "  maeprobe export out/eh.zarr --format parquet --level patch --out out/eh_patch.parquet"
    ),
    "train": (
        "example:\n  maeprobe train --data sample_data --out out/my-model.safetensors --steps 500"
    ),
}


def _add_input_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--axes", help="axes of the input when they cannot be detected, e.g. ZCYX")
    p.add_argument(
        "--channel-names", help="comma-separated names, one per channel, in file order (each once)"
    )
    p.add_argument("--channels", help="comma-separated channel names to keep, in this order")
    p.add_argument(
        "--channel-pattern",
        help="regex with a group 'channel' that finds the channel in per-channel file names, "
        "e.g. '_(?P<channel>w\\d)' (folders are read with their sub-folders; an image is named "
        "by its path below the folder given, e.g. PLATE/r01c01f03p01)",
    )
    p.add_argument(
        "--z",
        default="keep",
        choices=["keep", "max", "slice"],
        help="z-stacks: keep 3D, maximum-intensity projection, or one slice (--z-index)",
    )
    p.add_argument("--z-index", type=int, help="the slice for --z slice (default: the middle)")


def _add_segment_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--method",
        default="auto",
        choices=["auto", "cellpose", "builtin"],
        help="auto: Cellpose when its weights are on this machine, else built-in",
    )
    p.add_argument("--nucleus-channel", help="channel name of the nucleus stain (default: guessed)")
    p.add_argument(
        "--cell-channel", help="channel name of a cell body/membrane stain (default: guessed)"
    )
    p.add_argument(
        "--diameter", type=float, help="nucleus (built-in) or cell (Cellpose) diameter, px"
    )
    p.add_argument("--cellpose-weights", help="local Cellpose weights file (offline use)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="maeprobe",
        description="Explore what masked-autoencoder models see in multichannel and 3D microscopy.",
    )
    parser.add_argument("--version", action="version", version=f"maeprobe {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = parser.add_subparsers(dest="verb", required=True)

    seg = sub.add_parser(
        "segment",
        help="segment cells and write label images and boundary maps",
        epilog=EXAMPLES["segment"],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    seg.add_argument("inputs", nargs="+", metavar="IMAGE", help="image files, OME-Zarr or folders")
    seg.add_argument("--out", required=True, type=Path, help="output folder")
    _add_input_options(seg)
    _add_segment_options(seg)

    demo = sub.add_parser(
        "demo",
        help="the main job on the bundled sample data",
        epilog=EXAMPLES["demo"],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    demo.add_argument("--out", type=Path, default=Path("out/demo"), help="output folder")
    demo.add_argument("--gui", action="store_true", help="open the results in napari afterwards")
    _add_segment_options(demo)

    train = sub.add_parser(
        "train",
        help="train an MAE (random + boundary-guided masking) on real images",
        epilog=EXAMPLES["train"],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    train.add_argument("--model", default="default", help="architecture to train (default)")
    train.add_argument(
        "--data",
        nargs="*",
        type=Path,
        default=[],
        help="folders of images to train on (segmented with the built-in method)",
    )
    train.add_argument("--training-set", type=Path, help="a training set .npz saved earlier")
    train.add_argument("--save-training-set", type=Path, help="write the collected set as .npz")
    train.add_argument("--out", type=Path, help="weights file (.safetensors)")
    train.add_argument("--steps", type=int, default=3000, help="0: only collect the training set")
    train.add_argument("--batch-size", type=int, default=64)
    train.add_argument("--lr", type=float, default=1e-3)
    train.add_argument("--mask-ratio", type=float, default=0.75)
    train.add_argument("--tau", type=float, default=0.5, help="boundary-guided masking temperature")
    train.add_argument(
        "--boundary-share",
        type=float,
        default=0.5,
        help="share of batches with boundary-guided (vs random) masking",
    )
    train.add_argument("--fft-weight", type=float, default=0.01)
    train.add_argument("--device", default="auto", help="auto, cpu, cuda or mps")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--workers", type=int, default=0, help="processes that cut training crops")

    from napari_maeprobe.embed import job  # light: the settings' defaults and choices

    JOB = job.EmbedJob()  # noqa: N806  (the defaults of every embed option)
    embed = sub.add_parser(
        "embed",
        help="embed cells (or tiles) with a model into an embedding store (.zarr)",
        epilog=EXAMPLES["embed"],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    embed.add_argument("inputs", nargs="+", metavar="INPUT", help="image files, OME-Zarr, folders")
    embed.add_argument("--out", required=True, type=Path, help="the store (.zarr folder)")
    embed.add_argument("--model", default=JOB.model, help="a name from `maeprobe models`")
    embed.add_argument("--weights", help="weights file or folder (default: the model's own)")
    embed.add_argument(
        "--levels", default=",".join(JOB.levels), help="comma-separated: global,channel,patch"
    )
    embed.add_argument("--masking", default=JOB.masking, choices=job.MASKING_CHOICES)
    embed.add_argument("--mask-ratio", type=float, default=JOB.mask_ratio)
    embed.add_argument("--tau", type=float, default=JOB.tau, help="boundary-guided temperature")
    embed.add_argument("--seed", type=int, default=JOB.seed, help="seed of the masks")
    embed.add_argument("--device", default=JOB.device, help="auto, cpu, cuda or mps")
    embed.add_argument("--precision", default=JOB.precision, choices=job.PRECISION_CHOICES)
    embed.add_argument("--batch-size", type=int, help="crops per batch (default: sized to memory)")
    embed.add_argument("--crop-size", type=int, help="crop side in pixels (default: the model's)")
    embed.add_argument("--normalization", default=JOB.normalization,
                       choices=job.NORMALIZATION_CHOICES)  # fmt: skip
    embed.add_argument(
        "--normalize-by", default=JOB.normalize_by, metavar="SCOPE",
        help="which images share normalisation statistics: image (each its own), dataset, or "
        "a metadata column such as plate (each plate's images together)",
    )  # fmt: skip
    embed.add_argument(
        "--normalize-reference", metavar="COLUMN=VALUE",
        help="take each group's statistics from these images only, e.g. compound=DMSO (the "
        "control wells), as screens are usually normalised",
    )  # fmt: skip
    embed.add_argument("--dtype", default=JOB.dtype, choices=job.STORE_DTYPES,
                       help="how embeddings are stored")  # fmt: skip
    embed.add_argument("--with-attention", action="store_true", help="store attention maps")
    embed.add_argument(
        "--with-reconstruction", action="store_true", help="store masked reconstructions"
    )
    embed.add_argument(
        "--segmentation", default=JOB.segmentation, choices=job.SEGMENTATION_CHOICES,
        help="how cells are found (none: tile the images instead of cropping cells)",
    )  # fmt: skip
    embed.add_argument(
        "--labels", type=Path, help="folder of <image>_labels.tif (from maeprobe segment)"
    )
    embed.add_argument("--diameter", type=float, help="nucleus/cell diameter for segmentation, px")
    embed.add_argument(
        "--exclude-border", action="store_true",
        help="leave out cells whose mask touches the image border (default: keep them; every "
        "row says touches_border and crop_padding)",
    )  # fmt: skip
    embed.add_argument(
        "--metadata", type=Path,
        help="per-image table (CSV, TSV or Parquet) joined on image name, file path or "
        "plate/well/site, whichever its columns allow",
    )  # fmt: skip
    embed.add_argument(
        "--cell-metadata", type=Path,
        help="per-cell table joined on image and cell id (label value), or on row order for a "
        "crop stack",
    )  # fmt: skip
    embed.add_argument(
        "--crop-fit", default="auto", choices=["auto", "pad", "resize"],
        help="crop stacks (--axes NCYX): zero-pad or resize crops to the model's input "
        "(auto: pad smaller, resize larger)",
    )  # fmt: skip
    embed.add_argument("--scheduler", help="dask.distributed scheduler address, or 'local'")
    embed.add_argument("--overwrite", action="store_true", help="replace a store of another job")
    _add_input_options(embed)

    analyze = sub.add_parser(
        "analyze",
        help="PCA, UMAP, Leiden/k-means and 'what drives these clusters', into the store",
        epilog=EXAMPLES["analyze"],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    analyze.add_argument("store", type=Path, metavar="STORE")
    analyze.add_argument("--levels", help="comma-separated levels (default: all in the store)")
    analyze.add_argument("--foreground", action="store_true", help="only foreground patches")
    analyze.add_argument("--central", action="store_true", help="only central patches")
    analyze.add_argument("--balance-by", help="equal rows per value of this column, e.g. channel")
    analyze.add_argument("--max-rows", type=int, help="analyse at most this many rows")
    analyze.add_argument("--n-pcs", type=int, default=50)
    analyze.add_argument("--n-neighbors", type=int, default=15)
    analyze.add_argument("--umap-max-fit", type=int, default=20_000,
                         help="UMAP fits on a sample this big and maps the rest")  # fmt: skip
    analyze.add_argument("--resolution", type=float, default=1.0, help="Leiden resolution")
    analyze.add_argument("--kmeans", type=int, help="also k-means with this k")
    analyze.add_argument("--seed", type=int, default=0)
    analyze.add_argument("--allow-incomplete", action="store_true",
                         help="analyse an interrupted store's finished cells")  # fmt: skip
    analyze.add_argument("--condition", help="treatment column (e.g. compound): each condition "
                         "vs the control, folds grouped by --batch; needs --batch")  # fmt: skip
    analyze.add_argument("--batch", help="batch column (e.g. plate, imaging date); needs "
                         "--condition")  # fmt: skip
    analyze.add_argument("--control", help="the control value of --condition (default: guessed "
                         "among DMSO, control, vehicle, untreated, mock, ...)")  # fmt: skip

    evaluate = sub.add_parser(
        "evaluate",
        help="linear probe, effective rank and attention IoU of a store",
        epilog=EXAMPLES["evaluate"],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    evaluate.add_argument("store", type=Path, metavar="STORE")
    evaluate.add_argument("--levels", help="comma-separated levels (default: all in the store)")
    evaluate.add_argument("--probe", action="append", default=[],
                          help="obs column a linear probe predicts (repeatable)")  # fmt: skip
    evaluate.add_argument("--json", type=Path, help="also write the results as JSON")
    evaluate.add_argument("--group-by", help="obs column whose values never share training and "
                          "test folds (e.g. plate, image)")  # fmt: skip
    evaluate.add_argument("--max-rows", type=int, default=50_000,
                          help="probe at most this many rows a level (uniform sample)")  # fmt: skip

    export = sub.add_parser(
        "export",
        help="export a store to .h5ad, Parquet or CSV",
        epilog=EXAMPLES["export"],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    export.add_argument("store", type=Path, metavar="STORE")
    export.add_argument("--format", required=True, choices=["h5ad", "parquet", "csv"])
    export.add_argument("--out", required=True, type=Path, help="the file to write")
    export.add_argument("--level", help="one level (default: all levels, stacked)")
    export.add_argument("--allow-incomplete", action="store_true",
                        help="export an interrupted store's finished cells")  # fmt: skip

    rep = sub.add_parser(
        "report",
        help="report.html for a store: facts, verdicts, batch versus biology, UMAPs",
        epilog=EXAMPLES["report"],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    rep.add_argument("store", type=Path, metavar="STORE")
    rep.add_argument("--out", type=Path, help="output folder (default: STORE_report beside it)")
    rep.add_argument("--condition", help="analyse first with this condition column (if needed)")
    rep.add_argument("--batch", help="... and this batch column, e.g. plate")
    rep.add_argument("--control", help="the control value of the condition column, e.g. DMSO")
    rep.add_argument("--allow-incomplete", action="store_true",
                     help="report on an interrupted store's finished cells")  # fmt: skip

    sub.add_parser(
        "models", help="list the models, their inputs, licences and weights",
        epilog=EXAMPLES["models"], formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    return parser


def _load_inputs(args) -> list:
    from napari_maeprobe.io.channels import select_channels
    from napari_maeprobe.io.reading import read_images
    from napari_maeprobe.pp.preprocessing import project_z

    """Read every input (files, folders, plate folder trees) into images, channels picked and
    z handled; refuses two inputs that give images of the same name (rows could not be told
    apart, nor joined to --metadata)."""
    from napari_maeprobe.errors import MaeprobeInputError

    names = [n.strip() for n in args.channel_names.split(",")] if args.channel_names else None
    images = []
    origin: dict[str, str] = {}
    for inp in args.inputs:
        for im in read_images(
            inp, axes=args.axes, channel_names=names, channel_pattern=args.channel_pattern
        ):
            if im.name in origin and origin[im.name] == str(inp):  # one input, two images
                raise MaeprobeInputError(
                    f"{inp} gives two images named {im.name!r}: its files were not grouped "
                    "into images by channel as they should be",
                    "say which part of the file names is the channel, e.g. --channel-pattern "
                    "'-(?P<channel>ch\\d+)'",
                )
            if im.name in origin:
                raise MaeprobeInputError(
                    f"two images are named {im.name!r} (from {origin[im.name]} and {inp})",
                    "pass the folder that holds both as one input: images are named by their "
                    "path below the folder given, so they get distinct names",
                )
            origin[im.name] = str(inp)
            if args.channels:
                im = select_channels(im, [c.strip() for c in args.channels.split(",")])
            images.append(project_z(im, args.z, args.z_index))
    return images


def cmd_segment(args) -> int:
    from napari_maeprobe.pp.segment_batch import (
        nucleus_choice_lines,
        require_images,
        say,
        segment_images,
        skip_line,
        write_segmentation_outputs,
    )

    images = _load_inputs(args)
    require_images(images)
    skipped: list[tuple[str, Exception]] = []
    segmented = segment_images(
        images,
        args.method,
        args.nucleus_channel,
        args.cell_channel,
        args.diameter,
        args.cellpose_weights,
        progress=args.progress,
        skipped=skipped,
    )
    if not segmented and len(images) == 1:
        raise skipped[0][1]  # a single image: its own error, as one line
    for name, why in skipped:  # one line per bad image; the others go on
        say(skip_line(name, why))
    if not segmented:
        raise MaeprobeInputError(
            f"none of the {len(images)} image(s) could be segmented (each is named above)",
            "check the images and the nucleus channel (--nucleus-channel)",
        )
    for line in nucleus_choice_lines(segmented):  # once per run, not once per image
        print(line)
    summary = write_segmentation_outputs(segmented, args.out)
    for s, (_, row) in zip(segmented, summary.iterrows()):
        print(
            f"{row['image']}: {row['n_cells']} cells ({row['method']}, nucleus channel "
            f"{row['nucleus_channel']}) -> {args.out / (row['image'] + '_labels.tif')}"
        )
        notes = [n for n in s.segmentation.notes if not n.startswith("nucleus channel '")]
        if notes:
            print(f"  note: {'; '.join(notes)}")
    if skipped:
        print(f"{len(skipped)} of {len(images)} image(s) skipped, {len(segmented)} segmented")
    return 0


def _load_embed_inputs(args) -> list:
    """The inputs of ``embed``: crop stacks where ``--axes`` has an N (read by
    :func:`napari_maeprobe.io.crops.read_crops`), images otherwise. A 4D or 5D ``.npy`` without
    ``--axes`` is refused: it may be a z-stack or a stack of crops, and the file cannot say."""
    import argparse as _argparse

    import numpy as np

    from napari_maeprobe.io.crops import read_crops

    names = args.channel_names.split(",") if args.channel_names else None
    crops = bool(args.axes) and "N" in args.axes.upper()
    if args.crop_fit != "auto" and not crops:
        raise MaeprobeInputError(
            f"--crop-fit {args.crop_fit} applies to crop stacks, but no --axes with N was given",
            "add --axes NCYX (or NCZYX) for a stack of single-cell crops, or drop --crop-fit",
        )
    out, rest = [], []
    for inp in args.inputs:
        path = Path(inp)
        if crops:
            stack = read_crops(path, axes=args.axes, channel_names=names)
            if args.channels:
                stack = stack.select_channels([c.strip() for c in args.channels.split(",")])
            out.append(stack.with_fit(args.crop_fit))
            continue
        if not args.axes and path.suffix.lower() == ".npy" and path.is_file():
            shape = np.load(path, mmap_mode="r", allow_pickle=False).shape
            if len(shape) in (4, 5):
                n = len(shape)
                raise MaeprobeInputError(
                    f"{path.name} is a {n}D array {shape} that records no axes: a z-stack or "
                    "a stack of single-cell crops",
                    "pass --axes NCZYX for 3D crops (one cell each)" if n == 5 else
                    "pass --axes NCYX for crops (one cell each), or --axes ZCYX for a z-stack",
                )
        rest.append(inp)
    if rest:
        out.extend(_load_inputs(_argparse.Namespace(**{**vars(args), "inputs": rest})))
    return out


def cmd_embed(args) -> int:
    from napari_maeprobe.embed.job import EmbedJob
    from napari_maeprobe.embed.labels import find_labels
    from napari_maeprobe.embed.metadata import join_cell_metadata, join_metadata
    from napari_maeprobe.embed.run_dask import close_clients
    from napari_maeprobe.embed.run_local import run_embedding
    from napari_maeprobe.pp.segment_batch import require_images

    images = _load_embed_inputs(args)
    require_images(images)
    if args.metadata:
        images, joined = join_metadata(images, args.metadata)
        print(joined.summary("metadata"))
    if args.cell_metadata:
        images, joined = join_cell_metadata(images, args.cell_metadata)
        print(joined.summary("cell metadata"))
    labels = find_labels(images, args.labels) if args.labels else None
    job = EmbedJob(
        model=args.model, weights=args.weights,
        channels=None,  # picked while reading (--channels)
        levels=tuple(v.strip() for v in args.levels.split(",") if v.strip()),
        segmentation="given" if labels else args.segmentation, diameter=args.diameter,
        crop_size=args.crop_size, normalization=args.normalization,
        normalize_by=args.normalize_by, normalize_reference=args.normalize_reference,
        projection="max" if args.z == "keep" else args.z,
        masking=args.masking, mask_ratio=args.mask_ratio, tau=args.tau, seed=args.seed,
        dtype=args.dtype, attention=args.with_attention,
        reconstruction=args.with_reconstruction, device=args.device,
        precision=args.precision, batch_size=args.batch_size,
        exclude_border=args.exclude_border,
    )  # fmt: skip
    try:
        result = run_embedding(images, args.out, job, labels, progress=args.progress,
                               scheduler=args.scheduler, overwrite=args.overwrite)  # fmt: skip
    finally:
        close_clients()
    if args.z == "slice" and args.z_index is not None:  # which plane, for the explorer's gallery
        from napari_maeprobe.embed.store import EmbeddingStore

        store = EmbeddingStore(args.out, mode="a")
        with store.lock("embed"):
            store.set_facts({**store.facts, "z_index": int(args.z_index)})
    f = result.facts
    rows = ", ".join(f"{lvl} {n}" for lvl, n in result.rows.items())
    print(
        f"{args.out}: {rows} rows ({f['model']}, {f['embed_dim']}-d, weights sha256 "
        f"{f['weights_sha256'][:12]}..., {f['device']} {f['precision']}); "
        f"{result.units_done} units embedded, {result.units_skipped} already done; "
        f"{result.seconds:.1f} s"
    )
    return 0


def _levels(value: str | None) -> list[str] | None:
    return [v.strip() for v in value.split(",") if v.strip()] if value else None


def cmd_analyze(args) -> int:
    from napari_maeprobe.embed.store import EmbeddingStore
    from napari_maeprobe.tl.analyze import AnalysisSettings, analyze_store

    store = EmbeddingStore(args.store, mode="a")
    settings = AnalysisSettings(
        foreground=args.foreground, central=args.central, balance_by=args.balance_by,
        max_rows=args.max_rows, n_pcs=args.n_pcs, n_neighbors=args.n_neighbors,
        umap_max_fit=args.umap_max_fit, resolution=args.resolution, kmeans=args.kmeans,
        seed=args.seed, condition=args.condition, batch=args.batch, control=args.control,
    )  # fmt: skip
    results = analyze_store(store, _levels(args.levels), settings, progress=args.progress,
                            allow_incomplete=args.allow_incomplete)  # fmt: skip
    for level, r in results.items():
        print(
            f"{level}: {r['analysed_rows']} of {r['rows']} rows; {r['n_leiden']} Leiden clusters; "
            f"UMAP {r['umap']['strategy']} ({r['umap']['fit_rows']} fitted); effective rank "
            f"{r['effective_rank']:.1f}; {r['seconds']:.1f} s\n  {r['verdict']}"
        )
        if "channel_content" in r:
            print(f"  {r['channel_content']['line']}")
        if "condition_batch" in r:
            print(f"  {r['condition_batch']['summary']}")
    return 0


def cmd_evaluate(args) -> int:
    from napari_maeprobe.embed.store import EmbeddingStore
    from napari_maeprobe.tl.evaluate import evaluate_store

    store = EmbeddingStore(args.store)
    if args.json:  # before the work (and its progress bars), not after
        from napari_maeprobe.io.files import check_output_path

        check_output_path(args.json)
    results = evaluate_store(store, _levels(args.levels), args.probe, max_rows=args.max_rows,
                             group_by=args.group_by, progress=args.progress)  # fmt: skip
    cells = results.pop("cells", {})
    for level, r in results.items():
        print(f"{level}: {r['rows']} rows, effective rank {r['effective_rank']:.1f} "
              f"of {r['embed_dim']} dimensions")  # fmt: skip
        for col, p in r.get("probes", {}).items():
            print(f"  linear probe of {col}: balanced accuracy {p['balanced_accuracy']:.3f} "
                  f"+/- {p['balanced_accuracy_std']:.3f} over {p['cv']} folds "
                  f"({p['grouping']}; chance {p['chance']:.3f}, {p['n_classes']} classes, "
                  f"{p['n_rows']} rows)")  # fmt: skip
            if p.get("dropped_classes"):
                print(f"    left out (each in a single {args.group_by}): "
                      f"{', '.join(p['dropped_classes'][:10])}")  # fmt: skip
        for col, why in r.get("skipped_probes", {}).items():
            print(f"  linear probe of {col}: skipped ({why})")
    if "attention_iou" in cells:
        a = cells["attention_iou"]
        print(f"cells: attention IoU with the cell masks: mean {a['mean']:.3f} "
              f"(top {a['top_fraction']:.0%} of patches, {a['cells']} cells)")  # fmt: skip
        results["cells"] = cells
    if args.json:
        from napari_maeprobe.io.files import write_json

        write_json(args.json, results)
        print(f"wrote {args.json}")
    return 0


def cmd_export(args) -> int:
    from napari_maeprobe.io.export import export_store

    path = export_store(args.store, args.format, args.out, args.level,
                        allow_incomplete=args.allow_incomplete)  # fmt: skip
    print(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB)")
    left_out = getattr(path, "left_out", lambda: None)()
    if left_out:
        print(left_out)
    return 0


def cmd_report(args) -> int:
    from napari_maeprobe.embed.store import EmbeddingStore
    from napari_maeprobe.pl.report import report_store
    from napari_maeprobe.tl.analyze import AnalysisSettings, analyze_store

    store = EmbeddingStore(args.store, mode="a")
    store.require_complete(args.allow_incomplete)
    analysed = store.analysed_levels()
    # a store never analysed is analysed whole; otherwise the levels left out stay out (the
    # page says how to add them), unless the comparison asks for the global level
    todo = [] if analysed else list(store.levels())
    asked = {"condition": args.condition, "batch": args.batch, "control": args.control}
    if (args.condition or args.batch) and "global" in store.levels():  # the comparison
        todo = list(dict.fromkeys(["global", *todo]))
    if todo:
        print(f"analysing the {', '.join(todo)} level(s) first")
        analyze_store(store, todo, AnalysisSettings(**asked), progress=args.progress,
                      allow_incomplete=args.allow_incomplete)  # fmt: skip
    store_path = Path(args.store)
    out = args.out or store_path.with_name(store_path.name.removesuffix(".zarr") + "_report")
    path = report_store(store, out, progress=None)
    print(f"wrote {path}")
    return 0


def cmd_demo(args) -> int:
    from napari_maeprobe.demo import run_demo

    start = time.perf_counter()
    result = run_demo(
        args.out,
        method=args.method,
        diameter=args.diameter,
        weights=args.cellpose_weights,
        progress=args.progress,
    )
    print(result.describe())
    print(f"done in {time.perf_counter() - start:.1f} s; outputs in {args.out}")
    if args.gui:
        from napari_maeprobe.demo import show_demo

        show_demo(result)
    return 0


def cmd_train(args) -> int:
    import json

    from napari_maeprobe.models.registry import create_model
    from napari_maeprobe.models.training import (
        CropSampler,
        collect_training_images,
        load_training_set,
        save_model,
        save_training_set,
        train_mae,
    )

    if args.model != "default":
        raise MaeprobeInputError(
            f"training {args.model!r} from the command line is not supported",
            "use --model default (other models: fine-tune from Python with training.train_mae)",
        )
    if args.training_set:
        images = load_training_set(args.training_set)
    elif args.data:
        images = collect_training_images(args.data, progress=args.progress)
    else:
        raise MaeprobeInputError("no training data", "pass --data FOLDER... or --training-set FILE")
    if args.save_training_set:
        save_training_set(images, args.save_training_set)
        print(f"training set: {len(images)} images -> {args.save_training_set}")
    if args.steps == 0:
        return 0
    if args.out is None:
        raise MaeprobeInputError("no output file for the weights", "pass --out FILE.safetensors")
    from napari_maeprobe.embed.engine import resolve_device

    device = resolve_device(args.device)
    model = create_model("default", random_init=True)
    cfg = model.config  # DefaultConfig: saved with the weights (maeprobe_config metadata)
    sampler = CropSampler(images, cfg.input_size, cfg.patch_size, 6, seed=args.seed)
    curve = train_mae(
        model,
        sampler,
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        mask_ratio=args.mask_ratio,
        boundary_share=args.boundary_share,
        tau=args.tau,
        fft_weight=args.fft_weight,
        device=device,
        seed=args.seed,
        workers=args.workers,
        progress=args.progress,
    )
    info = dict(
        command="maeprobe " + " ".join(sys.argv[1:]) if sys.argv else "",
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        images=[im.name for im in images],
        device=device,
        final_loss=curve[-1]["loss"],
        seconds=curve[-1]["seconds"],
    )
    save_model(model.cpu(), args.out, cfg, info)
    curve_path = args.out.with_suffix(".curve.csv")
    with open(curve_path, "w") as f:
        f.write(",".join(curve[0]) + "\n")
        for row in curve:
            f.write(",".join(str(v) for v in row.values()) + "\n")
    print(json.dumps({k: v for k, v in info.items() if k != "images"}))
    print(f"weights: {args.out}; curve: {curve_path}")
    return 0


def cmd_models(args) -> int:
    from napari_maeprobe.models.registry import list_models, weights_status

    rows = [("name", "channels", "input", "embed", "decoder", "weights here", "licence of weights")]
    for spec in list_models():
        here, where = weights_status(spec)
        rows.append(
            (
                spec.name,
                spec.channels,
                spec.input_size,
                str(spec.embed_dim),
                "yes" if spec.has_decoder else "no",
                f"{'yes' if here else 'no'}: {where}",
                spec.licence,
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r[:-1], widths)) + "  " + r[-1])
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handlers = {
        "segment": cmd_segment, "demo": cmd_demo, "train": cmd_train, "models": cmd_models,
        "embed": cmd_embed, "export": cmd_export, "analyze": cmd_analyze,
        "evaluate": cmd_evaluate, "report": cmd_report,
    }  # fmt: skip
    from napari_maeprobe.embed.engine import WorkerCrashedError

    args.progress = TqdmProgress()  # the command's job: tqdm bars, cancel token, events
    try:
        return handlers[args.verb](args)
    except (MaeprobeInputError, Cancelled, WorkerCrashedError) as exc:
        # one line; a worker crash says so in one sentence (--debug: the traceback, and for an
        # error inside the worker, the worker's traceback as its cause)
        args.progress.close()
        if args.debug:
            raise
        print(f"maeprobe {args.verb}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # file-system errors: one line naming the path and a fix
        from napari_maeprobe.io.files import describe_os_error

        error = describe_os_error(exc)
        args.progress.close()
        if error is None or args.debug:
            raise
        print(f"maeprobe {args.verb}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # the engine has stopped its worker; the worker exits quietly
        args.progress.cancel()
        args.progress.close()
        print(f"maeprobe {args.verb}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
