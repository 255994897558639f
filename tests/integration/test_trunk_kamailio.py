"""Issue 9 against another vendor's PBX: a raftpbx 3-node cluster and Kamailio 5.6 joined by a trunk.

Real processes on loopback only: a raftpbx cluster with its service address (nodecluster.running_pbx),
Kamailio (the Debian package, `/usr/sbin/kamailio`) started here in the foreground as a small peer PBX from
tests/integration/kamailio/peer-pbx.cfg.tmpl on its own address (the cluster's /24, .5) and port, and pjsua2
phones (chaos/phone.py) on both sides:

    raftpbx: extensions 1xxx; trunk `kamailio` (peer = Kamailio's address, allow = Kamailio's address /32,
             credentials for Kamailio's realm, register_expires 60); route 3XXX -> kamailio
    Kamailio: extensions 3xxx (digest auth, usrloc in memory); every INVITE challenged (407) unless it
             authenticates, as a phone or as raftpbx's trunk user; 1xxx relayed to raftpbx's service address

Checked:
* raftpbx registers with Kamailio (leader only, Contact = service address): the binding is in Kamailio's
  usrloc (`kamcmd ul.dump`), the leader's `trunk.get` says registered and the followers standby; after a
  leadership transfer the new leader refreshes the same binding (same Call-ID, higher CSeq), and so does the
  leader elected after a kill -9 of the old one (the killed node then restarts from its data dir);
* Kamailio's phone 3001 calls raftpbx's 1001: accepted without a challenge because of the allow-list,
  answered, RTP both ways, the caller hangs up (BYE 200), the record says trunk kamailio, inbound, on
  every node;
* raftpbx's 1002 calls Kamailio's 3002: raftpbx routes 3XXX to the trunk, Kamailio challenges, raftpbx
  answers with the trunk's credentials (Kamailio logs "authenticated as <trunk user>"), answered, RTP both
  ways, the callee hangs up (and, in a second run, the caller: its BYE crosses raftpbx's CSeq translation),
  BYE 200, the record says trunk kamailio, outbound;
* the caller CANCELs a ringing Kamailio phone through the challenged trunk: 487 on both sides, record
  cancelled;
* a wrong trunk password shows as a refused registration (trunk.get, /metrics); the right one registers again.

Kamailio is killed in teardown (its process group: it forks its children), whatever happened.
Every wait polls a condition against a deadline.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from nodecluster import Cluster, Node, create_extension, phone_group, running_pbx, sip_probe, wait_for

from chaos.phone import PhoneProcess, poll_until

pytestmark = [pytest.mark.integration, pytest.mark.timeout(240)]

HERE = Path(__file__).parent
TEMPLATE = HERE / "kamailio" / "peer-pbx.cfg.tmpl"
KAMAILIO = shutil.which("kamailio") or "/usr/sbin/kamailio"
KAMCMD = shutil.which("kamcmd") or "/usr/sbin/kamcmd"

DOMAIN = "test.raftpbx.local"  # raftpbx's SIP domain (nodecluster's default)
KAM_REALM = "kamailio.test"
KAM_PORT = 5080
TRUNK = "kamailio"
TRUNK_USER = "raftpbx-office"
TRUNK_PASSWORD = "trunk-" + secrets.token_hex(8)
PASSWORD = "call-Secret-42"  # raftpbx extensions
KAM_USERS = {"3001": "kam-" + secrets.token_hex(6), "3002": "kam-" + secrets.token_hex(6)}
REGISTER_EXPIRES = 60


# --- Kamailio as the peer PBX ---------------------------------------------------------------------------------


def _udp_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


class KamailioPeer:
    """Kamailio 5.6 in the foreground (`-DD -E`) with a rendered peer-PBX config; runtime files in `root`."""

    def __init__(self, root: Path, ip: str, port: int, raftpbx: tuple[str, int]) -> None:
        self.root = root
        self.ip = ip
        self.port = port
        self.raftpbx = raftpbx
        # A unix socket path must fit in 108 bytes: a short folder of its own rather than under tmp_path.
        self.ctl_dir = Path(tempfile.mkdtemp(prefix="kam-ctl-"))
        self.ctl = self.ctl_dir / "kamailio.ctl"
        self.config = root / "kamailio.cfg"
        self.log_path = root / "kamailio.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def render(self) -> str:
        users = {**KAM_USERS, TRUNK_USER: TRUNK_PASSWORD}
        credentials = "\n".join(
            f'\t$sht(cred=>{user}) = "{hashlib.md5(f"{user}:{KAM_REALM}:{password}".encode()).hexdigest()}";'
            for user, password in users.items())
        values = {
            "KAM_IP": self.ip, "KAM_PORT": str(self.port), "REALM": KAM_REALM, "CTL_SOCK": str(self.ctl),
            "AUTH_SECRET": secrets.token_hex(16), "CREDENTIALS": credentials, "TRUNK_USER": TRUNK_USER,
            "RAFTPBX_HOST": self.raftpbx[0], "RAFTPBX_PORT": str(self.raftpbx[1]),
        }
        text = TEMPLATE.read_text()
        for key, value in values.items():
            text = text.replace(f"@{key}@", value)
        assert re.search(r"@[A-Z_]+@", text) is None, "unfilled template field"
        return text

    def start(self) -> None:
        assert os.access(KAMAILIO, os.X_OK), "kamailio is not installed: run scripts/bootstrap.sh --test"
        assert _udp_free(self.ip, self.port), f"{self.ip}:{self.port} is in use"
        self.root.mkdir(parents=True, exist_ok=True)
        (self.root / "run").mkdir(exist_ok=True)
        self.config.write_text(self.render())
        check = subprocess.run([KAMAILIO, "-c", "-f", str(self.config)], capture_output=True, text=True,
                               timeout=30, check=False)
        assert check.returncode == 0, f"kamailio refused its config:\n{check.stderr[-3000:]}"
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [KAMAILIO, "-DD", "-E", "-f", str(self.config), "-Y", str(self.root / "run"), "-n", "2",
                 "-m", "64", "-M", "8"],
                cwd=self.root, stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)

        def up() -> bool:
            assert self.proc is not None and self.proc.poll() is None, f"kamailio exited:\n{self.log_tail()}"
            return sip_probe(self.ip, self.port, KAM_REALM) and self.ctl.exists()

        wait_for(up, 20.0, "kamailio answering OPTIONS", interval=0.1)

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            shutil.rmtree(self.ctl_dir, ignore_errors=True)
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)  # the group we created: Kamailio's main and its children
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # children that outlived their main process
        shutil.rmtree(self.ctl_dir, ignore_errors=True)

    def log_tail(self, lines: int = 40) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        return ""

    def log_text(self) -> str:
        with contextlib.suppress(OSError):
            return self.log_path.read_text(errors="replace")
        return ""

    def ul_dump(self) -> dict[str, list[dict[str, str]]]:
        """usrloc's bindings (`kamcmd ul.dump`): AoR -> its contacts as {field: value}."""
        out = subprocess.run([KAMCMD, "-s", f"unix:{self.ctl}", "ul.dump"], capture_output=True, text=True,
                             timeout=10, check=True).stdout
        bindings: dict[str, list[dict[str, str]]] = {}
        aor: str | None = None
        contact: dict[str, str] | None = None
        for line in out.splitlines():
            key, sep, value = line.strip().partition(": ")
            if not sep:
                continue
            if value == "{" or key == "Domain":  # the end of the contacts: a block of statistics follows
                contact = None
            elif key == "AoR":
                aor = value
                bindings[aor] = []
            elif key == "Address" and aor is not None:
                contact = {"Address": value}
                bindings[aor].append(contact)
            elif contact is not None:
                contact[key] = value
        return bindings


