"""Backups: one self-describing file holding a consistent state snapshot and the call history.

Theory of operation
-------------------
`take_backup` runs on a live node. The state snapshot is taken under the state lock, so it is exactly
the state at its own `applied_index` (the snapshot carries that index and the chained digest). The call
history is the node's SQLite call-record projection (`cdr.py`), copied with SQLite's online backup API
(a consistent copy of the database while the writer keeps going). Records lag the state by at most the
writer's linger; a restored node reconciles its records from the snapshot's active calls and finished
tail on its first start, which covers that lag.

File format (version 1): `MAGIC`, then the sha256 of the body, then the body: a msgpack map
{"manifest": {...}, "state": bin, "cdr": bin | nil}. The manifest names the format and version, the
cluster domain, the node the backup was taken on, `applied_index`, `digest`, the number of extensions,
`created_at` (epoch seconds) and, per part, its size and sha256. The file is written 0600: the state
holds HA1 digests, which are password-equivalent.

`restore_backup` is offline: it checks everything (magic, checksums, that the state decodes to the digest
and index the manifest names, the domain), refuses a non-empty data dir, and seeds the data dir of one
node of a NEW cluster (`replication.seed_data_dir`) plus its call-record database. "Empty" means: no
node state (Raft files, identity marker, call records); a node.toml or a log kept there is tolerated. Run it once per node
of the new cluster, each with its own node.toml; the nodes then start without --bootstrap.

Invariants: a backup is never partially accepted (every check passes before anything is written), and a
restore never touches a data dir that holds anything.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import sqlite3
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import msgpack

from .cdr import DB_NAME
from .config import NodeConfig
from .replication import DataDirError, seed_data_dir
from .state import digest_hex
from .state import restore as restore_state

MAGIC: Final = b"RAFTPBX-BACKUP\x01\n"
FORMAT: Final = "raftpbx-backup"
VERSION: Final = 1

__all__ = ["FORMAT", "MAGIC", "VERSION", "Backup", "BackupError", "encode_backup", "read_backup",
           "restore_backup", "take_backup", "write_backup_file"]


class BackupError(Exception):
    """A backup that cannot be taken, read or restored; the message says why."""


@dataclass(frozen=True)
class Backup:
    manifest: dict[str, Any]
    state: bytes
    cdr: bytes | None


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _copy_cdr(path: Path) -> bytes | None:
    """A consistent copy of the call-record database (SQLite online backup), or None if there is none."""
    if not path.exists():
        return None
    with tempfile.TemporaryDirectory() as tmp:
        dest = Path(tmp) / "cdr.sqlite3"
        src = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=10.0)
        try:
            dst = sqlite3.connect(dest)
            try:
                src.backup(dst)
                dst.execute("PRAGMA journal_mode=DELETE")  # one self-contained file, no -wal beside it
            finally:
                dst.close()
        finally:
            src.close()
        return dest.read_bytes()


def take_backup(config: NodeConfig, snapshot: bytes, *, node_id: str, now: float | None = None) -> Backup:
    """Build a backup from `snapshot` (taken under the state lock) and this node's call records."""
    state = restore_state(snapshot)
    cdr = _copy_cdr(config.data_dir / DB_NAME)
    manifest: dict[str, Any] = {
        "format": FORMAT, "version": VERSION, "domain": config.domain, "node": node_id,
        "created_at": time.time() if now is None else now, "applied_index": state.applied_index,
        "digest": digest_hex(state), "extensions": len(state.extensions),
        "parts": {"state": {"size": len(snapshot), "sha256": _sha(snapshot)}},
    }
    if cdr is not None:
        manifest["parts"]["cdr"] = {"size": len(cdr), "sha256": _sha(cdr)}
    return Backup(manifest, snapshot, cdr)


def encode_backup(backup: Backup) -> bytes:
    body: bytes = msgpack.packb({"manifest": backup.manifest, "state": backup.state, "cdr": backup.cdr},
                                use_bin_type=True)
    return MAGIC + hashlib.sha256(body).digest() + body


def write_backup_file(path: str | Path, data: bytes) -> None:
    """Write `data` to `path` with mode 0600 (created so, never widened), fsync'ed, via a rename."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    os.replace(tmp, path)


def read_backup(data: bytes) -> Backup:
    """Decode and verify a backup file's bytes; raise `BackupError` naming the first problem found."""
    head = len(MAGIC)
    if data[:head] != MAGIC:
        raise BackupError("not a raftpbx backup file (bad magic)")
    digest, body = data[head:head + 32], data[head + 32:]
    if len(digest) != 32 or hashlib.sha256(body).digest() != digest:
        raise BackupError("backup file is corrupted (checksum mismatch): refusing to restore it")
    try:
        doc = msgpack.unpackb(body, raw=False)
        manifest, state, cdr = doc["manifest"], doc["state"], doc.get("cdr")
    except Exception as exc:
        raise BackupError(f"backup file body is unreadable: {exc!r}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise BackupError("backup manifest missing or of another format")
    if manifest.get("version") != VERSION:
        raise BackupError(f"backup format version {manifest.get('version')!r} is not supported (expected {VERSION})")
    parts = manifest.get("parts") or {}
    for name, blob in (("state", state), ("cdr", cdr)):
        meta = parts.get(name)
        if blob is None and meta is None:
            continue
        if not isinstance(blob, bytes) or not isinstance(meta, dict) or meta.get("sha256") != _sha(blob):
            raise BackupError(f"backup part {name!r} does not match its manifest checksum")
    try:
        restored = restore_state(state)
    except Exception as exc:
        raise BackupError(f"backup state does not decode: {exc}") from None
    if restored.applied_index != manifest.get("applied_index") or digest_hex(restored) != manifest.get("digest"):
        raise BackupError("backup state does not match the applied index and digest of its manifest")
    return Backup(manifest, state, cdr)


def restore_backup(config: NodeConfig, data: bytes) -> dict[str, Any]:
    """Seed `config`'s (empty) data dir from a backup's bytes; return the manifest."""
    backup = read_backup(data)
    if backup.manifest.get("domain") != config.domain:
        raise BackupError(f"backup is of domain {backup.manifest.get('domain')!r} but cluster.domain is "
                          f"{config.domain!r} (HA1 digests depend on the realm)")
    from .node import replication_config

    try:
        seed_data_dir(replication_config(config), backup.state, int(backup.manifest["applied_index"]))
    except DataDirError as exc:
        raise BackupError(str(exc)) from None
    if backup.cdr is not None:
        db = config.data_dir / DB_NAME
        fd = os.open(db, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(backup.cdr)
            f.flush()
            os.fsync(f.fileno())
    return backup.manifest
