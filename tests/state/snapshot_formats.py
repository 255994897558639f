"""Older snapshot layouts built from a current one, for the compatibility tests (imported by file name).

Format 5 stores extensions, bindings and the dedupe window as columns; format 4 (and 1-3, which differ from 4
only by missing sections and call fields) stored rows, with HA1s as lowercase hex. `as_format_4` turns a
decoded format 5 map into exactly what the format 4 writer produced for the same state.
"""

from __future__ import annotations

from typing import Any

import msgpack

EXTENSION_COLUMNS = ("extension", "display_name", "realm", "ha1", "created_at", "updated_at")


def rows(columns: dict[str, list[Any]], names: list[str] | tuple[str, ...]) -> list[list[Any]]:
    """The records of a column map as rows, fields in `names` order."""
    return [list(row) for row in zip(*(columns[name] for name in names), strict=True)]


def as_format_4(obj: dict[str, Any]) -> dict[str, Any]:
    """A decoded format 5 snapshot map rewritten in the format 4 layout (format field set to 4)."""
    assert obj["format"] == 5
    old = dict(obj)
    old["format"] = 4
    dedupe = obj["dedupe"]
    old["dedupe"] = [[op_id, msgpack.unpackb(outcome)] for op_id, outcome in zip(dedupe["op_id"], dedupe["outcome"],
                                                                                  strict=True)]
    ext = obj["extensions"]
    old["extensions"] = [
        [number, display, realm, ha1[:16].hex(), ha1[16:].hex(), created, updated]
        for number, display, realm, ha1, created, updated in rows(ext, EXTENSION_COLUMNS)
    ]
    old["bindings"] = rows(obj["bindings"], list(obj["bindings"]))
    return old
