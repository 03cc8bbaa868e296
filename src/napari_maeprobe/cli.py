"""The ``maeprobe`` command line (verbs and options as in docs/contract.md).

Bad input ends with one line on stderr and exit status 2; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from . import __version__
from .errors import MaeprobeInputError
from .progress import Cancelled, TqdmProgress

EXAMPLES = {
    "segment": (
        "example:\n  maeprobe segment sample_data/cellprofiler_examplehuman_3ch --out out/seg"
    ),
    "demo": "example:\n  maeprobe demo --out out/demo",
}


def _add_input_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--axes", help="axes of the input when they cannot be detected, e.g. ZCYX")
    p.add_argument("--channel-names", help="comma-separated names, one per channel, in file order")
    p.add_argument("--channels", help="comma-separated channel names to keep, in this order")
    p.add_argument(
        "--channel-pattern",
        help="regex with a group 'channel' that finds the channel in per-channel file names",
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
    return parser


def _load_inputs(args) -> list:
    from .channels import select_channels
    from .preprocessing import project_z
    from .reading import read_images

    names = args.channel_names.split(",") if args.channel_names else None
    images = []
    for inp in args.inputs:
        for im in read_images(
            inp, axes=args.axes, channel_names=names, channel_pattern=args.channel_pattern
        ):
            if args.channels:
                im = select_channels(im, [c.strip() for c in args.channels.split(",")])
            images.append(project_z(im, args.z, args.z_index))
    return images


def cmd_segment(args) -> int:
    from .workflows import require_images, segment_images, write_segmentation_outputs

    images = _load_inputs(args)
    require_images(images)
    segmented = segment_images(
        images,
        args.method,
        args.nucleus_channel,
        args.cell_channel,
        args.diameter,
        args.cellpose_weights,
        progress=args.progress,
    )
    summary = write_segmentation_outputs(segmented, args.out)
    for _, row in summary.iterrows():
        print(
            f"{row['image']}: {row['n_cells']} cells ({row['method']}, nucleus channel "
            f"{row['nucleus_channel']}) -> {args.out / (row['image'] + '_labels.tif')}"
        )
        if row["notes"]:
            print(f"  note: {row['notes']}")
    return 0


def cmd_demo(args) -> int:
    from .demo import run_demo

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
        from .demo import show_demo

        show_demo(result)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handlers = {"segment": cmd_segment, "demo": cmd_demo}
    args.progress = TqdmProgress()
    try:
        return handlers[args.verb](args)
    except (MaeprobeInputError, Cancelled) as exc:
        args.progress.close()
        if args.debug:
            raise
        print(f"maeprobe {args.verb}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        args.progress.close()
        print(f"maeprobe {args.verb}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
