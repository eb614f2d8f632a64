"""`make bench`: every benchmark, each figure beside a baseline measured in the same run."""

from __future__ import annotations

import argparse

from bench import ingest


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench")
    parser.add_argument("--instances", type=int, default=20_000, help="ingest: files dropped")
    parser.add_argument("--trickle", type=int, default=500, help="ingest: files at 50/s")
    args = parser.parse_args()
    ingest.run(instances=args.instances, trickle=args.trickle)


if __name__ == "__main__":
    main()
