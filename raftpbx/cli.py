"""The `raftpbx` command: `node`, `admin` and `demo`.

Exit statuses: 0 success, 1 a server or runtime error, 2 bad usage or bad configuration.
"""

from __future__ import annotations

import argparse
import getpass
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

__all__ = ["build_parser", "main"]


def _key_value(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected section.key=value, got {text!r}")
    return key.strip(), value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="raftpbx", description="A SIP PBX cluster replicated through Raft.")
    sub = parser.add_subparsers(dest="cmd", required=True, metavar="{node,admin,restore,demo}")

    node = sub.add_parser("node", help="run one node", description="Run one raftpbx node in the foreground.")
    node.add_argument("--config", "-c", help="node.toml (settings: TOML < RAFTPBX_* env < flags)")
    node.add_argument("--set", dest="overrides", action="append", type=_key_value, default=[],
                      metavar="SECTION.KEY=VALUE", help="override one setting (repeatable)")
    node.add_argument("--bootstrap", action="store_true",
                      help="create a new cluster: accept an empty data dir (first start only)")
    node.add_argument("--join", action="store_true",
                      help="accept an empty data dir for a node the cluster has just added")
    node.add_argument("--join-token", "--token", dest="join_token", metavar="TOKEN",
                      help="with --join: the single-use token printed by `admin cluster add-node`")
    node.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    node.add_argument("--check", action="store_true", help="validate the configuration and exit")

    admin = sub.add_parser("admin", help="administer a cluster over JSON-RPC",
                           description="Call a node's admin JSON-RPC API.")
    admin.add_argument("--url", default=os.environ.get("RAFTPBX_ADMIN_URL"),
                       help="a node's admin URL (default: every node of --cluster, or $RAFTPBX_ADMIN_URL)")
    auth = admin.add_mutually_exclusive_group()
    auth.add_argument("--token", help="bearer token (prefer $RAFTPBX_ADMIN_TOKEN or --token-file)")
    auth.add_argument("--token-file", help="file holding the bearer token")
    admin.add_argument("--cluster", help="cluster.json written by `raftpbx demo` (URLs and token)")
    admin.add_argument("--json", action="store_true", help="print the JSON result (for scripts)")
    admin.add_argument("--timeout", type=float, default=5.0, help="seconds per HTTP request (default 5)")
    groups = admin.add_subparsers(dest="group", required=True, metavar="{cluster,node,ext,state,reg,calls,cdr,trunk,route,backup}")

    cluster = groups.add_parser("cluster", help="cluster-wide views").add_subparsers(dest="command", required=True)
    cluster.add_parser("status", help="leader, term, commit index and every node's health")
    cluster.add_parser("members", help="the voting members as the contacted node's log says")
    add_node = cluster.add_parser("add-node", help="add a voting member (prints its single-use join token)")
    add_node.add_argument("id", help="the new node's id")
    add_node.add_argument("--raft", required=True, metavar="HOST:PORT", help="the new node's Raft address")
    add_node.add_argument("--admin-url", required=True, metavar="URL", help="the new node's admin URL")
    cluster.add_parser("remove-node", help="remove a voting member (not the leader itself)").add_argument("id")
    transfer = cluster.add_parser("transfer-leader", help="move leadership to NODE (default: the most caught-up "
                                  "undrained node)", description="Hand leadership over (Raft TimeoutNow); the "
                                  "command finds the leader itself. A drained node is never chosen.")
    transfer.add_argument("node", nargs="?", help="the node to hand leadership to")
    transfer.add_argument("--to", dest="to", help=argparse.SUPPRESS)  # older spelling of NODE
    drain = cluster.add_parser("drain", help="planned maintenance: NODE takes no new calls and gives up "
                               "leadership; its calls in progress finish",
                               description="Drain NODE: new INVITEs to it get 503 with Retry-After, leadership "
                               "moves to an undrained node, established calls end normally. Refused if no "
                               "other node would be left undrained. Idempotent.")
    drain.add_argument("node")
    undrain = cluster.add_parser("undrain", help="end maintenance: NODE takes new calls again",
                                 description="Undrain NODE: it routes new calls again and may lead. Idempotent.")
    undrain.add_argument("node")
    backup = groups.add_parser("backup", help="write a backup file (state snapshot and call history, mode 0600)",
                               description="Take a consistent backup from the contacted node.")
    backup.set_defaults(command="write")
    backup.add_argument("file")
    groups.add_parser("node", help="this node").add_subparsers(dest="command", required=True).add_parser(
        "info", help="the contacted node's own view")
    groups.add_parser("state", help="replicated state").add_subparsers(dest="command", required=True).add_parser(
        "digest", help="state digest and applied index of the contacted node")

    ext = groups.add_parser("ext", help="extensions").add_subparsers(dest="command", required=True)
    ext.add_parser("list", help="all extensions")
    ext.add_parser("get", help="one extension").add_argument("extension")
    create = ext.add_parser("create", help="create an extension")
    update = ext.add_parser("update", help="change an extension's display name and/or password")
    for p in (create, update):
        p.add_argument("extension")
        p.add_argument("--display-name")
        pw = p.add_mutually_exclusive_group()
        pw.add_argument("--password", help="the password (visible to other local users; prefer the prompt)")
        pw.add_argument("--password-stdin", action="store_true", help="read the password from stdin")
        p.add_argument("--op-id", help="idempotency key: retrying with the same op-id applies at most once")
    update.add_argument("--prompt-password", action="store_true", help="prompt for a new password")
    delete = ext.add_parser("delete", help="delete an extension")
    delete.add_argument("extension")
    delete.add_argument("--op-id", help="idempotency key")

    reg = groups.add_parser("reg", help="registrations").add_subparsers(dest="command", required=True)
    reg.add_parser("list", help="live bindings (all, or one extension's)").add_argument("extension", nargs="?")
    groups.add_parser("calls", help="active calls").set_defaults(command="active")
    cdr = groups.add_parser("cdr", help="call records (table, or export with --csv / --json)",
                            description="Call records ordered by start time. Times: epoch seconds, ISO 8601 "
                                        "(UTC unless an offset is given), or an age such as 90s, 30m, 2h, 7d.")
    cdr.set_defaults(command="list")
    cdr.add_argument("--since", help="records that started at or after this time")
    cdr.add_argument("--until", help="records that started before this time")
    cdr.add_argument("--extension", help="records where this extension called or was called")
    cdr.add_argument("--disposition", choices=["answered", "busy", "no-answer", "cancelled", "failed"])
    cdr.add_argument("--trunk", help="records of calls that crossed this trunk (\"\" for calls that crossed none)")
    cdr.add_argument("--limit", type=int, help="at most this many records (default 100 for the table, all for "
                                              "an export)")
    export = cdr.add_mutually_exclusive_group()
    export.add_argument("--csv", action="store_true", help="export as CSV (RFC 4180, header row)")
    export.add_argument("--json", dest="export_json", action="store_true", help="export as a JSON array")

    _add_trunk_commands(groups)

    restore = sub.add_parser("restore", help="seed a new cluster's node from a backup file (offline)",
                             description="Seed the empty data dir of one node of a NEW cluster from a backup; "
                                         "run it for every node, then start the nodes without --bootstrap.")
    restore.add_argument("file", help="backup file written by `raftpbx admin backup`")
    restore.add_argument("--config", "-c", required=True, help="the node.toml of the node to seed")

    demo = sub.add_parser("demo", help="run a local cluster on loopback",
                          description="Start N nodes on 127.0.0.11.. with demo extensions.")
    demo.add_argument("--nodes", type=int, default=3, help="number of nodes (default 3)")
    demo.add_argument("--workdir", default="workdir/demo", help="data, configs, logs, cluster.json")
    demo.add_argument("--detach", action="store_true", help="return once the cluster is up")
    demo.add_argument("--stop", action="store_true", help="stop the nodes listed in WORKDIR/cluster.json")
    demo.add_argument("--softphone-help", action="store_true", help="print how to point a softphone at it")
    demo.add_argument("--raft-port", type=int, default=7101, help="Raft port on every node's address")
    demo.add_argument("--admin-port", type=int, default=7102, help="admin port on every node's address")
    demo.add_argument("--sip-port", type=int, default=5060, help="SIP port on every node's address")
    demo.add_argument("--extensions", default="1001-1004", help="demo extensions, FIRST-LAST (default 1001-1004)")
    demo.add_argument("--raft-set", dest="overrides", action="append", type=_key_value, default=[],
                      metavar="SECTION.KEY=VALUE", help="extra setting written to every node.toml")
    return parser


