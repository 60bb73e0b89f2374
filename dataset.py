"""The data as the trainer sees it, described without loading any model (the implementation: sdxl_ff/data/scan.py).

    python dataset.py --config CFG [--json]

Per source: name, images, repeats, loss weight, masks; per bucket: resolution, images, batch size, batches
per epoch; and the samples per epoch. --json prints the same as one JSON object.
"""

import argparse
import json
import logging
import sys

from sdxl_ff.runtime.console import quiet_loggers

quiet_loggers()  # before the libraries are imported: their import-time warnings are no news to the user

from sdxl_ff.config.errors import ConfigError
from sdxl_ff.config.load import add_config_arguments, load_config
from sdxl_ff.data import scan, sources
from sdxl_ff.data.records import DataError  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Describe a config's training data (sources, buckets, samples "
                                                 "per epoch) without loading any model.")
    add_config_arguments(parser)
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    args = parser.parse_args(argv)
    logging.basicConfig(format="%(levelname)s %(message)s", level=logging.WARNING)
    try:
        info = scan.describe(load_config(args.config, args.overrides))
    except (ConfigError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(info, indent=2) if args.json else sources.format_description(info))
    return 0


if __name__ == "__main__":
    sys.exit(main())
