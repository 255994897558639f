"""The network-namespace lab (deploy/netns): hosts, partitions, netem, heal, destroy.

Real namespaces, veths, bridge and nftables rules; real UDP and TCP traffic between the hosts. Needs root
(CI runs as root): without it, or without namespaces, these tests FAIL with a clear message.
"""

from __future__ import annotations

import itertools
import re
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import labkit
import pytest
from labkit import Lab, LabError, wait_for

PROBE = str(Path(__file__).with_name("netprobe.py"))
PY = sys.executable


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    labkit.require_lab_tools()
    with Lab(3) as lab:
        servers = [lab.popen(h, [PY, PROBE, "serve"], stdout=subprocess.PIPE, text=True) for h in lab.hosts]
        for proc in servers:
            assert proc.stdout is not None
            assert proc.stdout.readline().strip() == "ready"
        yield lab
        for proc in servers:
            proc.kill()
            proc.wait(timeout=10)


@pytest.fixture()
def healed(lab: Lab) -> Iterator[Lab]:
    lab.heal()
    yield lab
    lab.heal()


def _received(lab: Lab, host: str, token: str) -> set[str]:
    """Addresses that host's sink got `token` from."""
    out = lab.run(host, PY, "-c", "import socket;s=socket.create_connection(('127.0.0.1',9001));"
                  "import sys;sys.stdout.write(s.makefile().read())").stdout
    return {line.split()[0] for line in out.splitlines() if line.endswith(f" {token}")}


def reachability(lab: Lab, expected: set[tuple[str, str]]) -> set[tuple[str, str]]:
    """Directed pairs (src, dst) whose UDP datagrams arrive: every host sends to every other host."""
    token = uuid.uuid4().hex
    for src in lab.hosts:
        others = [lab.address(h) for h in lab.hosts if h != src]
        lab.run(src, PY, PROBE, "send", token, *others)
    by_addr = {lab.address(h): h for h in lab.hosts}

    def seen() -> set[tuple[str, str]]:
        return {(by_addr[a], dst) for dst in lab.hosts for a in _received(lab, dst, token)}

    # Everything expected arrives quickly; once it has, whatever else was sent at the same time has had
    # its chance too (no delay is configured in these tests).
    wait_for(lambda: seen() >= expected, 3.0, f"datagrams on {sorted(expected)}")
    return seen()


ALL = {(a, b) for a, b in itertools.permutations(["h1", "h2", "h3"], 2)}


def test_hosts_reach_each_other_and_nothing_else(healed: Lab) -> None:
    lab = healed
    assert reachability(lab, ALL) == ALL
    for host in lab.hosts:
        assert lab.run(host, "ip", "-4", "-o", "addr", "show", "dev", "eth0").stdout.split()[3] == \
            f"{lab.address(host)}/24"
    for ns in [lab.namespace(h) for h in lab.hosts] + [lab.switch_namespace]:
        routes = subprocess.run(["ip", "netns", "exec", ns, "ip", "-4", "route", "show", "table", "all"],
                                capture_output=True, text=True, check=True).stdout
        assert "default" not in routes, f"{ns} has a default route: {routes}"
        for line in routes.splitlines():
            assert line.split()[0] in ("198.51.100.0/24", "local", "broadcast"), f"{ns}: unexpected route {line}"
            if line.split()[0] != "198.51.100.0/24":
                assert re.search(r" (127\.|198\.51\.100\.)", line), f"{ns}: unexpected route {line}"


def test_partition_cuts_exactly_the_chosen_links_both_ways(healed: Lab) -> None:
    lab = healed
    lab.partition(["h1"])
    kept = {("h2", "h3"), ("h3", "h2")}
    assert reachability(lab, kept) == kept
    lab.heal()
    lab.partition(["h1"], others=["h2"])
    kept = ALL - {("h1", "h2"), ("h2", "h1")}
    assert reachability(lab, kept) == kept
    lab.heal()
    assert reachability(lab, ALL) == ALL


def test_oneway_partition_drops_one_direction_only(healed: Lab) -> None:
    lab = healed
    lab.partition(["h1", "h2"], others=["h3"], oneway=True)
    kept = ALL - {("h1", "h3"), ("h2", "h3")}
    assert reachability(lab, kept) == kept
    lab.heal()
    assert reachability(lab, ALL) == ALL


