"""``python -m morphoquant.zoo [list | convert NAME... | convert all]``: inspect or pre-build the zoo."""

from __future__ import annotations

import argparse
import sys
import time

from .registry import ZOO, convert_model, list_models


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m morphoquant.zoo", description=__doc__)
    sub = parser.add_subparsers(dest="cmd")
    sub.add_parser("list", help="list zoo models and whether they are converted")
    conv = sub.add_parser("convert", help="fetch and convert zoo models (names or 'all')")
    conv.add_argument("names", nargs="+")
    conv.add_argument("--force", action="store_true", help="reconvert even if already converted")
    args = parser.parse_args(argv)
    if args.cmd == "convert":
        names = list(ZOO) if args.names == ["all"] else args.names
        for name in names:
            start = time.perf_counter()
            path = convert_model(name, force=args.force)
            print(f"{name}: {path} ({time.perf_counter() - start:.1f} s)", flush=True)
        return 0
    for row in list_models():
        state = f"converted, {row['size_mb']} MB" if row["converted"] else "not converted"
        print(f"{row['name']:16s} {row['architecture']:32s} {state:24s} {row['description']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
