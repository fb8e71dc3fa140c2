"""Tests for relay_server/resources.py: the open-files limit and asyncio's TLS read buffer.

Both change process-wide state, so each test runs in a child Python process.
"""

from __future__ import annotations

import inspect
import subprocess
import sys

from relay_server.resources import TLS_READ_BUFFER, WANTED_OPEN_FILES


def run_child(code: str) -> str:
    return subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, timeout=30).stdout


def test_prepare_process_raises_the_open_files_limit_and_shrinks_tls_buffers() -> None:
    out = run_child(
        "import asyncio.sslproto, resource\n"
        "from relay_server.resources import prepare_process\n"
        "soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)\n"
        "resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))\n"
        "limit = prepare_process()\n"
        "print(limit, resource.getrlimit(resource.RLIMIT_NOFILE)[0], hard, asyncio.sslproto.SSLProtocol.max_size)\n"
    )
    limit, soft, hard, buffer = (int(x) for x in out.split())
    expected = WANTED_OPEN_FILES if hard == -1 else hard
    assert limit == soft == expected > 256
    assert buffer == TLS_READ_BUFFER


def test_asyncio_still_sizes_its_tls_buffer_by_max_size() -> None:
    """The buffer is asyncio's, and only its class attribute sizes it: fail loudly if that changes."""
    import asyncio.sslproto

    assert "bytearray(self.max_size)" in inspect.getsource(asyncio.sslproto.SSLProtocol.__init__)
