"""Typed errors of the expert store.

Every error a user can cause (a bad checkpoint, a damaged pack) derives from
`FateError`, so a CLI can print one line for it instead of a traceback, and a
gRPC edge can map it to INVALID_ARGUMENT / DATA_LOSS rather than INTERNAL.
"""

from __future__ import annotations


class FateError(Exception):
    """Base of every fate-moe error caused by input or state, not by a bug."""


class PackError(FateError):
    """A checkpoint that cannot be packed, or a pack that cannot be opened or read."""


class ChecksumError(PackError):
    """A stored blob whose bytes do not match its checksum in the manifest (xxh3_64 for expert
    blobs, crc32 for the dense file).

    The bytes are never returned: a corrupt expert must not reach a model.
    """

    def __init__(self, message: str, layer: int | None = None, expert: int | None = None, fmt: str | None = None):
        super().__init__(message)
        self.layer = layer
        self.expert = expert
        self.fmt = fmt
