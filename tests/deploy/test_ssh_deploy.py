"""deploy/ssh/deploy.sh for real: sshd in three lab hosts, deploy a 3-node cluster in the `ip` service-address
mode, rolling restart under load, the floating address across a partition of the leader.

Lab hosts h1..h3 each run their own sshd (host key and authorized key made here, listening only on the
host's lab address); h4 is the operator's machine that runs deploy.sh, which reaches the hosts through
ssh only (strict host key checking against the keys made here), and the load (SIPp, admin writes); h5 and
h6 hold the pjsua2 phones. The hosts share this machine's filesystem, so each gets its own prefix, config
dir, data dir and run dir under a temp dir (real hosts use /opt/raftpbx, /etc/raftpbx, /var/lib/raftpbx);
they have no systemd, so deploy.sh uses its fallback (setsid and pid files, the node runs as root and its
hook adds the floating address 198.51.100.100/32 to eth0). The hosts have no package index: the dependency
wheels are repacked from this interpreter's installed distributions (tests/deploy/wheelhouse.py);
`deploy.sh INVENTORY build` builds the raftpbx wheel outside the lab (it may need the package index),
deploy.sh ships it from h4.

Needs root (CI runs as root), sshd, sipp, arping and ping; fails, never skips, when the lab cannot be built.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import labkit
import pytest
import wheelhouse
from labkit import Lab, wait_for

from chaos.phone import PhoneProcess

DEPLOY_SH = str(labkit.DEPLOY / "ssh" / "deploy.sh")
NODES = ["h1", "h2", "h3"]
OPERATOR = "h4"
WRITER = str(Path(__file__).with_name("writer.py"))
SIPP = shutil.which("sipp") or "sipp"
SIPP_SCENARIO = Path(__file__).with_name("sipp") / "register_load.xml"
SIP_PASSWORD = "lab-Register-4242"
PHONES = ["h5", "h6"]
SERVICE_IP = "198.51.100.100"
FALLBACK = 1.0  # raft.leader_fallback_timeout (the default)
# Stated margins: a Raft tick, the hook's run time (ip addr add/del, a fork or two) and the watcher's
# reporting, on a shared two-core machine. The overlap (two holders) is the safety figure: 0.36-0.97 s
# measured at load 10-24. The release, counted from the cut, also holds the time since the last majority
# acknowledgement and scheduling delays: 1.15-1.39 s measured at load 10-15, 1.65-1.79 s at load 23-24.
OVERLAP_MARGIN = 0.5
RELEASE_MARGIN = 1.0


@dataclass
class Deployment:
    lab: Lab
    tmp: Path
    inventory: Path
    out: Path
    env: dict[str, str]

    def deploy_sh(self, *args: str, timeout: float = 200.0) -> subprocess.CompletedProcess[str]:
        """deploy.sh run on the operator's lab host, with the wheels built beforehand."""
        proc = self.lab.run(OPERATOR, "bash", DEPLOY_SH, str(self.inventory), *args, check=False,
                            timeout=timeout, env={**self.env, "RAFTPBX_WHEELS_READY": "1"})
        assert proc.returncode == 0, f"deploy.sh {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}"
        return proc

    def admin(self, host: str, *args: str) -> Any:
        """`raftpbx admin --json ...` against the node on `host`, run from the operator's machine."""
        proc = self.lab.run(OPERATOR, sys.executable, "-m", "raftpbx.cli", "admin", "--url",
                            f"http://{self.lab.address(host)}:7002", "--token-file", str(self.out / "token"),
                            "--json", *args, check=False, timeout=30)
        assert proc.returncode == 0, f"raftpbx admin {' '.join(args)} on {host}: {proc.stderr}"
        return json.loads(proc.stdout)

    def rpc(self, host: str, method: str, **params: Any) -> Any:
        """One admin JSON-RPC call to the node on `host`, made from inside the operator's host."""
        token = (self.out / "token").read_text().strip()
        return labkit.rpc(self.lab.namespace(OPERATOR), f"http://{self.lab.address(host)}:7002", token, method,
                          timeout=10.0, **params)

    def pid(self, host: str) -> int:
        return int((self.tmp / host / "run" / f"node{host[1:]}.pid").read_text())


