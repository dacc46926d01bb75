"""The gRPC edge both servers share: transport security, one interceptor, and binding.

`EdgeInterceptor` is the one place a process turns a call into a status:
  - a bearer token (metadata `authorization: Bearer <token>`), compared in constant time,
    when the server has one: a missing or wrong token is UNAUTHENTICATED;
  - request bytes that are no valid message are INVALID_ARGUMENT (grpc's own
    deserializer would answer UNKNOWN), because the interceptor parses them itself
    (a large request in a thread, so parsing it never stalls the event loop);
  - an exception from a handler becomes the status the process's `status_for`
    gives it (bad input INVALID_ARGUMENT, a full budget RESOURCE_EXHAUSTED, a
    dependency down UNAVAILABLE, only bugs INTERNAL, with the traceback logged),
    its message with every file and socket path replaced by <path>.
The health service is left alone (no token, no wrapping): supervisors and load
balancers probe it, and it reveals nothing but SERVING / NOT_SERVING.

`ServerSecurity` holds the TLS files and the token (read from a file, never from a
flag, so it does not show in `ps`). `bind` adds the port, refusing a unix socket that
another live process serves and removing only a stale one; a TCP listener without
TLS gets a warning.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import os
import re
import socket
import stat
from collections.abc import Callable, Sequence
from contextlib import aclosing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from .errors import FateError

logger = logging.getLogger(__name__)

OPEN_SERVICES = ("/grpc.health.v1.Health/",)  # no token, no wrapping
_PARSE_OFF_LOOP_BYTES = 64 << 10  # larger requests are parsed in a thread: the loop keeps serving
TOKEN_HEADER = "authorization"
CLIENT_SECRET_HEADER = "x-fate-client-secret"  # the store's leases belong to (client_id, this secret)
CORRUPT_EXPERT_TRAILER = "x-fate-corrupt-expert"  # DATA_LOSS: "layer:expert:format" of the blob that failed

StatusFor = Callable[[BaseException], tuple[grpc.StatusCode, str]]
_PATH = re.compile(r"(?:unix:)?(?<![\w.])/(?:[\w.@+-]+/)*[\w.@+-]+")  # /a, /a/b.c, unix:/run/x.sock


def scrub_paths(message: str) -> str:
    """The message with file and socket paths replaced by <path>: clients never see the server's files."""
    return _PATH.sub("<path>", message)


class SecurityError(FateError):
    """A TLS or token file that cannot be used (the message names the file and the setting)."""


# -- files ------------------------------------------------------------------------------------


def _read(path: str | Path, setting: str) -> bytes:
    try:
        return Path(path).expanduser().read_bytes()
    except OSError as e:
        raise SecurityError(f"{setting} = {str(path)!r}: cannot read it ({e.strerror})") from None


def read_token(path: str | Path | None, setting: str = "auth_token_file") -> str:
    """The bearer token in `path` (surrounding whitespace stripped); "" for no path."""
    if not path:
        return ""
    token = _read(path, setting).decode("utf-8", "replace").strip()
    if not token or any(c.isspace() for c in token):
        raise SecurityError(f"{setting} = {str(path)!r}: the file must hold one token without spaces")
    return token


@dataclass(frozen=True)
class ServerSecurity:
    """TLS (certificate chain + key, optionally a CA whose client certificates are required) and a token."""

    tls_cert: bytes = b""
    tls_key: bytes = b""
    client_ca: bytes = b""
    token: str = ""

    @classmethod
    def from_files(cls, tls_cert: str | Path | None = None, tls_key: str | Path | None = None,
                   client_ca: str | Path | None = None, token_file: str | Path | None = None) -> "ServerSecurity":
        if bool(tls_cert) != bool(tls_key):
            raise SecurityError("tls_cert and tls_key go together: give both (PEM files) or neither")
        if client_ca and not tls_cert:
            raise SecurityError("tls_client_ca needs tls_cert and tls_key (client certificates need TLS)")
        return cls(
            tls_cert=_read(tls_cert, "tls_cert") if tls_cert else b"",
            tls_key=_read(tls_key, "tls_key") if tls_key else b"",
            client_ca=_read(client_ca, "tls_client_ca") if client_ca else b"",
            token=read_token(token_file),
        )

    @property
    def tls(self) -> bool:
        return bool(self.tls_cert)

    def credentials(self) -> grpc.ServerCredentials | None:
        if not self.tls:
            return None
        return grpc.ssl_server_credentials(
            [(self.tls_key, self.tls_cert)], root_certificates=self.client_ca or None,
            require_client_auth=bool(self.client_ca),
        )


def token_metadata(token: str) -> tuple[tuple[str, str], ...]:
    """Call metadata carrying `token` (for unix sockets, where call credentials need no TLS)."""
    return ((TOKEN_HEADER, f"Bearer {token}"),) if token else ()


def corrupt_expert_trailer(e: BaseException) -> tuple[tuple[str, str], ...]:
    """Trailing metadata naming the expert of a ChecksumError, so a client can fail only what used it."""
    layer, expert, fmt = (getattr(e, a, None) for a in ("layer", "expert", "fmt"))
    if layer is None or expert is None:
        return ()
    return ((CORRUPT_EXPERT_TRAILER, f"{layer}:{expert}:{fmt or ''}"),)


