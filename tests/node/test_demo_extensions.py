"""`raftpbx demo` creates its extensions idempotently, deciding existence by the create, not by a read."""

from __future__ import annotations

from typing import Any

import pytest

from raftpbx.admin import AdminError
from raftpbx.demo import _ensure_extensions
from raftpbx.rpc import INVALID_PARAMS, NO_QUORUM, REJECTED


class LogBackedClient:
    """Stands in for the admin client: `extension.create` answers like the node does when the log already
    has the extension (rejected at apply, or refused by the decision), whatever a read would have said."""

    def __init__(self, in_log: dict[str, int], fail: AdminError | None = None) -> None:
        self.in_log = in_log
        self.fail = fail
        self.calls: list[tuple[str, dict[str, Any]]] = []

    def call(self, method: str, params: dict[str, Any], retry: bool = True) -> dict[str, Any]:
        self.calls.append((method, params))
        if self.fail is not None:
            raise self.fail
        if params["extension"] in self.in_log:
            code = self.in_log[params["extension"]]
            raise AdminError(code, "rejected: extension: already exists",
                             {"field": "extension", "message": "already exists"})
        return {"status": "applied"}


@pytest.mark.parametrize("code", [REJECTED, INVALID_PARAMS])
def test_existing_extensions_keep_their_password_and_new_ones_get_one(code: int) -> None:
    client = LogBackedClient({"1001": code, "1003": code})
    made = dict(_ensure_extensions(client, ["1001", "1002", "1003"]))  # type: ignore[arg-type]
    assert made["1001"] is None and made["1003"] is None  # no password printed for what already existed
    assert isinstance(made["1002"], str) and len(made["1002"]) >= 12
    assert [m for m, _ in client.calls] == ["extension.create"] * 3  # no read first: the log decides


def test_other_errors_still_stop_the_demo() -> None:
    client = LogBackedClient({}, fail=AdminError(NO_QUORUM, "no quorum", {"op_id": "x"}))
    with pytest.raises(AdminError):
        _ensure_extensions(client, ["1001"])  # type: ignore[arg-type]