def _add_trunk_commands(groups: Any) -> None:
    """`admin trunk add|list|get|update|delete` and `admin route add|list|update|delete|test` (docs/trunks.md)."""
    trunk = groups.add_parser("trunk", help="SIP trunks to other PBXs (replicated; health is the contacted "
                              "node's view)").add_subparsers(dest="command", required=True)
    trunk.add_parser("list", help="every trunk with the health of each peer address")
    trunk.add_parser("get", help="one trunk, its peers' health and the routes using it").add_argument("name")
    t_add = trunk.add_parser("add", help="create a trunk", description="Create a trunk. Peers are tried in the "
                             "order given. The password is hashed (HA1 for --realm) and never stored.")
    t_update = trunk.add_parser("update", help="change a trunk (options not given keep their value)")
    for p in (t_add, t_update):
        p.add_argument("name")
        p.add_argument("--peer", dest="peers", action="append", metavar="HOST[:PORT][;transport=udp|tcp]",
                       help="a peer address (repeatable, in preference order)"
                       + ("" if p is t_add else "; replaces the list"))
        p.add_argument("--transport", choices=["udp", "tcp"], help="transport of peers that name none")
        p.add_argument("--username", help="user name we present when the peer challenges us")
        p.add_argument("--realm", help="the realm the peer challenges with (the HA1 is bound to it)")
        pw = p.add_mutually_exclusive_group()
        pw.add_argument("--password", help="the peer's password for us (visible to other local users; prefer "
                        "the prompt)")
        pw.add_argument("--password-stdin", action="store_true", help="read the password from stdin")
        p.add_argument("--allow", action="append", metavar="CIDR",
                       help="accept calls from this address range without a challenge (repeatable)"
                       + ("" if p is t_add else "; replaces the list"))
        p.add_argument("--register-expires", type=int, metavar="SECONDS",
                       help="register to the peer with this expiry (0: do not register)")
        p.add_argument("--op-id", help="idempotency key: retrying with the same op-id applies at most once")
    t_add.set_defaults(peers_required=True)
    t_update.add_argument("--no-allow", action="store_true", help="empty the allow-list")
    t_update.add_argument("--clear-credentials", action="store_true", help="remove the credentials")
    t_update.add_argument("--prompt-password", action="store_true", help="prompt for a new password")
    t_delete = trunk.add_parser("delete", help="delete a trunk (refused while routes use it)")
    t_delete.add_argument("name")
    t_delete.add_argument("--op-id", help="idempotency key")

    route = groups.add_parser("route", help="the dial plan: numbers that go to a trunk (local extensions "
                              "win)").add_subparsers(dest="command", required=True)
    route.add_parser("list", help="the routes in the order they are tried")
    route.add_parser("test", help="what a call to NUMBER would do now").add_argument("number")
    r_add = route.add_parser("add", help="create a route", description="Create a route. PATTERN: digits, + * #, "
                             "X (any digit), N (2-9), Z (1-9), optionally ended by . (one or more more "
                             "characters) or ! (zero or more); e.g. 2XXX, 9. Routes are tried by (order, name).")
    r_update = route.add_parser("update", help="change a route (options not given keep their value)")
    for p in (r_add, r_update):
        p.add_argument("name")
        p.add_argument("--pattern", required=p is r_add)
        p.add_argument("--trunk", required=p is r_add)
        p.add_argument("--strip", type=int, help="remove this many leading characters (default 0)")
        p.add_argument("--prepend", help="put these digits in front (after --strip)")
        p.add_argument("--order", type=int, help="lower first (default 0); ties by name")
        p.add_argument("--op-id", help="idempotency key")
    r_delete = route.add_parser("delete", help="delete a route")
    r_delete.add_argument("name")
    r_delete.add_argument("--op-id", help="idempotency key")


