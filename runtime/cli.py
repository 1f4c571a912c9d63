"""The ``portep`` command line."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="portep", description="Portable expert-parallel communication")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="run one HT and one LL dispatch/combine on local ranks")
    demo.add_argument("--ranks", type=int, default=4, help="number of local ranks (default 4)")
    demo.add_argument("--ranks-per-node", type=int, default=2, help="ranks per virtual node (default 2)")
    args = parser.parse_args(argv)
    if args.command == "demo":
        from .demo import main as demo_main

        return demo_main(args.ranks, args.ranks_per_node)
    return 2


if __name__ == "__main__":
    sys.exit(main())