# -- the interceptor --------------------------------------------------------------------------


class EdgeInterceptor(grpc.aio.ServerInterceptor):
    """Token check, request parsing and error mapping for every handler of a server (see the module doc)."""

    def __init__(self, status_for: StatusFor, token: str = "", log: logging.Logger | None = None):
        self.status_for = status_for
        self._token = f"Bearer {token}".encode() if token else b""
        self.log = log or logger

    async def intercept_service(self, continuation, details: grpc.HandlerCallDetails):
        handler = await continuation(details)
        if handler is None or details.method.startswith(OPEN_SERVICES):
            return handler
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                self._unary(handler.unary_unary, handler.request_deserializer, details.method),
                response_serializer=handler.response_serializer)
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                self._stream(handler.unary_stream, handler.request_deserializer, details.method),
                response_serializer=handler.response_serializer)
        return handler  # client-streaming calls: none in these services

    async def _enter(self, raw: bytes, context: grpc.aio.ServicerContext, parse, method: str) -> Any:
        if self._token:
            given = dict(context.invocation_metadata() or ()).get(TOKEN_HEADER, "")
            given_bytes = given.encode() if isinstance(given, str) else bytes(given)
            if not hmac.compare_digest(given_bytes, self._token):
                self.log.warning("%s: refused a call without a valid token (peer %s)", method, context.peer())
                await context.abort(grpc.StatusCode.UNAUTHENTICATED,
                                    "missing or wrong bearer token (metadata 'authorization: Bearer <token>')")
        if parse is None:
            return raw
        try:
            return await asyncio.to_thread(parse, raw) if len(raw) > _PARSE_OFF_LOOP_BYTES else parse(raw)
        except Exception as e:  # noqa: BLE001 - google.protobuf DecodeError and friends
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"{method.rpartition('/')[2]}: the request bytes are not a valid message ({e})")

    async def _abort(self, context: grpc.aio.ServicerContext, method: str, e: Exception) -> None:
        code, message = self.status_for(e)
        if code == grpc.StatusCode.INTERNAL:
            self.log.error("%s: internal error", method, exc_info=e)
        else:
            self.log.info("%s: %s: %s", method, code.name, message)
        await context.abort(code, scrub_paths(" ".join(message.split())), trailing_metadata=corrupt_expert_trailer(e))

    def _unary(self, inner, parse, method: str):
        async def behavior(raw: bytes, context: grpc.aio.ServicerContext):
            request = await self._enter(raw, context, parse, method)
            try:
                return await inner(request, context)
            except (asyncio.CancelledError, grpc.aio.AbortError):
                raise
            except Exception as e:  # noqa: BLE001 - mapped to a status code
                await self._abort(context, method, e)
        return behavior

    def _stream(self, inner, parse, method: str):
        async def behavior(raw: bytes, context: grpc.aio.ServicerContext):
            request = await self._enter(raw, context, parse, method)
            try:
                async with aclosing(inner(request, context)) as items:  # closed (its finally runs) on cancel
                    async for item in items:
                        yield item
            except (asyncio.CancelledError, grpc.aio.AbortError):
                raise
            except Exception as e:  # noqa: BLE001 - mapped to a status code
                await self._abort(context, method, e)
        return behavior


# -- binding ----------------------------------------------------------------------------------


def unix_path(address: str) -> Path | None:
    """The socket path of a `unix:` address (unix:/abs, unix:rel, unix:///abs); None for host:port."""
    if not address.startswith("unix:"):
        return None
    rest = address[len("unix:"):]
    return Path(rest[2:] if rest.startswith("//") else rest)


