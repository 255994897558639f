"""`raftpbx demo`: a local cluster of N nodes on loopback addresses, with demo extensions.

Theory of operation: node i (1-based) gets its own loopback address 127.0.0.(10+i) for Raft, SIP and
admin, and the data dir WORKDIR/nodeI (node.toml and node.log live there too). The cluster's service address
127.0.0.10:5060 is served by whichever node leads (`[service]` loopback mode, raftpbx/service_address.py): kill
the leader and the next one binds it. The cluster secret and the admin
token are generated once with `secrets` into WORKDIR (mode 0600) and reused, as are the data dirs: running
the demo again on the same workdir restarts the same cluster with the same extensions. Only a fresh data dir
is started with `--bootstrap` (a node must never rejoin with an empty log otherwise).

The launcher starts the nodes with `setsid` (their own session: a Ctrl-C in the terminal reaches the
launcher, which stops them in order), waits for a leader, creates the missing demo extensions through the
admin RPC (idempotent op_ids; passwords are generated, printed once, stored nowhere) and writes
WORKDIR/cluster.json (mode 0600, it holds the token):
`{"nodes": [{"id", "sip", "raft", "admin_url", "pid", "data_dir"}], "service_address", "domain", "admin_token"}`.
`--detach` returns once that is done; `raftpbx demo --stop --workdir DIR` stops the pids listed there.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import orjson

from .admin import AdminClient, AdminError, ConnectionFailed, load_cluster_file, new_op_id
from .config import render_toml

__all__ = ["DemoError", "run_demo", "stop_demo"]

DOMAIN = "raftpbx.local"
SERVICE_ADDRESS = "127.0.0.10:5060"
MARKER_NAME = "raftpbx-node.json"  # the replicator's identity marker: present once a node has started
START_DEADLINE = 30.0
STOP_GRACE = 8.0


class DemoError(Exception):
    def __init__(self, message: str, status: int = 1) -> None:
        super().__init__(message)
        self.status = status


def _write_private(path: Path, data: bytes) -> None:
    """Write `data` atomically to `path` with mode 0600 (created so, never widened)."""
    tmp = path.with_name(path.name + ".tmp")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _secret_file(path: Path, nbytes: int) -> Path:
    if not path.exists():
        _write_private(path, (secrets.token_urlsafe(nbytes) + "\n").encode())
    os.chmod(path, 0o600)
    return path


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"  # a zombie is dead


def _is_our_node(pid: int, config_path: Path) -> bool:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return b"raftpbx.cli" in cmdline and str(config_path).encode() in cmdline


def _parse_range(text: str) -> list[str]:
    first, sep, last = text.partition("-")
    if not first.isdigit() or (sep and not last.isdigit()):
        raise DemoError(f"--extensions: expected FIRST-LAST digits, got {text!r}", 2)
    lo, hi = int(first), int(last) if sep else int(first)
    if not lo <= hi or hi - lo >= 100:
        raise DemoError("--extensions: expected FIRST <= LAST and at most 100 extensions", 2)
    return [str(n) for n in range(lo, hi + 1)]


def _demo_password(extension: str) -> str:
    while True:
        password = secrets.token_urlsafe(12)
        if extension not in password:
            return password


def node_layout(workdir: Path, n: int, raft_port: int, admin_port: int, sip_port: int) -> list[dict[str, Any]]:
    """Addresses and paths of the N demo nodes."""
    nodes = []
    for i in range(1, n + 1):
        ip = f"127.0.0.{10 + i}"
        node_dir = workdir / f"node{i}"
        nodes.append({
            "id": f"node{i}",
            "sip": f"{ip}:{sip_port}",
            "raft": f"{ip}:{raft_port}",
            "admin_listen": f"{ip}:{admin_port}",
            "admin_url": f"http://{ip}:{admin_port}",
            "data_dir": str(node_dir),
            "config": str(node_dir / "node.toml"),
            "log": str(node_dir / "node.log"),
        })
    return nodes


def write_configs(workdir: Path, nodes: list[dict[str, Any]], extra: dict[str, str]) -> None:
    secret = _secret_file(workdir / "cluster.secret", 32)
    token = _secret_file(workdir / "admin.token", 24)
    for node in nodes:
        values: dict[str, Any] = {
            "node.id": node["id"],
            "node.data_dir": node["data_dir"],
            "cluster.domain": DOMAIN,
            "cluster.secret_file": str(secret),
            "raft.address": node["raft"],
            "admin.listen": node["admin_listen"],
            "admin.token_file": str(token),
            "sip.listen": node["sip"],
            "service.address": SERVICE_ADDRESS,
            "service.mode": "loopback",
        }
        values.update(extra)
        peers = {p["id"]: {"raft": p["raft"], "admin_url": p["admin_url"]} for p in nodes if p["id"] != node["id"]}
        Path(node["data_dir"]).mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(node["data_dir"], 0o700)  # the journal holds password-equivalent HA1 digests
        Path(node["config"]).write_text(render_toml(values, peers), encoding="utf-8")


def _start_node(node: dict[str, Any]) -> subprocess.Popen[bytes]:
    # -P: no current directory on sys.path, so a checkout's raftpbx/ folder (the source, without transport/
    # and state/, which install under it) never shadows the installed package when the demo runs there.
    args = [sys.executable, "-P", "-m", "raftpbx.cli", "node", "--config", node["config"]]
    if not (Path(node["data_dir"]) / MARKER_NAME).exists():
        args.append("--bootstrap")
    with open(node["log"], "ab") as log:
        return subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True, close_fds=True)


def _log_tail(path: str, lines: int = 15) -> str:
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _wait_leader(client: AdminClient, procs: list[subprocess.Popen[bytes]], nodes: list[dict[str, Any]]) -> str:
    deadline = time.monotonic() + START_DEADLINE
    while True:
        for proc, node in zip(procs, nodes, strict=True):
            if proc.poll() is not None:
                raise DemoError(f"{node['id']} exited with status {proc.returncode}; its log "
                                f"({node['log']}) ends with:\n{_log_tail(node['log'])}")
        try:
            status = client.call("cluster.status", retry=False)
            if status.get("leader") and all(n.get("healthy") for n in status.get("nodes", [])):
                return str(status["leader"])
        except (AdminError, ConnectionFailed):
            pass
        if time.monotonic() > deadline:
            raise DemoError(f"no leader elected within {START_DEADLINE:.0f} s; see the node logs in {nodes[0]['log']}")
        time.sleep(0.1)  # polling a condition with a deadline


def _ensure_extensions(client: AdminClient, extensions: list[str]) -> list[tuple[str, str | None]]:
    """Create the demo extensions that do not exist yet; `(extension, password or None if it existed)`.

    Existence is decided by the create itself, not by a read first: right after a whole-cluster restart a
    node's state may not yet hold the log entries after its last dump (they apply once the new leader
    commits its first entry), so a read can miss an extension that the log already has. The create goes
    through the log and is refused with "already exists" (by the decision or at apply) in that case.
    """
    made: list[tuple[str, str | None]] = []
    for extension in extensions:
        password = _demo_password(extension)
        try:
            client.call("extension.create", {"extension": extension, "password": password,
                                             "display_name": f"Demo {extension}", "op_id": new_op_id()})
        except AdminError as exc:
            data = exc.data if isinstance(exc.data, dict) else {}
            if data.get("field") != "extension" or "already exists" not in str(data.get("message", exc.message)):
                raise
            made.append((extension, None))
        else:
            made.append((extension, password))
    return made


def _stop_pids(pids: list[int]) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + STOP_GRACE
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        for pid in pids:  # reap our own children
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, os.WNOHANG)
        time.sleep(0.05)
    for pid in pids:
        if _alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)


def run_demo(ns: Any) -> int:
    n = int(ns.nodes)
    if not 1 <= n <= 9:
        raise DemoError("--nodes: expected 1 to 9", 2)
    extensions = _parse_range(ns.extensions)
    workdir = Path(ns.workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    cluster_file = workdir / "cluster.json"
    if cluster_file.exists():
        with contextlib.suppress(ValueError):
            old = load_cluster_file(cluster_file)
            running = [nd["id"] for nd in old["nodes"]
                       if isinstance(nd.get("pid"), int) and _alive(nd["pid"])
                       and _is_our_node(nd["pid"], Path(nd["data_dir"]) / "node.toml")]
            if running:
                raise DemoError(f"nodes {', '.join(running)} of {workdir} are running; "
                                f"stop them with: raftpbx demo --stop --workdir {ns.workdir}")
    nodes = node_layout(workdir, n, ns.raft_port, ns.admin_port, ns.sip_port)
    write_configs(workdir, nodes, dict(ns.overrides))
    token = (workdir / "admin.token").read_text().strip()
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for node in nodes:
            procs.append(_start_node(node))
        client = AdminClient([nd["admin_url"] for nd in nodes], token, timeout=2.0)
        leader = _wait_leader(client, procs, nodes)
        made = _ensure_extensions(client, extensions)
        doc = {
            "nodes": [{"id": nd["id"], "sip": nd["sip"], "raft": nd["raft"], "admin_url": nd["admin_url"],
                       "pid": proc.pid, "data_dir": nd["data_dir"]} for nd, proc in zip(nodes, procs, strict=True)],
            "service_address": SERVICE_ADDRESS,
            "domain": DOMAIN,
            "admin_token": token,
        }
        _write_private(cluster_file, orjson.dumps(doc, option=orjson.OPT_INDENT_2) + b"\n")
    except BaseException:
        _stop_pids([p.pid for p in procs])
        raise
    _print_summary(workdir, nodes, leader, made, ns.softphone_help)
    if ns.detach:
        return 0
    return _foreground(procs, nodes, cluster_file)


def _print_summary(workdir: Path, nodes: list[dict[str, Any]], leader: str,
                   made: list[tuple[str, str | None]], softphone: bool) -> None:
    out = sys.stdout
    out.write(f"raftpbx demo: {len(nodes)} nodes up, leader {leader}\n")
    for node in nodes:
        out.write(f"  {node['id']}: sip {node['sip']}  raft {node['raft']}  admin {node['admin_url']}  "
                  f"log {node['log']}\n")
    out.write(f"service address: {SERVICE_ADDRESS} (served by the leader, {leader} now; it follows the leader)\n")
    out.write(f"domain: {DOMAIN}\ncluster file: {workdir / 'cluster.json'}\n")
    out.write("extensions (passwords are shown once and stored nowhere):\n")
    for extension, password in made:
        shown = password if password is not None else "(existing; reset with: raftpbx admin --cluster "\
            f"{workdir / 'cluster.json'} ext update {extension} --prompt-password)"
        out.write(f"  {extension}  password: {shown}\n")
    out.write(f"admin: raftpbx admin --cluster {workdir / 'cluster.json'} cluster status\n")
    if softphone:
        out.write(
            "\nPoint a softphone (e.g. Linphone, MicroSIP, Zoiper) at the cluster:\n"
            f"  SIP server / registrar / proxy: the service address {SERVICE_ADDRESS} (UDP or TCP; it follows\n"
            f"  the leader, so the phone keeps working when a node dies), or any node's own address, e.g.\n"
            f"  {nodes[0]['sip']}\n"
            f"  domain / realm: {DOMAIN}\n"
            "  username and auth user: the extension number (e.g. 1001)\n"
            "  password: as printed above\n"
            "  Call another extension by dialling its number.\n"
            "  Try failover: kill the leader's process (see `cluster status`); within a second the next leader\n"
            "  answers on the service address.\n")
    out.flush()


def _foreground(procs: list[subprocess.Popen[bytes]], nodes: list[dict[str, Any]], cluster_file: Path) -> int:
    stopping = False

    def on_signal(signum: int, frame: Any) -> None:
        nonlocal stopping
        stopping = True

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    sys.stdout.write("running in the foreground; Ctrl-C stops every node\n")
    sys.stdout.flush()
    reported: set[str] = set()
    try:
        while not stopping:
            for proc, node in zip(procs, nodes, strict=True):
                if proc.poll() is not None and node["id"] not in reported:
                    reported.add(node["id"])
                    sys.stdout.write(f"{node['id']} exited with status {proc.returncode}; see {node['log']}\n")
                    sys.stdout.flush()
            time.sleep(0.2)  # a supervisor's idle loop; signals interrupt it
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        _stop_pids([p.pid for p in procs if p.poll() is None])
        _clear_pids(cluster_file)
        sys.stdout.write("all nodes stopped\n")
    return 0


def _clear_pids(cluster_file: Path) -> None:
    with contextlib.suppress(ValueError, OSError):
        doc = load_cluster_file(cluster_file)
        for node in doc["nodes"]:
            node["pid"] = None
        _write_private(cluster_file, orjson.dumps(doc, option=orjson.OPT_INDENT_2) + b"\n")


def stop_demo(workdir_text: str) -> int:
    """Stop the nodes listed in WORKDIR/cluster.json (only processes that are our nodes)."""
    workdir = Path(workdir_text).resolve()
    cluster_file = workdir / "cluster.json"
    try:
        doc = load_cluster_file(cluster_file)
    except ValueError as exc:
        raise DemoError(f"nothing to stop: {exc}") from None
    pids = []
    for node in doc["nodes"]:
        pid = node.get("pid")
        if isinstance(pid, int) and _alive(pid) and _is_our_node(pid, Path(node["data_dir"]) / "node.toml"):
            pids.append(pid)
    _stop_pids(pids)
    _clear_pids(cluster_file)
    print(f"stopped {len(pids)} node(s) of {workdir}")
    return 0