@dataclass
class Setup:
    cluster: Cluster
    kamailio: KamailioPeer

    @property
    def service(self) -> tuple[str, int]:
        assert self.cluster.service_ip is not None
        return self.cluster.service_ip, 5060


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    root = tmp_path_factory.mktemp("kamailio-trunk")
    settings = {"raft.proposal_timeout": 3.0, "trunks.ping_interval": 1.0}
    (root / "raftpbx").mkdir()
    with running_pbx(root / "raftpbx", settings, DOMAIN) as cluster:
        assert cluster.service_ip is not None
        prefix = cluster.service_ip.rsplit(".", 1)[0]
        kamailio = KamailioPeer(root / "kamailio", f"{prefix}.5", KAM_PORT, (cluster.service_ip, 5060))
        try:
            kamailio.start()
            leader = cluster.wait_leader()
            peer = f"{kamailio.ip}:{kamailio.port}"
            leader.call("trunk.add", name=TRUNK, peers=[peer], allow=[f"{kamailio.ip}/32"], username=TRUNK_USER,
                        realm=KAM_REALM, password=TRUNK_PASSWORD, register_expires=REGISTER_EXPIRES)
            leader.call("route.add", name="to-kamailio", pattern="3XXX", trunk=TRUNK)
            for node in cluster.nodes:
                def ready(n: Node = node) -> bool:
                    trunk = n.call("trunk.get", name=TRUNK)
                    return n.call("route.test", number="3001").get("trunk") == TRUNK and \
                        [h["state"] for h in trunk["health"]] == ["up"]

                wait_for(ready, 20.0, f"{node.id}: route to {TRUNK} and Kamailio up", interval=0.1)
            yield Setup(cluster, kamailio)
        finally:
            kamailio.stop()