def _keygen(path: Path) -> str:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "rpbx-test", "-f", str(path)],
                   check=True, capture_output=True)
    return Path(f"{path}.pub").read_text().strip()


def _start_sshd(lab: Lab, host: str, tmp: Path, authorized: Path) -> subprocess.Popen[bytes]:
    hdir = tmp / host
    hdir.mkdir(parents=True, exist_ok=True)
    key = hdir / "ssh_host_ed25519_key"
    _keygen(key)
    config = hdir / "sshd_config"
    config.write_text("\n".join([
        f"ListenAddress {lab.address(host)}:22",
        f"HostKey {key}",
        f"PidFile {hdir / 'sshd.pid'}",
        f"AuthorizedKeysFile {authorized}",
        "StrictModes no",  # the temp dir's modes are pytest's
        "UsePAM no",
        "PasswordAuthentication no",
        "KbdInteractiveAuthentication no",
        "PubkeyAuthentication yes",
        "PermitRootLogin prohibit-password",
        "LogLevel ERROR",
        "",
    ]))
    Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege separation directory
    log = (hdir / "sshd.log").open("ab")
    return lab.popen(host, ["/usr/sbin/sshd", "-D", "-e", "-f", str(config)], stdout=log, stderr=log)


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    labkit.require_lab_tools("ssh", "ssh-keygen", "sshd", "sipp", "arping", "ping")
    tmp = tmp_path_factory.mktemp("deploy")
    wheels = tmp / "wheelhouse"
    wheelhouse.build_wheelhouse(wheels)
    with Lab(6) as lab:
        client_key = tmp / "client_key"
        authorized = tmp / "authorized_keys"
        authorized.write_text(_keygen(client_key) + "\n")
        sshds = [_start_sshd(lab, h, tmp, authorized) for h in NODES]
        known = [f"{lab.address(h)} {(tmp / h / 'ssh_host_ed25519_key.pub').read_text().strip()}" for h in NODES]
        (tmp / "known_hosts").write_text("\n".join(known) + "\n")
        ssh_config = tmp / "ssh_config"
        ssh_config.write_text("\n".join([
            "Host *",
            "  User root",
            f"  IdentityFile {client_key}",
            "  IdentitiesOnly yes",
            f"  UserKnownHostsFile {tmp / 'known_hosts'}",
            "  GlobalKnownHostsFile /dev/null",
            "  StrictHostKeyChecking yes",
            "  LogLevel ERROR",
            "",
        ]))
        python = os.path.realpath(getattr(sys, "_base_executable", sys.executable))
        hosts = "\n".join(
            f'[[hosts]]\nid = "node{h[1:]}"\nssh = "root@{lab.address(h)}"\naddress = "{lab.address(h)}"\n'
            f'prefix = "{tmp / h / "opt"}"\nconfig_dir = "{tmp / h / "etc"}"\n'
            f'data_dir = "{tmp / h / "var"}"\nrun_dir = "{tmp / h / "run"}"\n'
            for h in NODES)
        inventory = tmp / "lab.toml"
        inventory.write_text(f'[cluster]\ndomain = "lab.example"\nservice_address = "198.51.100.100:5060"\nservice_mode = "ip"\n'
                             f'interface = "eth0"\npython = "{python}"\nsystemd = "no"\n\n'
                             # SIPp 3.6 answers MD5 challenges only; its load registers many contacts per user.
                             f'[settings]\n"sip.digest_algorithms" = ["MD5"]\n"sip.max_contacts" = 500\n\n{hosts}')
        env = {"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"), "HOME": str(tmp),
               "RAFTPBX_DEPLOY_OUT": str(tmp / "out"), "RAFTPBX_SSH_CONFIG": str(ssh_config),
               "RAFTPBX_WHEELHOUSE": str(wheels), "PYTHON": sys.executable}
        dep = Deployment(lab, tmp, inventory, tmp / "out", env)
        # The build step runs here, outside the lab: building the wheel may need the package index
        # (pip's isolated build fetches setuptools), which the lab hosts cannot reach by design.
        build = subprocess.run(["bash", DEPLOY_SH, str(inventory), "build"], capture_output=True, text=True,
                               env={**os.environ, **env}, timeout=180)
        assert build.returncode == 0, f"deploy.sh build failed:\n{build.stdout}\n{build.stderr}"
        assert list((tmp / "out" / "wheels").glob("raftpbx-*.whl"))
        ssh = ["ssh", "-F", str(ssh_config), "-o", "BatchMode=yes"]
        for h in NODES:
            wait_for(lambda h=h: lab.run(OPERATOR, *ssh, f"root@{lab.address(h)}", "true", check=False,
                                         timeout=10).returncode == 0, 15, f"sshd on {h}")
        try:
            yield dep
        finally:
            lab.run(OPERATOR, "bash", DEPLOY_SH, str(inventory), "stop", check=False, timeout=90, env=env)
            for proc in sshds:
                proc.terminate()
                proc.wait(timeout=10)


