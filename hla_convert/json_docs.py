"""JSON as hla-convert writes and reads it: one home for three rules.

- Writing a report or a `--json` document: JSON has no NaN or infinity, and a diverged metric must
  not cost the document (or the run), so a non-finite float is written as the string "nan", "inf"
  or "-inf" (the README promises this); `number` reads such a value back as a float.
- Reading a file hla-convert wrote (hla_config.json, drift_report.json, the adapter's header
  metadata): a duplicate key is refused, since json.loads would keep the last one silently and a
  reader could be shown a different value than a checker saw.
- Comparing two JSON values (hla_config.json against the adapter's header): by type as well as
  value, so true is not 1 and 2.0 is not 2 (Python's == says they are).
"""

from __future__ import annotations

import json
import math
from typing import Any

_NON_FINITE = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}


def json_safe(obj: Any) -> Any:
    """`obj` (dicts, lists, tuples, scalars) with every non-finite float as "nan", "inf" or "-inf",
    dict keys as strings: what json.dumps(..., allow_nan=False) accepts."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return "nan" if math.isnan(obj) else "inf" if obj > 0 else "-inf"
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def dumps_document(obj: Any, indent: int | None = 2) -> str:
    """A report or --json document as JSON text (json_safe; anything else not JSON as its str())."""
    return json.dumps(json_safe(obj), indent=indent, default=str, allow_nan=False)


def number(value: Any) -> float:
    """A metric read back from a document: an int or float (not a bool), or one of the strings
    json_safe writes for a non-finite float. Anything else: ValueError."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str) and value in _NON_FINITE:
        return _NON_FINITE[value]
    raise ValueError(f"{value!r} is not a number")


class DuplicateKeyError(ValueError):
    """A JSON object that names the same key twice."""


def _unique_pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise DuplicateKeyError(f"duplicate key {key!r}")
        out[key] = value
    return out


def loads_strict(text: str | bytes) -> Any:
    """json.loads that refuses a duplicate key (DuplicateKeyError, a ValueError) and the bare
    NaN / Infinity tokens Python's json accepts but JSON does not have."""
    def bad_constant(name: str) -> Any:
        raise ValueError(f"{name} is not JSON")

    return json.loads(text, object_pairs_hook=_unique_pairs, parse_constant=bad_constant)


def canonical(value: Any) -> str:
    """A JSON value as text that tells types apart (true vs 1, 2.0 vs 2) and ignores key order."""
    return json.dumps(value, sort_keys=True, allow_nan=True)


def same_json(a: Any, b: Any) -> bool:
    """Equal as JSON values, types included: same_json(True, 1) and same_json(2.0, 2) are False."""
    return canonical(a) == canonical(b)


__all__ = ["DuplicateKeyError", "canonical", "dumps_document", "json_safe", "loads_strict", "number", "same_json"]
