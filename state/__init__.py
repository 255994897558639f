"""Pure, replicated state: events, apply, decisions, snapshots, digests. No I/O, no clock."""