# --- helpers -----------------------------------------------------------------------------------------------


@pytest.fixture
def phones(setup: Setup, tmp_path: Path) -> Iterator[Callable[[int], list[PhoneProcess]]]:
    with phone_group(setup.cluster, tmp_path) as make:
        yield make


def register(phone: PhoneProcess, account: str, uri: str, registrar: str, user: str, password: str) -> None:
    phone.transports(udp=True, tcp=False)
    mark = phone.mark()
    phone.account_add(account, uri, transport="udp", registrar=registrar, register=True, user=user,
                      password=password, expires=300)
    state = phone.wait_event(lambda e: e["event"] == "reg_state" and e.get("account") == account, 8.0, since=mark)
    assert state["code"] == 200 and state["active"], state


def raftpbx_phone(setup: Setup, phone: PhoneProcess, ext: str) -> None:
    host, port = setup.service
    register(phone, "r", f"sip:{ext}@{DOMAIN}", f"sip:{host}:{port}", ext, PASSWORD)


def kamailio_phone(setup: Setup, phone: PhoneProcess, ext: str) -> None:
    k = setup.kamailio
    register(phone, "k", f"sip:{ext}@{KAM_REALM}", f"sip:{k.ip}:{k.port}", ext, KAM_USERS[ext])
    wait_for(lambda: ext in k.ul_dump(), 5.0, f"{ext} in Kamailio's usrloc")


def rtp_both_ways(a: PhoneProcess, call_a: str, b: PhoneProcess, call_b: str) -> None:
    def flowing() -> bool:
        ia, ib = a.call_info(call_a), b.call_info(call_b)
        return bool(min(ia["rx"], ia["tx"], ib["rx"], ib["tx"]) >= 25)

    poll_until(flowing, timeout=10, what="RTP flowing both ways")


