"""Embeddings benchmark: the same as `xlaserve bench embed` (see its --help)."""

import sys

from xlaserve.bench.embed import main

if __name__ == "__main__":
    sys.exit(main())
