"""Process-wide resources a relay needs to hold thousands of idle clients.

Measured in bench/relay_capacity.md: with Python's defaults, one idle client costs the
relay about 294 KiB, 256 KiB of it a zero-filled TLS read buffer that asyncio allocates
per connection (``asyncio.sslproto.SSLProtocol.max_size``), and the soft limit on open
files (often 1024) stops it near a thousand clients, after which CPython's accept loop
spins and logs without end. :func:`prepare_process` fixes both for a relay process.
"""

from __future__ import annotations

import asyncio.sslproto
import logging
import resource

log = logging.getLogger("relay.resources")

#: asyncio's TLS read buffer per connection. Relay frames are at most 16 KiB (one TLS
#: record), so 32 KiB holds two; the stock 256 KiB is 8x the memory of an idle client.
TLS_READ_BUFFER = 32 * 1024
#: The open-files limit a relay asks for when the hard limit is unlimited.
WANTED_OPEN_FILES = 1 << 20


def raise_open_files_limit() -> int:
    """Raise the soft limit on open files to the hard limit; returns the limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = WANTED_OPEN_FILES if hard == resource.RLIM_INFINITY else hard
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as exc:
            log.warning("event=open_files_limit_unchanged limit=%d reason=%s", soft, exc)
    return soft


def shrink_tls_read_buffers(size: int = TLS_READ_BUFFER) -> None:
    """Make asyncio allocate ``size`` bytes, not 256 KiB, of TLS read buffer per new connection."""
    asyncio.sslproto.SSLProtocol.max_size = size


def prepare_process() -> int:
    """Both of the above for a relay process; returns the open-files limit (for the log)."""
    shrink_tls_read_buffers()
    return raise_open_files_limit()
