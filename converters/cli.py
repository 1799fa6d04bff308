"""``atlas-convert``: one console script for both conversion directions.

atlas-convert hf_to_jax --hf_dir DIR --out CKPT [--dtype bfloat16]
atlas-convert jax_to_hf --ckpt CKPT --out DIR [--dtype bfloat16] [--max_shard_size 5GB]
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from converters import hf_to_jax, jax_to_hf


def main(argv: Sequence[str] | None = None) -> int:
    """Parses ``argv`` (default ``sys.argv[1:]``) and runs the chosen conversion; returns the exit code."""
    parser = argparse.ArgumentParser(prog="atlas-convert", description="Convert between HF and atlas-jax.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, module in (("hf_to_jax", hf_to_jax), ("jax_to_hf", jax_to_hf)):
        p = sub.add_parser(name, help=(module.__doc__ or "").split("\n", 1)[0])
        module.add_args(p)
        p.set_defaults(run=module.run_args)
    args = parser.parse_args(argv)
    return args.run(args)


def run() -> None:
    """Console-script entry point."""
    sys.exit(main())


if __name__ == "__main__":
    run()