def record_everywhere(cluster: Cluster, call_id: str) -> dict[str, Any]:
    """The ended call record of `call_id`, identical on every node."""
    records: dict[str, dict[str, Any]] = {}
    for node in cluster.nodes:
        def ended(n: Node = node) -> bool:
            records[n.id] = n.call("cdr.get", call_id=call_id)
            return records[n.id].get("ended_at") is not None

        wait_for(ended, 10.0, f"the ended record of {call_id} on {node.id}")
    first = records[cluster.nodes[0].id]
    assert all(r == first for r in records.values()), records
    return first


def active_everywhere(cluster: Cluster, call_id: str, expect: tuple[str, str, str, str]) -> None:
    """While the call is up, every node's state has it answered, as (caller, callee, trunk, direction)."""
    for node in cluster.nodes:
        def answered(n: Node = node) -> dict[str, Any] | None:
            calls = n.call("call.active")["calls"]
            call = next((c for c in calls if c["call_id"] == call_id), None)
            return call if call is not None and call["answered_at"] is not None else None

        call = wait_for(answered, 5.0, f"the answered call in {node.id}'s state")
        assert (call["caller"], call["callee"], call["trunk"], call["direction"]) == expect, (node.id, call)


def check_record(record: dict[str, Any], expect: tuple[str, str, str, str], hangup_by: str) -> None:
    assert (record["caller"], record["callee"]) == expect[:2], record
    assert record["disposition"] == "answered" and record["hangup_by"] == hangup_by, record
    assert (record["trunk"], record["direction"]) == expect[2:], record  # the CDR columns of issue 9


def registration(node: Node) -> dict[str, Any]:
    result: dict[str, Any] = node.call("trunk.get", name=TRUNK)["registration"]
    return result


def metrics(node: Node) -> str:
    with urllib.request.urlopen(f"{node.url}/metrics", timeout=5) as response:
        return str(response.read().decode())


def trunk_binding(setup: Setup) -> dict[str, str] | None:
    contacts = setup.kamailio.ul_dump().get(TRUNK_USER, [])
    assert len(contacts) <= 1, contacts  # one registration per cluster, whoever leads
    return contacts[0] if contacts else None


# --- tests ----------------------------------------------------------------------------------------------------


def test_the_leader_registers_with_kamailio_and_the_next_leader_refreshes_the_same_binding(setup: Setup) -> None:
    cluster = setup.cluster
    host, port = setup.service
    binding = wait_for(lambda: trunk_binding(setup), 15.0, "raftpbx's binding in Kamailio's usrloc")
    assert binding["Address"] == f"sip:{TRUNK_USER}@{host}:{port}", binding
    assert int(binding["Expires"]) <= REGISTER_EXPIRES
    leader = cluster.wait_leader()
    status = wait_for(lambda: (r := registration(leader))["state"] == "registered" and r, 10.0, "registered")
    assert status["peer"] == f"{setup.kamailio.ip}:{setup.kamailio.port}" and status["expires"] == REGISTER_EXPIRES
    assert status["call_id"] == binding["Call-ID"] and status["cseq"] == int(binding["CSeq"])
    for follower in cluster.followers(leader):
        assert registration(follower)["state"] == "standby"
    assert f'raftpbx_trunk_registered{{node="{leader.id}",trunk="{TRUNK}"}} 1' in metrics(leader)

    # Leadership moves: the new leader registers the same binding again (same Call-ID, higher CSeq).
    new = cluster.followers(leader)[0]
    before = int(binding["CSeq"])
    started = time.monotonic()
    cluster.transfer_leader(new)
    refreshed = wait_for(lambda: (b := trunk_binding(setup)) is not None and int(b["CSeq"]) > before and b,
                         15.0, "the new leader's registration in Kamailio")
    took = time.monotonic() - started
    assert refreshed["Call-ID"] == binding["Call-ID"] and refreshed["Address"] == binding["Address"]
    wait_for(lambda: registration(new)["state"] == "registered", 5.0, f"{new.id} registered")
    wait_for(lambda: registration(leader)["state"] == "standby", 5.0, f"{leader.id} standby")
    print(f"re-registration after the leadership transfer: {took:.2f} s; binding {refreshed}")
    cluster.transfer_leader(cluster.nodes[0])  # back to the module's layout