def test_deploy_installs_configures_and_starts_a_healthy_cluster(deployment: Deployment) -> None:
    dep = deployment
    proc = dep.deploy_sh(timeout=240)
    assert "healthy: leader" in proc.stdout
    assert "bootstrapping a new cluster of 3 nodes" in proc.stderr
    for h in NODES:
        etc = dep.tmp / h / "etc"
        for name in ("secret", "token", f"node{h[1:]}.toml"):
            assert (etc / name).stat().st_mode & 0o777 == 0o600, f"{h}: {name} is not mode 0600"
        assert (dep.tmp / h / "var").stat().st_mode & 0o777 == 0o700
        assert not (etc / f"node{h[1:]}.env").exists()
        assert (dep.tmp / h / "opt" / "venv" / "bin" / "raftpbx").exists()
        # The wheel deploy.sh built has the cores compiled (setup.py; this machine has a C compiler).
        sip = next((dep.tmp / h / "opt" / "venv").glob("lib/python3*/site-packages/raftpbx/transport/sip"))
        assert list(sip.glob("message.*.so")), f"{h}: the SIP parser was installed uncompiled"
        hook = (dep.tmp / h / "opt" / "hooks" / "service-address").stat()
        assert (hook.st_mode & 0o777, hook.st_uid) == (0o755, 0)  # the ip mode's hook, root's
        assert not (dep.tmp / h / "opt" / "stage" / "secret").exists()
    status = dep.admin("h1", "cluster", "status")
    assert status["leader"] and len(status["nodes"]) == 3 and all(n["healthy"] for n in status["nodes"])
    # The nodes really run in their hosts: each one's admin address is its own lab address.
    assert {n["admin_url"] for n in status["nodes"]} >= {f"http://{dep.lab.address(h)}:7002" for h in NODES[1:]}

    dep.admin("h2", "ext", "create", "5001", "--password", "correct-horse-battery", "--display-name", "Lab")
    for h in NODES:
        got = wait_for(lambda h=h: dep.admin(h, "ext", "get", "5001"), 10, f"extension 5001 on {h}")
        assert got["display_name"] == "Lab"

    # A second deploy is idempotent: nothing restarts, nothing bootstraps, the cluster stays healthy.
    pids = {h: dep.pid(h) for h in NODES}
    proc = dep.deploy_sh(timeout=240)
    assert "bootstrapping" not in proc.stderr
    assert {h: dep.pid(h) for h in NODES} == pids


def _sipp_load(dep: Deployment, host: str, n: int, users: list[str]) -> tuple[subprocess.Popen[bytes], Path]:
    """A SIPp REGISTER stream (5 per second) from the operator's host to the node on `host`."""
    folder = dep.tmp / f"sipp-{host}-{uuid.uuid4().hex[:6]}"
    folder.mkdir()
    with open(folder / "users.csv", "w") as fh:
        fh.write("SEQUENTIAL\n")
        for user in users:
            fh.write(f"{user};[authentication username={user} password={SIP_PASSWORD}];\n")
    argv = [SIPP, f"{dep.lab.address(host)}:5060", "-sf", str(SIPP_SCENARIO), "-inf", str(folder / "users.csv"),
            "-t", "u1", "-i", dep.lab.address(OPERATOR), "-p", str(5070 + n), "-mp", str(6000 + 10 * n),
            "-r", "5", "-m", "2000", "-l", "50", "-timeout", "200s", "-recv_timeout", "4000",
            "-max_recv_loops", "1000", "-nostdin", "-trace_logs", "-log_file", str(folder / "acked.log"),
            "-trace_err", "-error_file", str(folder / "errors.log"), "-trace_screen", "-screen_file",
            str(folder / "screen.log")]
    log = (folder / "sipp.out").open("ab")
    return dep.lab.popen(OPERATOR, argv, stdout=log, stderr=log, cwd=folder), folder / "acked.log"