def check_unix_socket(path: Path, what: str) -> None:
    """Refuse a socket another process serves; remove a stale one (a dead server's). Nothing else is touched."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise FateError(f"{what}: {path} exists and is not a socket; remove it or choose another path")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(1.0)
        try:
            s.connect(str(path))
        except (ConnectionRefusedError, FileNotFoundError):
            pass  # nobody accepts: stale
        except OSError as e:  # EACCES and such: someone else's, leave it
            raise FateError(f"{what}: cannot check {path} ({e.strerror}); remove it or choose another path") from None
        else:
            raise FateError(f"{what}: another process is serving on unix:{path}; stop it or choose another path")
    logger.warning("removing the stale socket %s (its server is gone)", path)
    os.unlink(path)


@dataclass
class Listener:
    """What `bind` did: the address clients dial, and the socket file this process created (if any)."""

    address: str
    socket_path: Path | None = None
    socket_inode: int = 0

    def remove_socket(self) -> None:
        """Unlink our socket file, if it is still the one we created (never another process's)."""
        if self.socket_path is None:
            return
        try:
            if os.lstat(self.socket_path).st_ino == self.socket_inode:
                os.unlink(self.socket_path)
        except FileNotFoundError:
            pass


def bind(server: grpc.aio.Server, listen: str, security: ServerSecurity, what: str) -> Listener:
    """Add the listening port (TLS when configured); one-line FateErrors naming the address."""
    path = unix_path(listen)
    if path is not None:
        if not path.parent.is_dir():
            raise FateError(f"{what} = {listen!r}: the directory {path.parent} does not exist; create it or choose "
                            f"another socket path")
        check_unix_socket(path, f"{what} = {listen!r}")
    creds = security.credentials()
    host, _, asked = listen.rpartition(":")
    try:
        port = server.add_secure_port(listen, creds) if creds is not None else server.add_insecure_port(listen)
    except RuntimeError:
        port = 0
    if port == 0 and path is not None:
        raise FateError(f"{what} = {listen!r}: cannot create the socket {path} (no permission?): choose another path")
    if path is not None:
        try:
            return Listener(listen, path, os.lstat(path).st_ino)
        except FileNotFoundError:
            return Listener(listen)
    if port == 0:
        raise FateError(f"{what} = {listen!r}: cannot listen on port {asked} of {host} (another process has it, "
                        f"or no permission): choose another port")
    if not security.tls:
        logger.warning("%s %s:%d is TCP without TLS: tokens and data cross it in the clear (give tls_cert and "
                       "tls_key, or listen on a unix socket)", what, host, port)
    if not security.token:
        logger.warning("%s %s:%d has no auth_token_file: anyone who reaches the port may call it", what, host, port)
    return Listener(f"{host}:{port}")


# -- client channels ----------------------------------------------------------------------------


class MetadataInterceptor(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor):
    """Adds fixed metadata (the bearer token on a channel without TLS, a lease secret) to every call."""

    def __init__(self, metadata: Sequence[tuple[str, str]]):
        self._md = tuple(metadata)

    def _details(self, d):
        return d._replace(metadata=tuple(d.metadata or ()) + self._md)

    def intercept_unary_unary(self, continuation, client_call_details, request):
        return continuation(self._details(client_call_details), request)

    def intercept_unary_stream(self, continuation, client_call_details, request):
        return continuation(self._details(client_call_details), request)


class AioMetadataInterceptor(grpc.aio.UnaryUnaryClientInterceptor, grpc.aio.UnaryStreamClientInterceptor):
    """MetadataInterceptor for grpc.aio channels."""

    def __init__(self, metadata: Sequence[tuple[str, str]]):
        self._md = tuple(metadata)

    def _details(self, d):
        return d._replace(metadata=grpc.aio.Metadata(*(tuple(d.metadata or ()) + self._md)))

    async def intercept_unary_unary(self, continuation, client_call_details, request):
        return await continuation(self._details(client_call_details), request)

    async def intercept_unary_stream(self, continuation, client_call_details, request):
        return await continuation(self._details(client_call_details), request)


@dataclass(frozen=True)
class ClientSecurity:
    """How a client reaches a server: TLS (`ca` to trust; a client certificate) and/or a token."""

    tls: bool = False
    ca: str | None = None
    cert: str | None = None
    key: str | None = None
    token: str = ""

    @classmethod
    def from_files(cls, tls: bool = False, ca: str | None = None, cert: str | None = None, key: str | None = None,
                   token_file: str | None = None) -> "ClientSecurity":
        return cls(tls or bool(ca or cert), ca or None, cert or None, key or None, read_token(token_file))

    def _tls_credentials(self) -> grpc.ChannelCredentials:
        if bool(self.cert) != bool(self.key):
            raise SecurityError("a client certificate needs both its cert and key files")
        creds = grpc.ssl_channel_credentials(
            root_certificates=_read(self.ca, "tls_ca") if self.ca else None,
            private_key=_read(self.key, "tls_key") if self.key else None,
            certificate_chain=_read(self.cert, "tls_cert") if self.cert else None,
        )
        if self.token:
            creds = grpc.composite_channel_credentials(creds, grpc.access_token_call_credentials(self.token))
        return creds

    def channel(self, address: str, options: list[tuple[str, Any]] | None = None,
                metadata: Sequence[tuple[str, str]] = ()) -> tuple[grpc.Channel, grpc.Channel]:
        """(the channel to make stubs on, the underlying channel to close)."""
        if self.tls:
            base = grpc.secure_channel(address, self._tls_credentials(), options=options)
        else:
            base = grpc.insecure_channel(address, options=options)
            metadata = tuple(metadata) + token_metadata(self.token)
        return (grpc.intercept_channel(base, MetadataInterceptor(metadata)) if metadata else base), base

    def aio_channel(self, address: str, options: list[tuple[str, Any]] | None = None,
                    metadata: Sequence[tuple[str, str]] = ()) -> grpc.aio.Channel:
        if not self.tls:
            metadata = tuple(metadata) + token_metadata(self.token)
        interceptors = [AioMetadataInterceptor(metadata)] if metadata else None
        if self.tls:
            return grpc.aio.secure_channel(address, self._tls_credentials(), options=options, interceptors=interceptors)
        return grpc.aio.insecure_channel(address, options=options, interceptors=interceptors)
