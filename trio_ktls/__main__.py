"""``python -m trio_ktls``: the command-line face of the library.

- ``probe [--json]``: what this kernel's kTLS supports (exit status 0 even without kTLS:
  the answer "no, because ..." is a successful probe).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from ._probe import probe


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trio_ktls", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    probe_cmd = commands.add_parser("probe", help="report what this kernel's kTLS supports")
    probe_cmd.add_argument("--json", action="store_true", help="print JSON instead of text")
    args = parser.parse_args(argv)

    if args.command == "probe":
        result = probe()
        if args.json:
            json.dump(result.as_dict(), sys.stdout, indent=2)
            print()
        else:
            print(result.format())
        return 0
    raise AssertionError(f"unhandled command {args.command}")  # argparse rejects others


if __name__ == "__main__":
    sys.exit(main())
