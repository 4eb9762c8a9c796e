"""Run many ``tx`` command lines in one interpreter, so JAX is imported once instead of once per command.

``python cli_batch.py RESULTS.json`` reads a JSON list of argument lists on stdin and writes a JSON list of
``{"returncode", "stdout", "stderr"}`` to RESULTS.json: each
command runs as ``python -m tx ARGS`` runs it (``sys.exit(tx.cli.main(ARGS))``), with its output captured. An
exception escaping ``main`` is printed as the interpreter would print it (a traceback) with exit code 1.
For tests/test_cli.py and the other CLI checks; a few of them also run the real ``python -m tx`` to compare.
"""

from __future__ import annotations

import contextlib
import io
import json
import sys
import traceback

from tx.cli import main


def run(argv: list[str]) -> dict:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as exc:  # argparse: --help, --version and usage errors
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        except BaseException:
            traceback.print_exc()
            code = 1
    return {"returncode": code, "stdout": out.getvalue(), "stderr": err.getvalue()}


if __name__ == "__main__":
    results = [run(argv) for argv in json.load(sys.stdin)]
    with open(sys.argv[1], "w") as fh:
        json.dump(results, fh)