def _sipp_acked(path: Path) -> set[tuple[str, str]]:
    """(extension, contact user) of every REGISTER that got its 200."""
    if not path.exists():
        return set()
    return {(p[1], p[2]) for p in (line.split() for line in path.read_text().splitlines())
            if len(p) == 3 and p[0] == "acked"}


def _bindings(dep: Deployment, host: str) -> set[tuple[str, str]]:
    """(extension, contact user) of every live binding, as the node on `host` sees them."""
    out: set[tuple[str, str]] = set()
    offset: int | None = 0
    while offset is not None:
        page = dep.rpc(host, "binding.list", offset=offset)
        out |= {(b["extension"], b["contact"].split(":", 1)[1].split("@", 1)[0]) for b in page["bindings"]}
        offset = page["next_offset"]
    return out


def test_rolling_restart_under_register_load_loses_no_acknowledged_write(deployment: Deployment) -> None:
    dep = deployment
    if not (dep.tmp / "h1" / "run" / "node1.pid").exists():  # this test run alone
        dep.deploy_sh(timeout=240)
    pids = {h: dep.pid(h) for h in NODES}
    users = {h: [f"3{n}{i:02d}" for i in range(1, 11)] for n, h in enumerate(NODES, 1)}
    for ext in itertools.chain(*users.values()):
        dep.rpc("h1", "extension.create", extension=ext, password=SIP_PASSWORD, op_id=f"reg-{ext}")
    acks, stop = dep.tmp / f"acks-{uuid.uuid4().hex}", dep.tmp / f"stop-{uuid.uuid4().hex}"
    acks.touch()
    errlog = (dep.tmp / "writer.log").open("ab")
    writer = dep.lab.popen(OPERATOR, [sys.executable, WRITER, str(dep.out / "cluster.json"), str(acks),
                                      str(stop), "60000"], stdout=errlog, stderr=errlog)
    loads = [_sipp_load(dep, h, n, users[h]) for n, h in enumerate(NODES, 1)]
    try:
        wait_for(lambda: len(acks.read_text().split()) >= 10, 30, "the first acknowledged admin writes")
        for _, log in loads:
            wait_for(lambda log=log: len(_sipp_acked(log)) >= 5, 30, f"the first registrations ({log.parent.name})")
        t0 = time.monotonic()
        proc = dep.deploy_sh("rolling-restart", timeout=200)
        took = time.monotonic() - t0
        restarted = len(acks.read_text().split())
        registered = [len(_sipp_acked(log)) for _, log in loads]
        wait_for(lambda: len(acks.read_text().split()) >= restarted + 10, 30, "admin writes after the restart")
        for (_, log), before in zip(loads, registered, strict=True):
            wait_for(lambda log=log, b=before: len(_sipp_acked(log)) >= b + 5, 30, "registrations after the restart")
    finally:
        stop.touch()
        for sipp, _ in loads:
            if sipp.poll() is None:
                sipp.send_signal(signal.SIGUSR1)  # SIPp: stop placing calls, finish, write its logs, exit
        for sipp, _ in loads:
            try:
                sipp.wait(timeout=30)
            except subprocess.TimeoutExpired:
                sipp.kill()
                sipp.wait(timeout=10)
        writer.wait(timeout=30)
    assert proc.stderr.count("caught up") + proc.stdout.count("caught up") == 3, proc.stdout + proc.stderr
    assert all(dep.pid(h) != pids[h] for h in NODES), "every node was restarted"

    acked = set(acks.read_text().split())
    registrations = set().union(*(_sipp_acked(log) for _, log in loads))
    assert len(acked) >= 20 and len(registrations) >= 30
    digests: dict[str, tuple[int, str]] = {}

    def converged() -> bool:
        for h in NODES:
            d = dep.rpc(h, "state.digest")
            digests[h] = (d["applied_index"], d["digest"])
        return len(set(digests.values())) == 1

    wait_for(converged, 20, "equal applied indexes and digests on every node")
    for h in NODES:
        listed = {e["extension"] for e in dep.admin(h, "ext", "list")["extensions"]}
        missing = acked - listed
        assert not missing, f"{h} lost acknowledged admin writes: {sorted(missing)[:10]}"
        lost = registrations - _bindings(dep, h)
        assert not lost, f"{h} lost acknowledged registrations: {sorted(lost)[:10]}"
    print(f"\nrolling restart under load: {took:.1f} s; {len(acked)} admin writes and {len(registrations)} "
          f"REGISTERs acknowledged, none lost")


