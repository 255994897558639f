"""raftpbx: a SIP PBX cluster replicated through Raft."""
