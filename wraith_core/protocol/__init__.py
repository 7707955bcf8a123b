"""Sans-I/O codecs: bytes in, events and bytes out; no sockets, no asyncio."""
