"""`python -m seqwrap <command>`.

    python -m seqwrap plan --config llama-3.1-8b --tokens 1M --device-memory 80GB --host-memory 1TB

Other tools keep their own module entry points: python -m seqwrap.demo, python -m seqwrap.memory_model,
python -m seqwrap.hf.census.
"""
from __future__ import annotations

import argparse

from .planning import cli as plan_cli


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m seqwrap", description=__doc__.split("\n\n")[0],
                                     epilog=__doc__.split("\n\n", 2)[2],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="command")
    plan_cli.add_parser(sub)
    args = parser.parse_args(argv)
    args.run(args, sub.choices[args.command])


if __name__ == "__main__":
    main()
