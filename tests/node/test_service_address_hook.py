"""deploy/hooks/service-address, the ip-mode hook, run for real in a private network namespace (`unshare --net`:
its own loopback interface, nothing reaches the host's network): up adds the address, both actions are
idempotent, down removes it, IPv6 too; bad usage, a missing interface and a missing privilege are refused with
a clear message and distinct exit codes. Needs root (CI runs as root), like the netns lab."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from raftpbx.config import default_hook

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