def _run_node(ns: argparse.Namespace) -> int:
    from .config import ConfigError, load_config

    overrides = dict(ns.overrides)
    if ns.bootstrap:
        overrides["raft.bootstrap"] = "true"
    if ns.join:
        overrides["raft.join"] = "true"
    if ns.join_token:
        overrides["raft.join_token"] = ns.join_token
    if ns.log_level:
        overrides["log.level"] = ns.log_level
    try:
        config = load_config(ns.config, env=os.environ, overrides=overrides)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    if ns.check:
        print(f"config ok: node {config.node_id}")
        return 0
    from .logs import configure
    from .node import run

    configure(config.log_level, config.log_format, config.log_file)
    return run(config)


def _run_admin(ns: argparse.Namespace) -> int:
    from .admin import AdminClient, AdminError, ConnectionFailed, UsageError, load_cluster_file, run_command

    urls: list[str] = []
    token = ns.token
    if ns.token_file:
        try:
            with open(ns.token_file, encoding="utf-8") as fh:
                token = fh.read().strip()
        except OSError as exc:
            print(f"usage error: --token-file: {exc.strerror}", file=sys.stderr)
            return 2
    if ns.cluster:
        try:
            doc = load_cluster_file(ns.cluster)
        except ValueError as exc:
            print(f"usage error: --cluster: {exc}", file=sys.stderr)
            return 2
        urls = [str(n["admin_url"]) for n in doc["nodes"] if isinstance(n, dict) and n.get("admin_url")]
        token = token or doc.get("admin_token")
    if ns.url:
        urls = [ns.url]
    token = token or os.environ.get("RAFTPBX_ADMIN_TOKEN")
    if not urls:
        print("usage error: give --url URL or --cluster DIR/cluster.json", file=sys.stderr)
        return 2
    if not token:
        print("usage error: give --token, --token-file, --cluster or $RAFTPBX_ADMIN_TOKEN", file=sys.stderr)
        return 2
    client = AdminClient(urls, token, timeout=ns.timeout)
    try:
        if ns.group == "cluster" and ns.command in ("drain", "undrain", "transfer-leader", "status"):
            return _cluster_maintenance(client, ns, sys.stdout)
        if ns.group in ("trunk", "route"):
            return trunk_command(client, ns, sys.stdout, stdin=sys.stdin, prompt=getpass.getpass)
        return run_command(client, ns, sys.stdout, stdin=sys.stdin, prompt=getpass.getpass)
    except UsageError as exc:
        print(f"usage error: {exc}", file=sys.stderr)
        return 2
    except AdminError as exc:
        detail = ""
        if isinstance(exc.data, dict) and exc.data.get("op_id"):
            detail = f" (op_id {exc.data['op_id']})"
        print(f"error: {exc.message}{detail}", file=sys.stderr)
        return 1
    except ConnectionFailed as exc:
        print(f"error: cannot reach the cluster: {exc}", file=sys.stderr)
        return 1


