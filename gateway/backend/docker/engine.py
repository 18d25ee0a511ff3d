"""A small asyncio client for the Docker Engine API over its unix socket.

Why not docker-py: its blocking calls would need a thread per request, and its exec socket loses
the first output bytes (docker-py #2466, #3332).  The gateway needs a handful of JSON calls and
one hijacked stream per session, so it speaks HTTP/1.1 to the socket itself.
"""

from __future__ import annotations

import asyncio
import json
import os
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urlencode

from ..base import BackendError

API_VERSION = "v1.41"
_READ_SIZE = 256 * 1024
_MAX_HEADER = 64 * 1024


class DockerError(BackendError):
    """An error answer from the engine (status >= 400) or a broken connection to it.

    The user sees only that the engine failed; the log gets the engine's own words."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__("the container engine failed; please try again.",
                         f"docker: {status}: {message}", "engine")
        self.status = status
        self.message = message


class EngineUnreachable(DockerError):
    """No connection to the engine (nothing listens, or it broke): an outage, not a refusal.

    The user is told to come back later; the log gets the socket path and the OS's words."""

    def __init__(self, message: str) -> None:
        super().__init__(0, message)
        self.user_message = ("your environment is unavailable right now (the server's "
                             "container engine does not answer); please try again in a minute.")
        self.reason = "engine-down"


def socket_path(docker_host: str | None) -> str:
    """Resolve a `unix://` endpoint (or $DOCKER_HOST, or the default socket) to a path."""
    host = docker_host or os.environ.get("DOCKER_HOST") or "unix:///var/run/docker.sock"
    if not host.startswith("unix://"):
        raise ValueError(f"only unix:// Docker endpoints are supported, got {host!r}")
    return host[len("unix://") :]


@dataclass
class _Response:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body) if self.body else None


class ExecStream:
    """The hijacked connection of a started exec: raw bytes in, (framed) bytes out."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 tty: bool) -> None:
        self._reader = reader
        self._writer = writer
        self.tty = tty
        self.cut = False  # the connection broke (reset), rather than ended
        self._buf = bytearray()

    async def read(self) -> tuple[int, bytes]:
        """Next chunk of output as (stream, data); stream 1 = stdout, 2 = stderr.

        Returns (0, b"") at end of stream.  With a TTY the output is unframed and all stdout.
        """
        if self.tty:
            data = await self._recv()
            return (1, data) if data else (0, b"")
        # Framed: read in bulk and hand out runs of whole frames of the same stream at once
        # (fewer, larger channel writes than one read per 8-byte header and one per frame).
        buf = self._buf
        while True:
            stream, parts, pos = 0, [], 0
            while len(buf) - pos >= 8:
                kind = buf[pos] if buf[pos] in (1, 2) else 1
                size = int.from_bytes(buf[pos + 4:pos + 8], "big")
                if len(buf) - pos - 8 < size or (stream and kind != stream):
                    break
                stream = kind
                parts.append(bytes(buf[pos + 8:pos + 8 + size]))
                pos += 8 + size
            if parts:
                del buf[:pos]
                return stream, parts[0] if len(parts) == 1 else b"".join(parts)
            data = await self._recv()
            if not data:
                if len(buf) > 8:  # a frame cut short by the engine: pass on what came
                    stream, rest = (buf[0] if buf[0] in (1, 2) else 1), bytes(buf[8:])
                    buf.clear()
                    return stream, rest
                return 0, b""
            buf += data

    async def _recv(self) -> bytes:
        """The next bytes from the engine; b"" at the end, also when the connection was cut
        (the engine went away: `DockerProcess.wait` then finds out and says so)."""
        try:
            return await self._reader.read(_READ_SIZE)
        except ConnectionError:
            self.cut = True
            return b""

    def at_eof(self) -> bool:
        """The engine closed the stream and everything read has been handed out."""
        return not self._buf and (self.cut or self._reader.at_eof())

    def write(self, data: bytes) -> None:
        if not self._writer.transport.is_closing():
            self._writer.write(data)

    async def drain(self) -> None:
        await self._writer.drain()

    def buffered(self) -> int:
        """Bytes written but not yet taken by the socket (for flow control)."""
        transport = self._writer.transport
        return 0 if transport.is_closing() else transport.get_write_buffer_size()

    def write_eof(self) -> None:
        """Deliver EOF to the process's stdin.  Never for a TTY exec: it stops all output."""
        if not self._writer.transport.is_closing() and self._writer.can_write_eof():
            self._writer.write_eof()

    def close(self) -> None:
        self._writer.close()


