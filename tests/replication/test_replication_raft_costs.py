"""Session 5 patches of pysyncobj 0.3.17 behind the seam (issue 8: the Raft thread's CPU per commit), and one
clock for pysyncobj and `raftpbx.replication`.

- One clock: pysyncobj timestamps everything with CLOCK_MONOTONIC_RAW through a Python lambda; this module
  with CLOCK_MONOTONIC; the pre-vote's election deadline, a connection's last read time and the peers' last
  response times are written by one and compared by the other. The clocks drift apart (NTP slews one), so
  those deadlines were off by the drift (98 ms after 11.5 h of uptime on the development machine).
"""

from __future__ import annotations

import time

import pysyncobj.dns_resolver
import pysyncobj.syncobj
import pysyncobj.tcp_connection
import pysyncobj.transport

import raftpbx.replication  # noqa: F401 (the patches are applied on import)


def test_pysyncobj_reads_the_clock_this_module_reads() -> None:
    for module in (pysyncobj.syncobj, pysyncobj.tcp_connection, pysyncobj.transport, pysyncobj.dns_resolver):
        assert module.monotonicTime is time.monotonic, module.__name__
