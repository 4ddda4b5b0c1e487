"""The entrypoint of a launched job: `python -m medfm.clusters.run --expect-version V -- ARGS`.

It refuses to run when the cluster's medfm is not the version the job was launched with (a
stale image or a half-upgraded node would otherwise write shards with a different contract),
then runs `medfm ARGS` in this interpreter, so it works whether or not the `medfm` script of the
job's environment is on PATH (Ray's pip runtime environments do not put it there).
"""

from __future__ import annotations

import argparse
import sys

import medfm


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m medfm.clusters.run")
    parser.add_argument("--expect-version", required=True)
    parser.add_argument("command", nargs=argparse.REMAINDER, help="medfm arguments after --")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if medfm.__version__ != args.expect_version:
        sys.exit(
            f"medfm version mismatch on this node: job pinned {args.expect_version}, "
            f"found {medfm.__version__} at {medfm.__file__}"
        )
    from medfm.cli import app

    app(args=command, prog_name="medfm")


if __name__ == "__main__":
    main()
