"""`python -m digit_lightning.data [data_dir]`: fetch and verify MNIST once, say where it is."""

import argparse
import os
import re
from pathlib import Path

from digit_lightning.cli import exit_on_user_error, fail
from digit_lightning.data.mnist import RAW_FILES, prepare_mnist


def main() -> None:
    """Parse the one optional argument, prepare the data, print where it is."""
    parser = argparse.ArgumentParser(prog="python -m digit_lightning.data", description=__doc__.split(":", 1)[1])
    parser.add_argument("data_dir", nargs="?", default=os.environ.get("DIGIT_LIGHTNING_DATA", "data"),
                        help="where MNIST/raw/ goes (default: $DIGIT_LIGHTNING_DATA or ./data)")  # fmt: skip
    args = parser.parse_args()
    key, is_override, value = args.data_dir.partition("=")
    if is_override and re.fullmatch(r"[+~]?[A-Za-z_][\w.]*", key) and not Path(args.data_dir).exists():
        fail(f"{args.data_dir}: this command takes a directory, not a key=value override; write "
             f"python -m digit_lightning.data {value or '<data dir>'}")  # fmt: skip
    with exit_on_user_error():
        raw_dir = prepare_mnist(args.data_dir)
    print(f"MNIST ready in {raw_dir}: {len(RAW_FILES)} raw files verified by md5")


if __name__ == "__main__":
    main()
