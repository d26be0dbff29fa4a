"""The ``stsc`` command line.

Exit codes: 0 ok; 2 usage error or a bad model file; 3 model not supported (no decoder blocks found).
``stsc inspect model.py`` executes ``model.py`` to build the model: only run it on files you trust.
"""

from __future__ import annotations

import argparse
import json
import sys

from .loader import ModelFileError, load_model_file
from .report import inspect

EXIT_OK, EXIT_USAGE, EXIT_UNSUPPORTED = 0, 2, 3


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="stsc", description="Stage-aware sparse training for multimodal LLMs.")
    commands = parser.add_subparsers(dest="command", required=True)
    inspect_cmd = commands.add_parser("inspect", help="capture a model and report its decoder blocks and vision boundary")
    inspect_cmd.add_argument("model_file", help="Python file defining build_model() and example_inputs() (it is executed)")
    inspect_cmd.add_argument("--json", action="store_true", help="print the report as JSON")
    args = parser.parse_args(argv)
    return _inspect(args)


def _inspect(args) -> int:
    try:
        model, inputs = load_model_file(args.model_file)
    except ModelFileError as exc:
        print(f"stsc: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    print(f"stsc: capturing {args.model_file} ...", file=sys.stderr)
    report = inspect(model, inputs)
    print(json.dumps(report.to_dict(), indent=2, default=str) if args.json else report.format())
    if not report.supported:
        reason = next(note for note in report.notes if note.startswith("no decoder blocks found"))
        print(f"stsc: error: {args.model_file}: model not supported: {reason}", file=sys.stderr)
        return EXIT_UNSUPPORTED
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