def _rtt_ms(lab: Lab, src: str, dst: str, size: int = 64) -> float:
    return float(lab.run(src, PY, PROBE, "rtt", lab.address(dst), "5", str(size)).stdout)


def test_netem_adds_measurable_delay_and_heal_removes_it(healed: Lab) -> None:
    lab = healed
    assert _rtt_ms(lab, "h2", "h1") < 20
    lab.netem("h1", "delay", "60ms")
    assert "netem h1" in lab.listing()
    assert _rtt_ms(lab, "h2", "h1") >= 55  # h1's replies are held 60 ms
    assert _rtt_ms(lab, "h2", "h3") < 20  # other links untouched
    # Bulk TCP through the delayed link arrives intact (checksums and segmentation survive).
    assert _rtt_ms(lab, "h2", "h1", size=200_000) >= 55
    lab.heal()
    assert _rtt_ms(lab, "h2", "h1") < 20
    assert "netem" not in lab.listing()


def test_netem_rejects_nonsense_and_loss_drops(healed: Lab) -> None:
    lab = healed
    with pytest.raises(LabError):
        lab.netem("h1", "frobnicate", "7")
    lab.netem("h1", "loss", "100%")
    assert reachability(lab, ALL - {("h1", "h2"), ("h1", "h3")}) == ALL - {("h1", "h2"), ("h1", "h3")}


def test_create_is_idempotent(lab: Lab) -> None:
    before = lab.listing()
    lab.create()
    assert lab.listing() == before
    assert reachability(lab, ALL) == ALL


def test_refuses_to_run_without_root() -> None:
    labkit.require_lab_tools("setpriv")
    proc = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                           "bash", str(labkit.DEPLOY / "netns" / "lab.sh"), "create", "1"],
                          capture_output=True, text=True, env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
                                                               "RPBX_LAB": "rpbx-nonroot"})
    assert proc.returncode == 1
    assert "must run as root" in proc.stderr
    assert not Path("/run/netns/rpbx-nonroot-br0").exists()


def test_destroy_leaves_nothing_behind_even_after_a_failure() -> None:
    labkit.require_lab_tools()
    root_links_before = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout.count("\n")
    lab = Lab(2)
    sleeper = None
    with pytest.raises(RuntimeError), lab:
        lab.partition(["h1"])
        lab.netem("h2", "delay", "10ms")
        sleeper = lab.popen("h1", ["sleep", "300"])
        raise RuntimeError("a failing test")
    assert sleeper is not None
    assert sleeper.wait(timeout=10) is not None  # killed by destroy
    names = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert lab.name not in names
    assert not Path(f"/run/rpbx-lab/{lab.name}").exists()
    assert subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout.count("\n") == \
        root_links_before
    lab.destroy()  # idempotent


def test_rto_min_knob_sets_the_subnet_route_and_is_off_by_default(lab: Lab, monkeypatch: pytest.MonkeyPatch) -> None:
    assert "rto_min" not in lab.run("h1", "ip", "route", "show", "198.51.100.0/24").stdout
    monkeypatch.setenv("RPBX_LAB_RTO_MIN", "20ms")
    with Lab(1) as tuned:
        route = tuned.run("h1", "ip", "route", "show", "198.51.100.0/24").stdout
        # Locked ("rto_min lock 20ms"): the kernel honours the route's rto_min only when it is locked.
        assert re.search(r"rto_min (lock )?20ms", route) and "src 198.51.100.11" in route, route
        assert tuned.run("h1", "ping", "-c1", "-W2", tuned.address("h1")).returncode == 0


def test_netem_and_heal_never_take_the_host_off_the_switch(healed: Lab) -> None:
    """The relay starts while the host's port is still on the bridge, and heal puts the port back before it
    stops the relay: applying and removing netem costs at most a few packets, not the relay's start-up time
    (before: about 1.2 s of silence, a quarter of 500 pings 10 ms apart)."""
    pinger = healed.popen("h2", ["ping", "-q", "-i", "0.01", "-c", "300", "-W", "1", healed.address("h1")],
                          stdout=subprocess.PIPE, text=True)
    healed.netem("h1", "delay", "1ms")
    healed.heal()
    out, _ = pinger.communicate(timeout=30)
    received = int(re.search(r"(\d+) received", out).group(1))  # type: ignore[union-attr]
    assert received >= 295, f"{300 - received} of 300 pings lost while netem was applied and removed: {out}"
