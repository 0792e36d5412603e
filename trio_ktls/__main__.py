"""``python -m trio_ktls``: the command-line face of the library.

- ``probe [--json]``: what this kernel's kTLS supports (exit status 0 even without kTLS:
  the answer "no, because ..." is a successful probe).
- ``demo [--megabytes N] [--ktls auto|require|off]``: a kTLS echo server and client on
  loopback, TLS 1.3 then TLS 1.2, printing what the kernel offloaded.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from functools import partial

import trio

from ._demo import run_demo
from ._probe import probe


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m trio_ktls", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    probe_cmd = commands.add_parser("probe", help="report what this kernel's kTLS supports")
    probe_cmd.add_argument("--json", action="store_true", help="print JSON instead of text")
    demo_cmd = commands.add_parser("demo", help="run a kTLS client and server on loopback")
    demo_cmd.add_argument("--megabytes", type=int, default=4, help="data to echo (MiB)")
    demo_cmd.add_argument("--ktls", choices=["auto", "require", "off"], default="auto")
    args = parser.parse_args(argv)

    if args.command == "probe":
        result = probe()
        if args.json:
            json.dump(result.as_dict(), sys.stdout, indent=2)
            print()
        else:
            print(result.format())
        return 0
    if args.command == "demo":
        trio.run(partial(run_demo, megabytes=args.megabytes, ktls=args.ktls))
        return 0
    raise AssertionError(f"unhandled command {args.command}")  # argparse rejects others


if __name__ == "__main__":
    sys.exit(main())
