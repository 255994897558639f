"""deploy/hooks/service-address, the ip-mode hook, run for real in a private network namespace (`unshare --net`:
its own loopback interface, nothing reaches the host's network): up adds the address, both actions are
idempotent, down removes it, IPv6 too; bad usage, a missing interface and a missing privilege are refused with
a clear message and distinct exit codes. And the node's side (`run_hook`): it returns when the hook exits, not
when a process the hook left in the background (arping) does, under uvloop as under asyncio. Needs root (CI
runs as root), like the netns lab."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from raftpbx.config import default_hook
from raftpbx.service_address import HookError, run_hook

HOOK = Path(__file__).resolve().parents[2] / "deploy" / "hooks" / "service-address"

SCRIPT = """
set -u
ip link set lo up
H="$1"
step() { "$@" 2>/dev/null; echo "rc=$?"; }
step "$H" up 198.51.100.77/32 lo
ip -o -4 addr show dev lo | grep -c 198.51.100.77/32
step "$H" up 198.51.100.77/32 lo
ip -o -4 addr show dev lo | grep -c 198.51.100.77/32
step "$H" down 198.51.100.77/32 lo
ip -o -4 addr show dev lo | grep -c 198.51.100.77/32
step "$H" down 198.51.100.77/32 lo
step "$H" up 2001:db8::77/128 lo
ip -o -6 addr show dev lo | grep -c 2001:db8::77/128
step "$H" down 2001:db8::77/128 lo
ip -o -6 addr show dev lo | grep -c 2001:db8::77/128
step "$H" up 198.51.100.77/32 nosuch0
step "$H" sideways 198.51.100.77/32 lo
step "$H" up 198.51.100.77 lo
"""


def run_isolated(script: str, *args: str) -> list[str]:
    assert os.geteuid() == 0, "this test needs root (network namespaces), as CI provides"
    unshare = shutil.which("unshare")
    assert unshare is not None, "unshare (util-linux) is required"
    done = subprocess.run([unshare, "--net", "sh", "-c", script, "sh", *args], capture_output=True, text=True,
                          timeout=30, check=False)
    assert done.returncode == 0, done.stderr
    return done.stdout.split()


def test_the_default_hook_is_this_script() -> None:
    assert default_hook() == HOOK and os.access(HOOK, os.X_OK)


def test_up_down_idempotent_ipv4_and_ipv6_and_refusals() -> None:
    out = run_isolated(SCRIPT, str(HOOK))
    assert out == [
        "rc=0", "1",  # up: added
        "rc=0", "1",  # up again: still once
        "rc=0", "0",  # down: gone
        "rc=0",  # down again: fine
        "rc=0", "1", "rc=0", "0",  # IPv6
        "rc=5",  # no such interface
        "rc=2", "rc=2",  # usage
    ]


def test_refuses_clearly_without_privilege() -> None:
    done = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--inh-caps=-all",
                           str(HOOK), "up", "198.51.100.77/32", "lo"], capture_output=True, text=True, timeout=10,
                          check=False)
    assert done.returncode == 4, (done.returncode, done.stderr)
    assert "needs root or CAP_NET_ADMIN" in done.stderr


# -- the node's side: run_hook returns when the hook exits, whatever it left running in the background ------
# The stock hook backgrounds `arping -c 3` (three announcements one second apart). Under uvloop, the loop the
# node runs, the hook's children inherit extra copies of its stdout (libuv's spawn has no close_fds), so a
# run_hook that waited for its output pipe's end-of-file took as long as arping: 3 s per ip-mode acquisition
# (measured in the netns lab: `service_address.acquired ... took_ms=2900-3200`). Both loops are checked.

STAND_IN = """#!/bin/sh
nohup sleep 5 >/dev/null 2>&1 &
echo $! >> "$0.pids"
echo "$1 ran"
[ "$1" = up ] || { echo "refused: $1 on $3" >&2; exit 7; }
"""

UNDER_UVLOOP = """
import asyncio, sys, time, uvloop
from pathlib import Path
from raftpbx.service_address import run_hook
async def main() -> None:
    started = time.monotonic()
    await run_hook(Path(sys.argv[1]), "up", "198.51.100.77/24", "eth0")
    print(f"{time.monotonic() - started:.3f}")
