"""`make bench`: every benchmark, each figure beside a baseline measured in the same run."""

from __future__ import annotations

import argparse

from bench import convert, dicomdir, ingest, retention


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench")
    parser.add_argument("--instances", type=int, default=20_000, help="ingest: files dropped")
    parser.add_argument("--trickle", type=int, default=500, help="ingest: files at 50/s")
    parser.add_argument(
        "--dicomdir-instances", type=int, default=100_000, help="dicomdir: folder size"
    )
    parser.add_argument("--convert-series", type=int, default=20, help="convert: series")
    parser.add_argument("--convert-slices", type=int, default=100, help="convert: slices each")
    parser.add_argument(
        "--only", choices=["ingest", "dicomdir", "convert", "retention"], help="run one benchmark"
    )
    args = parser.parse_args()
    if args.only in (None, "ingest"):
        ingest.run(instances=args.instances, trickle=args.trickle)
    if args.only in (None, "dicomdir"):
        dicomdir.run(instances=args.dicomdir_instances)
    if args.only in (None, "convert"):
        convert.run(series=args.convert_series, slices=args.convert_slices)
    if args.only in (None, "retention"):
        retention.run()


if __name__ == "__main__":
    main()
