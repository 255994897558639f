"""The SIP protocol as a sans-I/O core: bytes, events and now in; messages, events and timers out."""