class _Recorder:
    """An `AdminClient` that keeps the last result of each method (to add to the shared renderings)."""

    def __init__(self, client: Any) -> None:
        self.client = client
        self.results: dict[str, Any] = {}

    def call(self, method: str, params: Any = None, *, retry: bool = True) -> Any:
        result = self.client.call(method, params, retry=retry)
        self.results[method] = result
        return result


def _when(value: Any) -> str:
    if not isinstance(value, int | float):
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(value)) + "Z"


def _call_leader(client: Any, method: str, params: dict[str, Any]) -> Any:
    """Call `method` on the leader: the contacted node, or the leader it names (one hop, never retried)."""
    from .admin import AdminClient, AdminError
    from .rpc import NOT_LEADER

    try:
        return client.call(method, params, retry=False)
    except AdminError as exc:
        if exc.code != NOT_LEADER:
            raise
        leader = exc.data.get("leader") if isinstance(exc.data, dict) else None
        if not leader:
            raise AdminError(exc.code, "no leader is known right now (election in progress?): retry in a "
                                       "moment") from None
        members = client.call("cluster.members").get("members", [])
        url = next((m.get("admin_url") for m in members if m.get("id") == leader and m.get("admin_url")), None)
        if not url:
            raise AdminError(exc.code, f"{leader} leads and its admin URL is unknown: rerun with --url "
                                       "pointing at it") from None
        return AdminClient([url], client.token, timeout=client.timeout).call(method, params, retry=False)