class DockerClient:
    """Async JSON calls to the engine; one short-lived unix connection per request."""

    def __init__(self, docker_host: str | None = None, timeout: float = 30.0) -> None:
        self.path = socket_path(docker_host)
        self.timeout = timeout

    async def _open(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        try:
            return await asyncio.open_unix_connection(self.path, limit=1024 * 1024)
        except OSError as exc:
            raise EngineUnreachable(f"cannot reach the Docker engine at {self.path}: "
                                    f"{exc}") from exc

    @staticmethod
    def _url(path: str, query: Mapping[str, Any] | None) -> str:
        url = f"/{API_VERSION}{path}"
        if query:
            url += "?" + urlencode({k: v for k, v in query.items() if v is not None})
        return url

    @staticmethod
    def _request_bytes(method: str, url: str, body: Any, extra: Mapping[str, str]) -> bytes:
        payload = b"" if body is None else json.dumps(body).encode()
        lines = [f"{method} {url} HTTP/1.1", "Host: docker"]
        if body is not None:
            lines.append("Content-Type: application/json")
        lines.append(f"Content-Length: {len(payload)}")
        lines.extend(f"{k}: {v}" for k, v in extra.items())
        return ("\r\n".join(lines) + "\r\n\r\n").encode() + payload

    @staticmethod
    async def _read_head(reader: asyncio.StreamReader) -> tuple[int, dict[str, str]]:
        head = await reader.readuntil(b"\r\n\r\n")
        if len(head) > _MAX_HEADER:
            raise DockerError(0, "oversized response header")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        headers = {}
        for line in lines[1:]:
            if ":" in line:
                k, v = line.split(":", 1)
                headers[k.strip().lower()] = v.strip()
        return status, headers

    @staticmethod
    async def _read_body(reader: asyncio.StreamReader, headers: Mapping[str, str]) -> bytes:
        if headers.get("transfer-encoding", "").lower() == "chunked":
            parts = []
            while True:
                size = int((await reader.readline()).split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    await reader.readline()
                    return b"".join(parts)
                parts.append(await reader.readexactly(size))
                await reader.readexactly(2)
        if "content-length" in headers:
            return await reader.readexactly(int(headers["content-length"]))
        return await reader.read()

    async def request(self, method: str, path: str, *, query: Mapping[str, Any] | None = None,
                      body: Any = None, ok: tuple[int, ...] = (200, 201, 204),
                      timeout: float | None = None) -> Any:
        """One API call; returns the decoded JSON (or text) body, raises DockerError otherwise."""
        limit = timeout or self.timeout
        try:
            resp = await asyncio.wait_for(self._call(method, self._url(path, query), body), limit)
        except TimeoutError as exc:
            raise EngineUnreachable(f"{method} {path}: no answer within {limit:g} s") from exc
        if resp.status not in ok:
            try:
                message = resp.json().get("message", resp.body.decode(errors="replace"))
            except (ValueError, AttributeError):
                message = resp.body.decode(errors="replace")
            raise DockerError(resp.status, message.strip())
        ctype = resp.headers.get("content-type", "")
        if "json" in ctype:
            return resp.json()
        return resp.body

    async def _call(self, method: str, url: str, body: Any) -> _Response:
        reader, writer = await self._open()
        try:
            writer.write(self._request_bytes(method, url, body, {"Connection": "close"}))
            status, headers = await self._read_head(reader)
            data = await self._read_body(reader, headers)
            return _Response(status, headers, data)
        except (asyncio.IncompleteReadError, ConnectionError) as exc:
            raise EngineUnreachable(f"connection to the engine broke: {exc}") from exc
        finally:
            writer.close()

    # --- the calls the backend uses -------------------------------------------------------

    async def ping(self) -> bool:
        return (await self.request("GET", "/_ping", timeout=5)) == b"OK"

    async def inspect_container(self, name: str) -> dict[str, Any] | None:
        """Container JSON, or None when it does not exist."""
        try:
            return await self.request("GET", f"/containers/{quote(name)}/json")
        except DockerError as exc:
            if exc.status == 404:
                return None
            raise

    async def logs_tail(self, name: str, lines: int = 20) -> str:
        """Last lines of a (non-TTY) container's output, both streams, as text."""
        raw = await self.request("GET", f"/containers/{quote(name)}/logs",
                                 query={"stdout": 1, "stderr": 1, "tail": lines})
        out, pos = [], 0
        while pos + 8 <= len(raw):
            size = struct.unpack(">I", raw[pos + 4:pos + 8])[0]
            out.append(raw[pos + 8:pos + 8 + size])
            pos += 8 + size
        return b"".join(out).decode(errors="replace")

    async def exec_create(self, container: str, cmd: list[str], *, tty: bool, user: str = "",
                          env: list[str] | None = None, workdir: str = "",
                          stdin: bool = True) -> str:
        spec = {"AttachStdin": stdin, "AttachStdout": True, "AttachStderr": True, "Tty": tty,
                "Cmd": cmd, "Env": env or [], "User": user, "WorkingDir": workdir,
                # Nobody types this; the default ctrl-p,ctrl-q would hold back a lone ctrl-p.
                "DetachKeys": "ctrl-\\,ctrl-\\,ctrl-\\"}
        result = await self.request("POST", f"/containers/{quote(container)}/exec", body=spec)
        return result["Id"]

    async def exec_start(self, exec_id: str, tty: bool) -> ExecStream:
        """Start an exec and hijack its connection into a raw bidirectional stream."""
        reader, writer = await self._open()
        url = self._url(f"/exec/{exec_id}/start", None)
        writer.write(self._request_bytes("POST", url, {"Detach": False, "Tty": tty},
                                         {"Connection": "Upgrade", "Upgrade": "tcp"}))
        try:
            status, headers = await asyncio.wait_for(self._read_head(reader), self.timeout)
        except (asyncio.IncompleteReadError, ConnectionError) as exc:
            writer.close()
            raise EngineUnreachable(f"exec start failed: {exc}") from exc
        if status not in (101, 200):
            body = await self._read_body(reader, headers)
            writer.close()
            raise DockerError(status, body.decode(errors="replace").strip())
        return ExecStream(reader, writer, tty)

    async def exec_inspect(self, exec_id: str) -> dict[str, Any]:
        return await self.request("GET", f"/exec/{exec_id}/json")

    async def exec_resize(self, exec_id: str, height: int, width: int) -> None:
        await self.request("POST", f"/exec/{exec_id}/resize", query={"h": height, "w": width},
                           ok=(200, 201))
