"""The backup file format in process: a round trip, and every kind of damage refused with a clear error
before anything is written (see raftpbx/backup.py)."""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path

import msgpack
import pytest
from raftpbx.state import State, snapshot

from raftpbx.backup import (
    MAGIC,
    BackupError,
    encode_backup,
    read_backup,
    restore_backup,
    take_backup,
    write_backup_file,
)
from raftpbx.config import NodeConfig, load_config


def _config(tmp_path: Path, domain: str = "b.raftpbx.local") -> NodeConfig:
    return load_config(None, env={}, overrides={
        "node.id": "n1", "node.data_dir": str(tmp_path / "n1"), "cluster.domain": domain,
        "cluster.secret": "s" * 40, "admin.token": "t" * 40, "raft.address": "127.0.0.1:7901"})


def _rewrap(body: dict[str, object]) -> bytes:
    raw = msgpack.packb(body, use_bin_type=True)
    return MAGIC + hashlib.sha256(raw).digest() + raw


def test_round_trip_and_damage(tmp_path: Path) -> None:
    cfg = _config(tmp_path)
    state = State()
    data = encode_backup(take_backup(cfg, snapshot(state), node_id="n1", now=1.0))
    manifest = read_backup(data).manifest
    assert manifest["format"] == "raftpbx-backup" and manifest["applied_index"] == 0
    assert "cdr" not in manifest["parts"]  # no call-record database on this node
    path = tmp_path / "b"
    write_backup_file(path, data)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600 and path.read_bytes() == data

    with pytest.raises(BackupError, match="bad magic"):
        read_backup(b"PK\x03\x04" + data)
    flipped = bytearray(data)
    flipped[-3] ^= 0x40
    with pytest.raises(BackupError, match="checksum mismatch"):
        read_backup(bytes(flipped))
    body = msgpack.unpackb(data[len(MAGIC) + 32:], raw=False)
    body["state"] = body["state"] + b"x"  # whole-file checksum redone, part checksum stale
    with pytest.raises(BackupError, match="part 'state'"):
        read_backup(_rewrap(body))
    body = msgpack.unpackb(data[len(MAGIC) + 32:], raw=False)
    body["manifest"]["version"] = 99
    with pytest.raises(BackupError, match="version 99"):
        read_backup(_rewrap(body))
    body = msgpack.unpackb(data[len(MAGIC) + 32:], raw=False)
    body["manifest"]["applied_index"] = 5
    with pytest.raises(BackupError, match="does not match the applied index"):
        read_backup(_rewrap(body))

    other = _config(tmp_path / "other", domain="other.raftpbx.local")
    with pytest.raises(BackupError, match="domain"):
        restore_backup(other, data)
    assert not other.data_dir.exists() or not any(other.data_dir.iterdir())
    restore_backup(cfg, data)
    assert (cfg.data_dir / "raft.dump").exists() and (cfg.data_dir / "raftpbx-node.json").exists()
    with pytest.raises(BackupError, match="already holds node state"):
        restore_backup(cfg, data)
