"""`cunet-optimize data`: prepare landmark data sets (the synthetic faces and poses)."""

from __future__ import annotations

from pathlib import Path

from cunet_optimize.commands.common import positive_int, unit_float
from cunet_optimize.commands.common import print_json


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("data", help="prepare landmark data sets (synthetic faces or poses)")
    sub = p.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    s = sub.add_parser(
        "synth",
        help="write a synthetic data set: 68-point faces (300-W layout) or 16-joint poses (MPII layout)",
        description="--task face: draw synthetic faces with 68 iBUG landmarks into DIR: images/NNNNN.png "
        "with same-stem .pts files, train.txt, test.txt and dataset.json. --task pose: draw "
        "articulated figures with the 16 MPII joints into DIR: images/NNNNN.png and "
        "mpii_annotations.json (the CU-Net authors' layout; the test fraction are its validation "
        "records). The same seed gives the same files.",
    )
    s.add_argument("--task", choices=["face", "pose"], default="face", help="what to draw (default: face)")
    s.add_argument("--out", required=True, type=Path, metavar="DIR", help="folder to create (must be empty or absent)")
    s.add_argument("--count", type=positive_int, default=3000, metavar="N", help="number of images (default: 3000)")
    s.add_argument("--seed", type=int, default=0, metavar="S", help="data set seed (default: 0)")
    s.add_argument("--test-fraction", type=unit_float, default=0.2, metavar="F",
                   help="share of test images (face: test.txt; pose: isValidation records) (default: 0.2)")
    s.add_argument("--image-size", type=positive_int, default=256, metavar="PX",
                   help="square image side (default: 256)")
    s.add_argument("--overwrite", action="store_true", help="replace DIR if it is not empty")
    s.add_argument("--json", action="store_true", help="print the summary as JSON (no progress bar)")
    p.set_defaults(func=run)


def run(args) -> int:
    if args.data_command == "synth":
        return _run_synth(args)
    raise AssertionError(f"unknown data action {args.data_command!r}")  # argparse prevents this


def _run_synth(args) -> int:
    from cunet_optimize.data.synth import write_synthetic_faces
    from cunet_optimize.data.mpii import ANNOTATION_FILE
    from cunet_optimize.data.synth_pose import write_synthetic_poses

    write = write_synthetic_poses if args.task == "pose" else write_synthetic_faces
    summary = write(
        args.out,
        count=args.count,
        seed=args.seed,
        test_fraction=args.test_fraction,
        image_size=args.image_size,
        progress=not args.json,
        overwrite=args.overwrite,
    )
    if args.json:
        print_json({**summary.to_dict(), "seconds": round(summary.seconds, 3)})
        return 0
    out = summary.out_dir
    if args.task == "pose":
        print(f"wrote {summary.count} synthetic poses ({summary.image_size}x{summary.image_size}, seed "
              f"{summary.seed}) to {out} in {summary.seconds:.1f} s ({summary.images_per_second:.0f} images/s)")
        print(f"  {out / 'images'}/  {summary.count} .png")
        print(f"  {out / ANNOTATION_FILE}  {summary.train_count} train + {summary.test_count} validation records "
              "(MPII layout, 1-based coordinates)")
        print(f"  {out / 'dataset.json'}")
        return 0
    print(
        f"wrote {summary.count} synthetic faces ({summary.image_size}x{summary.image_size}, seed "
        f"{summary.seed}) to {out} in {summary.seconds:.1f} s ({summary.images_per_second:.0f} images/s)"
    )
    print(f"  {out / 'images'}/  {summary.count} .png + .pts (1-based .pts coordinates)")
    print(f"  {out / 'train.txt'}  {summary.train_count} images")
    print(f"  {out / 'test.txt'}  {summary.test_count} images")
    print(f"  {out / 'dataset.json'}")
    return 0
