"""Admin write stream for the rolling-restart test (runs inside a lab host).

    writer.py CLUSTER_JSON ACK_FILE STOP_FILE FIRST_EXTENSION

Creates extensions FIRST, FIRST+1, ... through raftpbx's AdminClient (same op_id on every retry, next
node on failure), about 20 per second, until STOP_FILE exists (or 2000 writes / 240 s). Each acknowledged
write's extension is appended to ACK_FILE at once; failures are counted on stderr.
"""

from __future__ import annotations

import json
import sys
import time
import uuid
from pathlib import Path

from raftpbx.admin import AdminClient, AdminError, ConnectionFailed


def main() -> int:
    cluster, ack_path, stop_path, first = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]), int(sys.argv[4])
    doc = json.loads(Path(cluster).read_text())
    client = AdminClient([n["admin_url"] for n in doc["nodes"]], doc["admin_token"], timeout=3.0)
    failures = 0
    start = time.monotonic()
    with ack_path.open("a") as acks:
        for i in range(2000):
            if stop_path.exists() or time.monotonic() - start > 240:
                break
            extension = str(first + i)
            try:
                client.call("extension.create", {"extension": extension, "password": f"pw-{uuid.uuid4().hex}",
                                                 "op_id": uuid.uuid4().hex})
            except (AdminError, ConnectionFailed) as exc:
                failures += 1
                print(f"write {extension} failed: {exc}", file=sys.stderr, flush=True)
            else:
                acks.write(extension + "\n")
                acks.flush()
            # Pace the stream: a steady load, not a flood (the machine has two cores).
            time.sleep(max(0.0, start + (i + 1) * 0.05 - time.monotonic()))
    print(f"failures={failures}", file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