class AddressWatch:
    """`ip -4 -o monitor address` in every node host: when SERVICE_IP was added to / deleted from each
    host, stamped with this process's monotonic clock as each line arrives."""

    def __init__(self, dep: Deployment) -> None:
        self.events: list[tuple[float, str, str]] = []  # (when, host, "add" | "del")
        self._lock = threading.Lock()
        self._procs = [(h, dep.lab.popen(h, ["ip", "-4", "-o", "monitor", "address", "dev", "eth0"],
                                         stdout=subprocess.PIPE, text=True)) for h in NODES]
        self._threads = [threading.Thread(target=self._read, args=(h, p), daemon=True) for h, p in self._procs]
        for t in self._threads:
            t.start()

    def _read(self, host: str, proc: subprocess.Popen[str]) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            if f" {SERVICE_IP}/" in line:
                with self._lock:
                    self.events.append((time.monotonic(), host, "del" if line.startswith("Deleted") else "add"))

    def first(self, kind: str, host: str | None = None, after: float = 0.0, not_host: str | None = None) -> float | None:
        with self._lock:
            return next((t for t, h, k in self.events if k == kind and t >= after and (host is None or h == host)
                         and h != not_host), None)

    def close(self) -> None:
        for _, proc in self._procs:
            proc.terminate()
            proc.wait(timeout=10)


def _holds(dep: Deployment, host: str) -> bool:
    out = dep.lab.run(host, "ip", "-4", "-o", "addr", "show", "dev", "eth0").stdout
    return f" {SERVICE_IP}/" in out


def _mac(host: str) -> str:
    return f"02:52:50:00:00:{int(host[1:]):02x}"  # lab.sh's MAC of host hN


def _neighbour(dep: Deployment, host: str) -> str | None:
    """The MAC that `host`'s ARP cache holds for the service address."""
    words = dep.lab.run(host, "ip", "-4", "neigh", "show", SERVICE_IP, "dev", "eth0").stdout.split()
    return words[words.index("lladdr") + 1] if "lladdr" in words else None


def _phone(dep: Deployment, host: str) -> PhoneProcess:
    """A pjsua2 phone process inside lab host `host`, bound to its lab address."""
    phone: PhoneProcess = labkit.lab_phone(dep.lab, host, dep.tmp)
    return phone


def _register(phone: PhoneProcess, ext: str) -> None:
    phone.transports(udp=True)
    mark = phone.mark()
    phone.account_add(ext, f"sip:{ext}@lab.example", registrar=f"sip:{SERVICE_IP}:5060", register=True,
                      user=ext, password=SIP_PASSWORD, expires=300)
    state = phone.wait_event(lambda e: e["event"] == "reg_state" and e.get("account") == ext, 10.0, since=mark)
    assert state["code"] == 200 and state["active"], state


