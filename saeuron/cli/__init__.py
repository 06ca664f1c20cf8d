"""``saeuron <stage>``: one thin function per stage of the data path, no logic of its own.

    prompts --collect--> activation shards --train--> SAE checkpoint --select--> concept file
            --generate--> images with and without the edit

Run ``saeuron <stage> --help`` for each stage's options.
"""
from __future__ import annotations

import argparse
import os

from .evaluate import add_attack_parser, add_explain_parser, add_sweep_parser
from .minicanvas import add_minicanvas_parser
from .stages import add_stage_parsers
from .unlearncanvas import add_unlearncanvas_parser


def build_parser() -> argparse.ArgumentParser:
    """The ``saeuron`` argument parser: one subcommand per stage (imports no stage and no torch)."""
    p = argparse.ArgumentParser(prog="saeuron", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="stage", required=True)
    add_stage_parsers(sub)
    add_explain_parser(sub)
    add_sweep_parser(sub)
    add_minicanvas_parser(sub)
    add_attack_parser(sub)
    add_unlearncanvas_parser(sub)
    return p


def main(argv=None) -> int:
    """Run ``saeuron <stage>`` with ``argv`` (default: the command line); errors exit with one clear line."""
    args = build_parser().parse_args(argv)
    if args.stage == "generate" and not (args.prompt or args.prompts):
        raise SystemExit("generate needs --prompt or --prompts")
    from ..utils import FolderBusyError

    try:
        args.fn(args)
    except (FileNotFoundError, NotADirectoryError, ValueError, FolderBusyError) as e:  # one clear line, no traceback
        if os.environ.get("SAEURON_DEBUG"):
            raise
        raise SystemExit(f"saeuron {args.stage}: error: {e}\n(set SAEURON_DEBUG=1 to see the traceback)") from None
    return 0

