"""Values as people type them, turned into settings: ``key=value`` pairs from the command line, strings and
numbers from JSON or the tab coerced to each field's type, and the sentences that say what is wrong with one.
``config.py`` holds the settings themselves."""

from __future__ import annotations

import difflib
import math
from dataclasses import field
from typing import Any

from .errors import UserError


def coerce(key: str, typ: Any, value: Any) -> Any:
    """Turn ``value`` (possibly a string from the command line or JSON) into ``typ``, or raise a UserError."""
    try:
        if typ is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.strip().lower() in ("1", "true", "yes", "on"):
                return True
            if isinstance(value, str) and value.strip().lower() in ("0", "false", "no", "off"):
                return False
            if isinstance(value, (int, float)) and value in (0, 1):
                return bool(value)
            raise ValueError(value)
        if typ is int:
            if isinstance(value, bool):
                raise ValueError(value)
            if isinstance(value, float):
                if not value.is_integer():
                    raise ValueError(value)
                return int(value)
            return int(str(value).strip())
        if typ is float:
            if isinstance(value, bool):
                raise ValueError(value)
            result = float(str(value).strip()) if isinstance(value, str) else float(value)
            if not math.isfinite(result):
                raise ValueError(value)
            return result
        if typ is str:
            if not isinstance(value, str):
                raise ValueError(value)
            return value
    except (TypeError, ValueError):
        kind = {bool: "true or false", int: "a whole number", float: "a number", str: "text"}[typ]
        raise UserError(f"Setting '{key}' must be {kind}; got {value!r}.") from None
    raise UserError(f"Setting '{key}' has an unsupported type.")


def parse_assignments(pairs: list[str]) -> dict[str, str]:
    """Parse ``key=value`` strings from the command line."""
    out: dict[str, str] = {}
    for pair in pairs:
        if "=" not in pair:
            raise UserError(f"'{pair}' is not key=value; write for example --set epochs=10.")
        key, value = pair.split("=", 1)
        out[key.strip()] = value.strip()
    return out


def unknown_key_message(key: str, known: set[str]) -> str:
    close = difflib.get_close_matches(key, sorted(known), n=1)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    return f"Unknown setting '{key}'.{hint} Run 'python -m train_tools train --help' to list the settings."


def is_hex_colour(value: str) -> bool:
    digits = value[1:] if value.startswith("#") else ""
    return len(digits) in (3, 6) and all(c in "0123456789abcdefABCDEF" for c in digits)


def setting_field(
    default: Any,
    label: str,
    help: str,
    *,
    ss: str | None = None,
    choices: tuple[str, ...] | None = None,
    min: float | None = None,
    max: float | None = None,
    advanced: bool = False,
) -> Any:
    """A settings field: its default plus what the UI, the CLI and the file metadata need to know of it.

    ``ss`` names the key the value is written under in the LoRA file's metadata (the kohya ``ss_*`` names
    that WebUIs and model sites read).
    """
    meta = {"label": label, "help": help, "ss": ss, "choices": choices, "min": min, "max": max, "advanced": advanced}
    return field(default=default, metadata=meta)