def _call_through_service_address(a: PhoneProcess, b: PhoneProcess, callee: str) -> float:
    """A calls B's extension at the service address; B answers; A hangs up. Returns the setup time (s)."""
    mark_b = b.mark()
    start = time.monotonic()
    call_a = a.call("2001", f"sip:{callee}@{SERVICE_IP}:5060")
    call_b = b.wait_incoming(timeout=10, since=mark_b)["call"]
    a.wait_call_state(call_a, "confirmed", timeout=10)
    setup = time.monotonic() - start
    b.wait_call_state(call_b, "confirmed", timeout=10)
    a.bye(call_a)
    assert a.wait_event(lambda e: e["event"] == "bye_result" and e.get("call") == call_a, 10)["code"] == 200
    b.wait_call_state(call_b, "disconnected", timeout=10)
    return setup


def test_floating_service_address_follows_the_leader_across_a_partition(deployment: Deployment) -> None:
    dep = deployment
    if not (dep.tmp / "h1" / "run" / "node1.pid").exists():  # this test run alone
        dep.deploy_sh(timeout=240)
    by_id = {f"node{h[1:]}": h for h in NODES}
    status = wait_for(lambda: (s := dep.rpc("h1", "cluster.status"))["service_address"]["holder"] and s, 15,
                      "a holder of the service address")
    old = by_id[status["leader"]]
    assert status["service_address"]["holder"] == status["leader"]
    assert status["service_address"]["mode"] == "ip"
    assert [h for h in NODES if _holds(dep, h)] == [old], "the address is on the leader's host only"

    for ext in ("2001", "2002"):
        dep.rpc(old, "extension.create", extension=ext, password=SIP_PASSWORD, op_id=f"svc-{ext}")
    watch = AddressWatch(dep)
    a, b = _phone(dep, PHONES[0]), _phone(dep, PHONES[1])
    try:
        PhoneProcess.start_all([a, b])
        _register(a, "2001")
        _register(b, "2002")
        b.auto_answer("2002", 200)
        first_setup = _call_through_service_address(a, b, "2002")

        # A bystander (the operator's host) learns the address's MAC now, then sends nothing to it: only a
        # gratuitous ARP can change its entry to the next holder's MAC.
        dep.lab.run(OPERATOR, "ping", "-c", "1", "-W", "2", SERVICE_IP)
        assert _neighbour(dep, OPERATOR) == _mac(old)

        others = [h for h in NODES if h != old]
        t_cut, t_cut_wall = time.monotonic(), time.time()
        dep.lab.partition([old], others=others)  # the phones and the operator still reach every host
        t_new = wait_for(lambda: watch.first("add", after=t_cut, not_host=old), 10, "the address on another host")
        t_del = wait_for(lambda: watch.first("del", host=old, after=t_cut), 10, "the old leader releasing it")
        new = next(h for t, h, k in watch.events if k == "add" and t == t_new)
        takeover, release = t_new - t_cut, t_del - t_cut
        overlap = max(0.0, t_del - t_new)
        figures = f"takeover {takeover:.2f} s, release {release:.2f} s, overlap {overlap:.2f} s after the cut"
        assert takeover <= 2.0, f"the new leader took the address too late: {figures}"
        # Serving means bound too, after the hook returned: its background arping (3 announcements over 2 s)
        # once held the bind back ~3 s after the address was on the interface.
        service = wait_for(lambda: (info := dep.rpc(new, "node.info")["service"])["held"] and info, 10,
                           "the new leader serving the address")
        serving = float(service["since"]) - t_cut_wall
        assert serving <= 2.0, f"the new leader served the address only {serving:.2f} s after the cut: {figures}"
        assert overlap <= FALLBACK + OVERLAP_MARGIN, \
            f"two hosts held {SERVICE_IP} too long (bound {FALLBACK} + {OVERLAP_MARGIN} s): {figures}"
        assert release <= FALLBACK + RELEASE_MARGIN, \
            f"the old leader released the address too late (bound {FALLBACK} + {RELEASE_MARGIN} s): {figures}"
        assert _holds(dep, new) and not _holds(dep, old)
        wait_for(lambda: _neighbour(dep, OPERATOR) == _mac(new), 5, "the new holder's gratuitous ARP at a bystander")
        # The cut-off old leader refuses writes; the majority side takes them.
        with pytest.raises(labkit.RpcFailure) as refused:
            dep.rpc(old, "extension.create", extension="2999", password=SIP_PASSWORD, op_id="svc-2999")
        dep.rpc(new, "extension.create", extension="2003", password=SIP_PASSWORD, op_id="svc-2003")
        # The phones follow the address (gratuitous ARP) to the new leader, which has their registrations.
        second_setup = _call_through_service_address(a, b, "2002")

        dep.lab.heal()
        digests: dict[str, tuple[int, str]] = {}

        def converged() -> bool:
            for h in NODES:
                d = dep.rpc(h, "state.digest")
                digests[h] = (d["applied_index"], d["digest"])
            return len(set(digests.values())) == 1

        wait_for(converged, 30, "equal digests on every node after healing")

        # The old leader comes back with a higher term (it kept calling elections while cut off), which
        # may force one more election: wait for the settled state, then exactly the leader's host holds it.
        def one_holder() -> str | None:
            st = dep.rpc(old, "cluster.status")
            holders = [h for h in NODES if _holds(dep, h)]
            leader = st["leader"]
            ok = leader and st["service_address"]["holder"] == leader and holders == [by_id[leader]]
            return by_id[leader] if ok else None

        final = wait_for(one_holder, 10, "exactly one holder, the leader, after healing")
        assert a.errors() == [] and b.errors() == []
    finally:
        dep.lab.heal()
        a.close()
        b.close()
        watch.close()
    print(f"\nip mode in the lab: new leader took {SERVICE_IP} {takeover:.2f} s after the cut (serving it after "
          f"{serving:.2f} s), old leader released "
          f"it after {release:.2f} s, overlap {overlap:.2f} s (leader fallback {FALLBACK} s); old leader refused "
          f"a write ({refused.value.message}); call setup through the address {first_setup:.2f} s before, "
          f"{second_setup:.2f} s after the failover; after healing {final} holds it")