def _cluster_maintenance(client: Any, ns: Any, out: Any) -> int:
    """`cluster drain|undrain|transfer-leader|status`: the drain-aware cluster commands (errors raise)."""
    from .admin import new_op_id, run_command

    result: Any
    if ns.command == "status":
        recorder = _Recorder(client)
        run_command(recorder, ns, out, stdin=sys.stdin, prompt=getpass.getpass)  # type: ignore[arg-type]
        status = recorder.results.get("cluster.status") or {}
        if not ns.json:
            drained = status.get("drained") or []
            listed = ", ".join(f"{d['node']} (since {_when(d.get('since'))})" for d in drained) or "none"
            out.write(f"drained: {listed}\n")
        return 0
    if ns.command == "transfer-leader":
        node = ns.node or ns.to
        result = _call_leader(client, "cluster.transfer_leader", {"to": node} if node else {})
        human = f"leader is now {result['leader']}"
    elif ns.command == "drain":
        # The op_id makes the client's retries (not leader, unknown outcome) apply at most once.
        result = client.call("cluster.drain", {"node": ns.node, "op_id": new_op_id()})
        state = "drained" if result.get("changed") else "was already drained"
        human = (f"{ns.node} {state} (since {_when(result.get('since'))}); leader: {result.get('leader') or '-'}\n"
                 f"New calls to {ns.node} get 503 and go elsewhere; its calls in progress go on until they end "
                 f"(`raftpbx admin calls`). Bring it back with `raftpbx admin cluster undrain {ns.node}`.")
    else:
        result = client.call("cluster.undrain", {"node": ns.node, "op_id": new_op_id()})
        state = "undrained: it takes new calls again" if result.get("changed") else "was not drained"
        human = f"{ns.node} {state}; leader: {result.get('leader') or '-'}"
    if ns.json:
        import orjson

        out.write(orjson.dumps(result, option=orjson.OPT_INDENT_2).decode() + "\n")
    else:
        out.write(human + "\n")
    return 0


def _peer_cell(row: dict[str, Any]) -> str:
    return f"{row.get('peer')}/{row.get('transport')} {row.get('state')}"


