"""Sans-I/O SMTP: bytes in, events and replies out.  No sockets, no asyncio, no clock."""
