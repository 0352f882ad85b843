"""Vision-language benchmark: the same as `xlaserve bench multimodal` (see its --help)."""

import sys

from xlaserve.bench.multimodal import main

if __name__ == "__main__":
    sys.exit(main())