def _trunk_rows(trunks: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for trunk in trunks:
        health = trunk.get("health") or []
        rows.append({
            "name": trunk.get("name"),
            "peers": ", ".join(_peer_cell(h) for h in health) or ", ".join(trunk.get("peers") or []),
            "transport": trunk.get("transport"),
            "credentials": f"{trunk.get('username')}@{trunk.get('realm')}" if trunk.get("credentials") else "-",
            "allow": ", ".join(trunk.get("allow") or []) or "-",
            "register": _register_cell(trunk),
        })
    return rows


def _register_cell(trunk: dict[str, Any]) -> str:
    if not trunk.get("register_expires"):
        return "no"
    registration = trunk.get("registration")
    state = f", {registration.get('state')}" if isinstance(registration, dict) else ""
    return f"{trunk['register_expires']} s{state}"


def _registration_line(registration: dict[str, Any]) -> str:
    """The `trunk get` line about our registration to the peer (a follower shows "standby": the leader
    registers)."""
    expires_in = registration.get("expires_in")
    return (f"registration: {registration.get('state')} at {registration.get('peer') or '-'}, expires in "
            f"{expires_in if expires_in is not None else '-'} s, last status {registration.get('last_status') or '-'}, "
            f"last error {registration.get('last_error') or '-'}")


_TRUNK_COLUMNS = [("name", "TRUNK"), ("peers", "PEERS (this node's view)"), ("transport", "TRANSPORT"),
                  ("credentials", "CREDENTIALS"), ("allow", "ALLOW"), ("register", "REGISTER")]
_ROUTE_COLUMNS = [("order", "ORDER"), ("name", "ROUTE"), ("pattern", "PATTERN"), ("trunk", "TRUNK"),
                  ("strip", "STRIP"), ("prepend", "PREPEND")]


def _trunk_params(ns: Any, *, stdin: Any, prompt: Any) -> dict[str, Any]:
    from .admin import UsageError, read_password

    params: dict[str, Any] = {"name": ns.name}
    if ns.peers:
        params["peers"] = list(ns.peers)
    elif getattr(ns, "peers_required", False):
        raise UsageError("give at least one --peer HOST[:PORT]")
    for key in ("transport", "username", "realm"):
        if getattr(ns, key) is not None:
            params[key] = getattr(ns, key)
    if getattr(ns, "no_allow", False):
        if ns.allow:
            raise UsageError("use either --allow or --no-allow")
        params["allow"] = []
    elif ns.allow:
        params["allow"] = list(ns.allow)
    if ns.register_expires is not None:
        params["register_expires"] = ns.register_expires
    if getattr(ns, "clear_credentials", False):
        params["clear_credentials"] = True
    # A password is needed with new credentials: asked for when a username or realm is given.
    wants = ns.username is not None or ns.realm is not None
    password = read_password(ns, required=wants and not getattr(ns, "clear_credentials", False), stdin=stdin,
                             prompt=prompt)
    if password is not None:
        params["password"] = password
    return params


def trunk_command(client: Any, ns: Any, out: Any, *, stdin: Any, prompt: Any) -> int:
    """`admin trunk ...` and `admin route ...` (errors raise AdminError / UsageError / ConnectionFailed)."""
    from .admin import new_op_id, render_table

    result: Any
    human: str
    method = f"{ns.group}.{ns.command}"
    if ns.command == "list":
        result = client.call(method)
        if ns.group == "trunk":
            human = render_table(_trunk_rows(result["trunks"]), _TRUNK_COLUMNS) if result["trunks"] else (
                "no trunks")
        else:
            rows = [{**r, "prepend": r.get("prepend") or None} for r in result["routes"]]
            human = render_table(rows, _ROUTE_COLUMNS) if rows else (
                "no routes: numbers that are not local extensions get 404")
    elif ns.command == "get":
        result = client.call(method, {"name": ns.name})
        lines = [render_table(_trunk_rows([result]), _TRUNK_COLUMNS), ""]
        lines += [f"peer {_peer_cell(h)}: rtt {h.get('rtt_ms') if h.get('rtt_ms') is not None else '-'} ms, "
                  f"last status {h.get('last_status') or '-'}, last error {h.get('last_error') or '-'}"
                  for h in result.get("health") or []]
        if isinstance(result.get("registration"), dict):
            lines.append(_registration_line(result["registration"]))
        lines.append(f"routes: {', '.join(result.get('routes') or []) or 'none'}")
        human = "\n".join(lines)
    elif ns.command == "test":
        result = client.call(method, {"number": ns.number})
        if result["target"] == "extension":
            human = f"{ns.number} is a local extension (extensions win over routes)"
        elif result["target"] == "none":
            human = f"{ns.number}: no route (the caller gets 404)"
        else:
            human = (f"{ns.number}: route {result['route']} -> trunk {result['trunk']} as {result['send']}; "
                     f"peers in order: {', '.join(result['peers'])}")
    else:
        if ns.command == "delete":
            params: dict[str, Any] = {"name": ns.name}
        elif ns.group == "trunk":
            params = _trunk_params(ns, stdin=stdin, prompt=prompt)
        else:
            params = {"name": ns.name}
            for key in ("pattern", "trunk", "strip", "prepend", "order"):
                if getattr(ns, key) is not None:
                    params[key] = getattr(ns, key)
        # The op_id makes the client's retries (not leader, unknown outcome) apply at most once.
        params["op_id"] = ns.op_id or new_op_id()
        result = client.call(method, params)
        verb = {"add": "created", "update": "updated", "delete": "deleted"}[ns.command]
        human = f"{ns.group} {ns.name} {verb}" + (" (duplicate: applied before)" if result.get("status") ==
                                                   "duplicate" else "")
    if ns.json:
        import orjson

        out.write(orjson.dumps(result, option=orjson.OPT_INDENT_2).decode() + "\n")
    else:
        out.write(human + "\n")
    return 0


def _run_restore(ns: argparse.Namespace) -> int:
    from .backup import BackupError, restore_backup
    from .config import ConfigError, load_config
    from .replication import ReplicationError

    try:
        config = load_config(ns.config, env=os.environ, overrides={})
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    try:
        with open(ns.file, "rb") as fh:
            data = fh.read()
        manifest = restore_backup(config, data)
    except OSError as exc:
        print(f"restore error: {ns.file}: {exc.strerror}", file=sys.stderr)
        return 1
    except (BackupError, ReplicationError) as exc:
        print(f"restore error: {exc}", file=sys.stderr)
        return 1
    print(f"restored node {config.node_id} into {config.data_dir}: applied index {manifest['applied_index']}, "
          f"{manifest['extensions']} extensions, digest {manifest['digest']}, "
          f"call history {'included' if 'cdr' in manifest['parts'] else 'absent'}")
    return 0


def _run_demo(ns: argparse.Namespace) -> int:
    from .demo import DemoError, run_demo, stop_demo

    try:
        if ns.stop:
            return stop_demo(ns.workdir)
        return run_demo(ns)
    except DemoError as exc:
        print(f"demo error: {exc}", file=sys.stderr)
        return exc.status


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    ns: Any = parser.parse_args(argv)
    if ns.cmd == "node":
        return _run_node(ns)
    if ns.cmd == "admin":
        return _run_admin(ns)
    if ns.cmd == "restore":
        return _run_restore(ns)
    return _run_demo(ns)


if __name__ == "__main__":
    sys.exit(main())
