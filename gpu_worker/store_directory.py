"""The store client's slot-directory side (a mixin of StoreClient): resident experts copied out of the
store's RAM tier with no RPC, which experts are there, and where a copy engine on this host reads them."""

from __future__ import annotations

import logging
from typing import Sequence

from expert_store.slot_directory import DirectoryReader

from .store_protocol import BlobKey, FetchedBlob, Priority

log = logging.getLogger(__name__)


class SlotDirectoryReads:
    """Needs StoreClient's _lock, _dir, _dir_names, use_directory, transport, pack_changed, _crc32,
    _segment and _check_blob."""

    def copy_source(self) -> tuple[str, str] | None:
        """(slot directory segment, RAM tier segment) a copy engine on this host can read; None: no directory."""
        if self.transport != "shm" or not self.use_directory:
            return None
        with self._lock:
            if self._directory() is None or not self._dir_names:
                return None
            data, directory = self._dir_names
            return directory, data

    def blob_digest_of(self, key: BlobKey) -> int | None:
        """The blob's xxh3_64 from the pack manifest (None: not known)."""
        return self._crc32.get(key)

    def in_memory(self, keys: Sequence[BlobKey]) -> list[bool]:
        """Which of `keys` the slot directory shows resident in the store's RAM (copied with no RPC)."""
        if self.transport != "shm" or self.pack_changed:
            return [False] * len(keys)
        with self._lock:
            reader = self._directory()
            return [reader.is_resident(k) for k in keys] if reader is not None else [False] * len(keys)

    def _copy_resident(self, keys: Sequence[BlobKey], priority: Priority) -> dict[int, FetchedBlob]:
        """The experts the slot directory shows resident, copied and verified with no RPC."""
        with self._lock:  # the lock keeps a re-attach from closing the segment mid-copy
            reader = self._directory()
            if reader is None:
                return {}
            copies = [(i, reader.copy(k, priority == "demand")) for i, k in enumerate(keys)]
        out: dict[int, FetchedBlob] = {}
        for i, blob in copies:
            if blob is not None:  # stable across the copy; the manifest's xxh3_64 is the final guard
                self._check_blob(blob, keys[i], "", f"expert {keys[i]} via the slot directory")
                out[i] = FetchedBlob(keys[i], blob, "ram", "shm")
        return out

    def _directory(self) -> DirectoryReader | None:
        """The mapped slot directory (lock held); None when the store has none or it cannot be mapped."""
        if self._dir is not None or not self.use_directory or not self._dir_names or not self._dir_names[1]:
            return self._dir
        data_name, dir_name = self._dir_names
        try:
            data = self._segment(data_name, 0)
            if data is not None:
                self._dir = DirectoryReader(dir_name, data)
        except (OSError, ValueError) as e:
            log.warning("cannot map the store's slot directory %r (%s): every shm fetch asks the store", dir_name, e)
            self._dir_names = None
        return self._dir

    def _drop_directory(self) -> None:
        if self._dir is not None:
            self._dir.close()
            self._dir = None