def test_kamailio_phone_calls_a_raftpbx_extension_through_the_allow_list(
    setup: Setup, phones: Callable[[int], list[PhoneProcess]]
) -> None:
    cluster, k = setup.cluster, setup.kamailio
    ext = create_extension(cluster, "1001", PASSWORD)
    kam, ours = phones(2)
    kamailio_phone(setup, kam, "3001")
    raftpbx_phone(setup, ours, ext)
    ours.auto_answer("r", 200, delay=0.2)

    call_k = kam.call("k", f"sip:{ext}@{k.ip}:{k.port}")
    call_r = ours.wait_incoming("r", timeout=10)["call"]
    kam.wait_call_state(call_k, "confirmed", timeout=10)
    ours.wait_call_state(call_r, "confirmed", timeout=10)
    rtp_both_ways(kam, call_k, ours, call_r)
    sip_call_id = ours.call_info(call_r)["sip_call_id"]
    expect = ("3001", ext, TRUNK, "inbound")
    active_everywhere(cluster, sip_call_id, expect)
    kam.bye(call_k)
    result = kam.wait_event(lambda e: e["event"] == "bye_result" and e.get("call") == call_k, 10)
    assert result["code"] == 200
    ours.wait_call_state(call_r, "disconnected", timeout=10)
    check_record(record_everywhere(cluster, sip_call_id), expect, "caller")


@pytest.mark.parametrize("hangup_by", ["callee", "caller"])
def test_raftpbx_extension_calls_a_kamailio_phone_answering_kamailios_challenge(
    setup: Setup, phones: Callable[[int], list[PhoneProcess]], hangup_by: str
) -> None:
    cluster, k = setup.cluster, setup.kamailio
    ext = create_extension(cluster, "1002" if hangup_by == "callee" else "1003", PASSWORD)
    ours, kam = phones(2)
    raftpbx_phone(setup, ours, ext)
    kamailio_phone(setup, kam, "3002")
    kam.auto_answer("k", 200, delay=0.2)
    log_mark = len(k.log_text())

    host, port = setup.service
    call_r = ours.call("r", f"sip:3002@{host}:{port}")
    call_k = kam.wait_incoming("k", timeout=10)["call"]
    ours.wait_call_state(call_r, "confirmed", timeout=10)
    kam.wait_call_state(call_k, "confirmed", timeout=10)
    rtp_both_ways(ours, call_r, kam, call_k)
    # Kamailio challenged raftpbx's INVITE and accepted the trunk's credentials.
    log = k.log_text()[log_mark:]
    assert "challenging INVITE to 3002" in log, log[-3000:]
    assert f"INVITE to 3002 from {ext} authenticated as {TRUNK_USER}" in log, log[-3000:]
    sip_call_id = ours.call_info(call_r)["sip_call_id"]
    expect = (ext, "3002", TRUNK, "outbound")
    active_everywhere(cluster, sip_call_id, expect)
    # The caller's BYE crosses the CSeq translation (raftpbx answered Kamailio's challenge with CSeq + 1).
    by, by_call, other, other_call = (kam, call_k, ours, call_r) if hangup_by == "callee" else (ours, call_r, kam, call_k)
    by.bye(by_call)
    result = by.wait_event(lambda e: e["event"] == "bye_result" and e.get("call") == by_call, 10)
    assert result["code"] == 200
    other.wait_call_state(other_call, "disconnected", timeout=10)
    check_record(record_everywhere(cluster, sip_call_id), expect, hangup_by)


