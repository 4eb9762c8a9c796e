"""Reading a JSON file that must hold an object, with errors that name the file and the problem."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tx.errors import TxError


def read_json_object(path: Path, error: type[TxError]) -> dict[str, Any]:
    """The JSON object in ``path``; raises ``error`` naming the file (and the line and column of a syntax error)."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise error(f"{path} is not valid JSON: {exc.msg} at line {exc.lineno}, column {exc.colno}") from None
    except UnicodeDecodeError as exc:
        raise error(f"{path} is not valid JSON: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except OSError as exc:
        raise error(f"{path}: cannot read ({exc.strerror or exc})") from None
    if not isinstance(data, dict):
        raise error(f"{path} must hold a JSON object, found {type(data).__name__}")
    return data
