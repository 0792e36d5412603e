"""``python -m trio_ktls``: the ``trio-ktls`` command (see `trio_ktls._cli`)."""

from __future__ import annotations

import sys

from ._cli import main

if __name__ == "__main__":
    sys.exit(main(prog="python -m trio_ktls"))
