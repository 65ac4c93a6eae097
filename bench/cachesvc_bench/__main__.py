"""``python -m cachesvc_bench ...``: the same as ``cachesvc bench ...``, for source trees on
PYTHONPATH where no entry point is registered (tools/gpu-check.sh)."""

import argparse
import sys

from cachesvc_bench import cli

parser = argparse.ArgumentParser(prog="cachesvc bench", description=cli.HELP)
cli.add_arguments(parser)
args = parser.parse_args()
sys.exit(cli.main(args))