uvloop.run(main())
"""

NETNS_SETUP = """
set -eu
ip link set lo up
ip link add eth0 type veth peer name peer0
ip link set eth0 up
ip link set peer0 up
ip addr add 198.51.100.76/24 dev eth0
"$1" -c "$2" "$3"
ip -o -4 addr show dev eth0 | grep -c 198.51.100.77/24
"""


def _run_loop(loop_name: str, coro_factory: Any) -> Any:
    if loop_name == "uvloop":
        import uvloop
        return uvloop.run(coro_factory())
    return asyncio.run(coro_factory())


@pytest.mark.parametrize("loop_name", ["uvloop", "asyncio"])
def test_run_hook_returns_when_the_hook_exits_not_when_its_background_child_does(tmp_path: Path,
                                                                                  loop_name: str) -> None:
    hook = tmp_path / "hook"
    hook.write_text(STAND_IN)
    hook.chmod(0o755)

    async def both() -> tuple[float, float, str]:
        started = time.monotonic()
        await run_hook(hook, "up", "198.51.100.77/32", "eth0")
        up = time.monotonic() - started
        started = time.monotonic()
        with pytest.raises(HookError) as refused:
            await run_hook(hook, "down", "198.51.100.77/32", "eth0")
        return up, time.monotonic() - started, str(refused.value)

    try:
        up, down, error = _run_loop(loop_name, both)
    finally:
        for pid in (tmp_path / "hook.pids").read_text().split():
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGKILL)
    assert up < 1.0 and down < 1.0, f"the hook's background `sleep 5` held run_hook: up {up:.2f} s, down {down:.2f} s"
    assert error.endswith("down exited 7: down ran / refused: down on eth0"), error  # the output is still read


def test_real_hook_with_real_arping_under_uvloop_returns_at_once() -> None:
    assert os.geteuid() == 0, "this test needs root (network namespaces), as CI provides"
    assert shutil.which("arping"), "arping (Debian: iputils-arping) is required: the hook backgrounds it"
    unshare = shutil.which("unshare")
    assert unshare is not None, "unshare (util-linux) is required"
    hook_env = {k: v for k, v in os.environ.items() if not k.startswith("RAFTPBX_")}
    done = subprocess.run([unshare, "--net", "sh", "-c", NETNS_SETUP, "sh", sys.executable, UNDER_UVLOOP, str(HOOK)],
                          capture_output=True, text=True, timeout=30, check=False, env=hook_env)
    assert done.returncode == 0, done.stderr
    took, present = done.stdout.split()
    assert present == "1", "hook up did not add the address"
    assert float(took) < 1.0, f"hook up took {took} s under uvloop (arping -c 3 runs ~3 s in the background)"


# -- the hook's announcements: `up` sends them at once, and `down` stops them (only this host's) ------------
# A host that released the address kept announcing it for the rest of `arping -c 3` (up to 2 s): in the netns
# chaos run with 20% loss, leadership moved node1 -> node2 within 0.7 s, and the phones' host kept sending to
# node1 (which no longer had the address) for 4 s while node2 held it.

TWO_HOSTS = """
set -eu
for h in a b; do
    ip netns add "$1-$h"
    ip -n "$1-$h" link set lo up
    ip -n "$1-$h" link add eth0 type veth peer name peer0
    ip -n "$1-$h" link set eth0 up
    ip -n "$1-$h" link set peer0 up
    ip -n "$1-$h" addr add 198.51.100.7$h/24 dev eth0 2>/dev/null || ip -n "$1-$h" addr add 198.51.100.76/24 dev eth0
done
"""

COUNT_ARP = r"""
import socket, struct, sys, time
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0806))
s.bind(("peer0", 0))
s.settimeout(0.05)
print("ready", flush=True)
end = time.monotonic() + float(sys.argv[1])
seen = 0
while time.monotonic() < end:
    try:
        frame = s.recv(2048)
    except TimeoutError:
        continue
    if len(frame) >= 42 and frame[28:32] == socket.inet_aton(sys.argv[2]) and frame[38:42] == frame[28:32]:
        seen += 1
print(seen)
"""


def _arpings(namespace: str) -> list[int]:
    """Pids of arping processes announcing 198.51.100.77 inside `namespace`."""
    inode = os.stat(f"/run/netns/{namespace}").st_ino
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmd = (entry / "cmdline").read_bytes().split(b"\0")
            if b"arping" in cmd[0] and b"198.51.100.77" in cmd and os.stat(entry / "ns" / "net").st_ino == inode:
                found.append(int(entry.name))
        except OSError:
            continue
    return found


def test_up_announces_at_once_and_down_stops_only_this_hosts_announcements() -> None:
    assert os.geteuid() == 0, "this test needs root (network namespaces), as CI provides"
    assert shutil.which("arping") and shutil.which("pgrep"), "arping (iputils-arping) and pgrep (procps) are required"
    base = f"rpbx-hk{os.getpid()}"
    hosts = {h: f"{base}-{h}" for h in "ab"}
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAFTPBX_")}
    try:
        subprocess.run(["sh", "-c", TWO_HOSTS, "sh", base], check=True, capture_output=True, timeout=30)
        counter = subprocess.Popen(["ip", "netns", "exec", hosts["a"], sys.executable, "-c", COUNT_ARP, "0.7",
                                    "198.51.100.77"], stdout=subprocess.PIPE, text=True)
        assert counter.stdout is not None and counter.stdout.readline().strip() == "ready"
        for h in "ab":
            subprocess.run(["ip", "netns", "exec", hosts[h], str(HOOK), "up", "198.51.100.77/24", "eth0"],
                           check=True, timeout=10, env=env)
        announced, _ = counter.communicate(timeout=10)
        assert int(announced) >= 1, "no gratuitous ARP within 0.7 s of hook up"
        assert _arpings(hosts["a"]) and _arpings(hosts["b"]), "both hosts announce (for 2 s)"
        subprocess.run(["ip", "netns", "exec", hosts["a"], str(HOOK), "down", "198.51.100.77/24", "eth0"],
                       check=True, timeout=10, env=env)
        deadline = time.monotonic() + 0.5
        while _arpings(hosts["a"]) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert not _arpings(hosts["a"]), "host a still announces the address it gave up"
        assert _arpings(hosts["b"]), "down on host a stopped host b's announcements"
    finally:
        for h in "ab":
            for pid in _arpings(hosts[h]) if Path(f"/run/netns/{hosts[h]}").exists() else []:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            subprocess.run(["ip", "netns", "del", hosts[h]], capture_output=True, timeout=10, check=False)
