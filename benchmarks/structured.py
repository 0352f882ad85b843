"""Structured outputs benchmark: the same as `xlaserve bench structured` (see its --help)."""

import sys

from xlaserve.bench.structured import main

if __name__ == "__main__":
    sys.exit(main())
