"""Run the ``worker`` subcommand on its own, as the command line will.

Usage: python -m tests.worker_helpers.run_worker --coordinator HOST:PORT ...
"""

from __future__ import annotations

import argparse
import logging
import sys

from worker.cli import add_worker_parser


def main() -> int:
    parser = argparse.ArgumentParser(prog="run_worker")
    commands = parser.add_subparsers(dest="command", required=True)
    add_worker_parser(commands)
    args = parser.parse_args(["worker", *sys.argv[1:]])
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    return int(args.handler(args))


if __name__ == "__main__":
    sys.exit(main())
