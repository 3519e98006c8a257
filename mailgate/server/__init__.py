"""asyncio transport: listeners, sessions driving the protocol engine, timeouts, limits."""