def test_a_wiped_node_is_refused_by_deploy_and_replaced_by_deploy_replace(deployment: Deployment) -> None:
    dep = deployment
    if not (dep.tmp / "h1" / "run" / "node1.pid").exists():  # this test run alone
        dep.deploy_sh(timeout=240)
    leader = dep.rpc("h1", "cluster.status")["leader"]
    victim = next(h for h in NODES if f"node{h[1:]}" != leader)
    os.kill(dep.pid(victim), signal.SIGKILL)
    shutil.rmtree(dep.tmp / victim / "var")  # the data disk is gone
    dep.rpc(next(h for h in NODES if h != victim), "extension.create", extension="4444", password=SIP_PASSWORD,
            op_id="wiped-4444")

    refused = dep.lab.run(OPERATOR, "bash", DEPLOY_SH, str(dep.inventory), check=False, timeout=240,
                          env={**dep.env, "RAFTPBX_WHEELS_READY": "1"})
    assert refused.returncode == 1 and "refusing to start them as members" in refused.stderr, refused.stderr
    assert not (dep.tmp / victim / "var" / "raftpbx-node.json").exists(), "the wiped node was not started"

    t0 = time.monotonic()
    proc = dep.deploy_sh("replace", f"node{victim[1:]}", timeout=240)
    took = time.monotonic() - t0
    assert f"node{victim[1:]} caught up" in proc.stdout + proc.stderr
    members = dep.rpc(victim, "cluster.members")["members"]
    assert sorted(m["id"] for m in members) == ["node1", "node2", "node3"]
    assert dep.rpc(victim, "extension.get", extension="4444")["extension"] == "4444"
    again = dep.lab.run(OPERATOR, "bash", DEPLOY_SH, str(dep.inventory), "replace", f"node{victim[1:]}",
                        check=False, timeout=240, env={**dep.env, "RAFTPBX_WHEELS_READY": "1"})
    assert again.returncode == 1 and "data dir is not empty" in again.stderr, again.stderr
    digests: dict[str, tuple[int, str]] = {}

    def converged() -> bool:
        for h in NODES:
            d = dep.rpc(h, "state.digest")
            digests[h] = (d["applied_index"], d["digest"])
        return len(set(digests.values())) == 1

    wait_for(converged, 20, "equal digests after the replacement")
    print(f"\ndeploy.sh replace of a wiped node (install, remove, add, join, catch up): {took:.1f} s")