def test_a_wrong_trunk_password_shows_as_a_failed_registration_and_the_right_one_recovers(setup: Setup) -> None:
    cluster = setup.cluster
    leader = cluster.wait_leader()
    wait_for(lambda: registration(leader)["state"] == "registered", 15.0, "registered")
    leader.call("trunk.update", name=TRUNK, password="not-the-" + TRUNK_PASSWORD)

    def refused() -> dict[str, Any] | None:
        status = registration(leader)
        return status if "credentials refused" in str(status["last_error"]) else None

    status = wait_for(refused, 15.0, "Kamailio refusing the wrong password")
    assert status["last_status"] == 401 and status["registrations_failed"] >= 1, status
    assert f'raftpbx_trunk_registrations_total{{node="{leader.id}",trunk="{TRUNK}",result="failed"}}' in \
        metrics(leader)
    before = int((trunk_binding(setup) or {}).get("CSeq", 0))
    leader.call("trunk.update", name=TRUNK, password=TRUNK_PASSWORD)
    wait_for(lambda: (b := trunk_binding(setup)) is not None and int(b["CSeq"]) > before, 15.0,
             "registered again with the right password")
    status = wait_for(lambda: (r := registration(leader))["state"] == "registered" and r, 10.0, "registered")
    assert status["last_error"] is None and status["last_status"] == 200


def test_caller_cancels_a_ringing_kamailio_phone_through_the_challenged_trunk(
    setup: Setup, phones: Callable[[int], list[PhoneProcess]]
) -> None:
    cluster = setup.cluster
    ext = create_extension(cluster, "1004", PASSWORD)
    ours, kam = phones(2)
    raftpbx_phone(setup, ours, ext)
    kamailio_phone(setup, kam, "3001")
    kam.auto_answer("k", 180)  # rings, never answers
    host, port = setup.service
    call_r = ours.call("r", f"sip:3001@{host}:{port}")
    call_k = kam.wait_incoming("k", timeout=10)["call"]
    ours.wait_event(lambda e: e["event"] == "call_state" and e.get("call") == call_r and e.get("state") == "early",
                    10)
    sip_call_id = ours.call_info(call_r)["sip_call_id"]
    # The CANCEL must match the INVITE Kamailio relayed (its CSeq was raised by the answered challenge).
    ours.cancel(call_r)
    assert ours.wait_call_state(call_r, "disconnected", timeout=10)["code"] == 487
    assert kam.wait_call_state(call_k, "disconnected", timeout=10)["code"] == 487
    record = record_everywhere(cluster, sip_call_id)
    assert record["disposition"] == "cancelled" and record["hangup_by"] == "caller", record
    assert record["answered_at"] is None


def test_after_kill_9_of_the_leader_the_elected_leader_registers_again(setup: Setup) -> None:
    cluster = setup.cluster
    leader = cluster.wait_leader()
    binding = wait_for(lambda: trunk_binding(setup), 15.0, "raftpbx's binding in Kamailio's usrloc")
    before = int(binding["CSeq"])
    killed_at = leader.kill()
    try:
        survivors = [n for n in cluster.nodes if n is not leader]
        new = cluster.wait_leader(timeout=20.0, among=survivors)
        refreshed = wait_for(lambda: (b := trunk_binding(setup)) is not None and int(b["CSeq"]) > before and b,
                             20.0, "the elected leader's registration in Kamailio")
        took = time.monotonic() - killed_at
        assert refreshed["Call-ID"] == binding["Call-ID"] and refreshed["Address"] == binding["Address"]
        wait_for(lambda: registration(new)["state"] == "registered", 5.0, f"{new.id} registered")
        print(f"kill -9 of {leader.id} to {new.id}'s registration in Kamailio: {took:.2f} s")
    finally:
        leader.start()  # back from its data dir; the module's layout again (node 1 leads)
        cluster.wait_leader(timeout=20.0)
        cluster.assert_converged(timeout=20.0)
        cluster.transfer_leader(cluster.nodes[0])
    wait_for(lambda: registration(cluster.nodes[0])["state"] == "registered", 10.0, "node1 registered again")
