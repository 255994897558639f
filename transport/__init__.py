"""SIP transport: a sans-I/O core (transport.sip) and thin asyncio transports."""
