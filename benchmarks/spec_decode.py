"""Speculative decoding benchmark: the same as `xlaserve bench spec` (see its --help)."""

import sys

from xlaserve.bench.spec import main

if __name__ == "__main__":
    sys.exit(main())
