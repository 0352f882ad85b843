"""Multi-LoRA benchmark: the same as `xlaserve bench lora` (see its --help)."""

import sys

from xlaserve.bench.lora import main

if __name__ == "__main__":
    sys.exit(main())
