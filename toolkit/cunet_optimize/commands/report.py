"""`cunet-optimize report`: rebuild the HTML report from a profile JSON (optionally vs another)."""

from __future__ import annotations

from pathlib import Path

from cunet_optimize.commands.common import add_force_argument, check_new_output
from cunet_optimize.manifests.profile import read_profile
from cunet_optimize.report import write_html


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("report", help="write the HTML report of a profile JSON (optionally compared)")
    p.add_argument("profile", metavar="PROFILE.json", help="a JSON written by `cunet-optimize profile`")
    p.add_argument("--compare", metavar="OTHER.json", help="another profile: adds latency and NME deltas per variant")
    p.add_argument("--out", metavar="PATH", help="HTML file to write (default: PROFILE.html next to the JSON)")
    add_force_argument(p, "the HTML file")
    p.set_defaults(func=run)


def run(args) -> int:
    out = Path(args.out) if args.out else Path(args.profile).with_suffix(".html")
    if out.is_dir():
        out = out / Path(args.profile).with_suffix(".html").name
    check_new_output(out, "--out", force=args.force, inputs=[p for p in (args.profile, args.compare) if p])
    profile = read_profile(args.profile)
    other = read_profile(args.compare) if args.compare else None
    path = write_html(profile, out, compare=other, json_name=args.profile)  # checked on reading: typed
    print(f"report: {path}")
    return 0
