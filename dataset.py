"""The data as the trainer sees it, described without loading any model (the implementation: sdxl_ff/data.py).

    python dataset.py --config CFG [--json]

Per source: name, images, repeats, loss weight, masks; per bucket: resolution, images, batch size, batches
per epoch; and the samples per epoch. --json prints the same as one JSON object.
"""

import sys

from sdxl_ff.data import main

if __name__ == "__main__":
    sys.exit(main())
