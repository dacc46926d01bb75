"""A copy engine for the CPU: a small process that copies predicted experts from the store's RAM tier
into the worker's expert arena while the worker computes.

On a GPU the copy engine is the DMA engine: the compute thread issues an asynchronous host-to-device
copy and goes on. A CPU has none, and a second Python thread in the worker is no substitute: every
torch op of the compute thread releases and retakes the GIL, so a thread doing copies and Python
bookkeeping beside it slows the compute thread by more than the copies cost (measured: decoding got
slower the more it prefetched). This process is the substitute: it has its own interpreter and runs
on another core, imports no torch, and does per expert what the worker's own directory read would
do — a seqlock copy out of the store's RAM segment, checked against the slot directory's generation,
and the blob's xxh3_64 from the pack manifest — only into the arena slot the worker named.

Protocol (one SOCK_SEQPACKET socket pair, the worker's end and the copier's):
  - the copier sends one byte when it has mapped the segments (ready), then reads requests;
  - a request is one packet of RECORD structs (ticket, layer, expert, format code, arena slot,
    expected xxh3_64); the copier handles them in order;
  - for each it writes the slot's status word in the arena (`ExpertArena.status`): the ticket when
    the bytes are in and verified, -ticket when the blob was not resident in the store's RAM, moved
    during every try, or failed its checksum (the worker then fetches it itself);
  - the worker closing its end (or dying) ends the copier.
The worker never reuses a slot whose status does not yet answer the ticket it wrote there.

    python -m gpu_worker.copier --fd N --directory SEG --data SEG --arena SEG --slot-bytes B
"""

from __future__ import annotations

import argparse
import ctypes
import os
import signal
import socket
import struct
import subprocess
import sys
from pathlib import Path

RECORD = struct.Struct("<qiiiiQ")  # ticket, layer, expert, format code, slot, xxh3_64 (0: none known)
MAX_PACKET = 64 * 1024
READY = b"R"


def serve(sock: socket.socket, directory: str, data: str, arena: str, slot_bytes: int) -> int:
    """The copier's loop (module docstring); returns when the worker's end closes."""
    import xxhash

    from expert_store import shm
    from expert_store.slot_directory import FORMAT_CODES, DirectoryReader

    from .arena import ArenaView

    formats = {code: name for name, code in FORMAT_CODES.items()}
    data_seg = shm.attach_segment(data)
    reader = DirectoryReader(directory, data_seg)
    view = ArenaView.attach(arena, slot_bytes)
    sock.send(READY)
    try:
        while True:
            try:
                msg = sock.recv(MAX_PACKET)
            except InterruptedError:
                continue
            if not msg:
                return 0
            for ticket, layer, expert, code, slot, digest in RECORD.iter_unpack(msg):
                dst = view.slot(slot)
                n = reader.copy_into((layer, expert, formats.get(code, "")), dst)
                ok = n is not None and (not digest or xxhash.xxh3_64_intdigest(dst[:n]) == digest)
                view.status[slot] = ticket if ok else -ticket
    finally:
        view.close()
        reader.close()
        data_seg.close()


class CopyEngine:
    """The worker's end: starts the copier process and sends it requests (see the module docstring)."""

    def __init__(self, directory: str, data: str, arena_name: str, slot_bytes: int, *,
                 python: str = sys.executable, start_timeout_s: float = 30.0):
        self.source = (directory, data)
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        cmd = [python, "-m", "gpu_worker.copier", "--fd", str(theirs.fileno()), "--directory", directory,
               "--data", data, "--arena", arena_name, "--slot-bytes", str(slot_bytes)]
        try:
            self.proc = subprocess.Popen(cmd, pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL,
                                         stderr=subprocess.PIPE, env=_copier_env())
        finally:
            theirs.close()
        self._sock = ours
        self._ticket = 0
        self.requests = 0
        ours.settimeout(start_timeout_s)
        try:
            ready = ours.recv(1)
        except OSError:
            ready = b""
        if ready != READY:
            err = self._stop_and_read()
            ours.close()
            raise OSError(f"the copy engine did not start: {err or 'no answer'}")
        ours.settimeout(None)

    def next_ticket(self) -> int:
        self._ticket += 1
        return self._ticket

    def submit(self, records: list[tuple[int, int, int, int, int, int]]) -> None:
        """(ticket, layer, expert, format code, slot, xxh3_64) each, in one or more packets."""
        per = MAX_PACKET // RECORD.size
        for i in range(0, len(records), per):
            self._sock.send(b"".join(RECORD.pack(*r) for r in records[i:i + per]))
            self.requests += 1

    def alive(self) -> bool:
        return self.proc.poll() is None

    def _stop_and_read(self) -> str:
        if self.proc.poll() is None:
            self.proc.kill()
        try:
            _, err = self.proc.communicate(timeout=5)
        except subprocess.TimeoutExpired:
            return ""
        return (err or b"").decode(errors="replace").strip().splitlines()[-1:][0] if err else ""

    def close(self) -> None:
        try:
            self._sock.close()
        finally:
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            if self.proc.stderr is not None:
                self.proc.stderr.close()


def _copier_env() -> dict[str, str]:
    """The worker's environment, with this checkout importable (the copier runs `-m gpu_worker.copier`)."""
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def _die_with_parent() -> None:
    """SIGTERM when the worker dies (Linux prctl PR_SET_PDEATHSIG); elsewhere the socket's EOF does it."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)
    except (OSError, AttributeError):
        pass


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m gpu_worker.copier", description=__doc__.split("\n\n")[0])
    ap.add_argument("--fd", type=int, required=True, help="the copier's end of the worker's socket pair")
    ap.add_argument("--directory", required=True, help="the store's slot directory segment")
    ap.add_argument("--data", required=True, help="the store's RAM tier segment")
    ap.add_argument("--arena", required=True, help="the worker's expert arena segment")
    ap.add_argument("--slot-bytes", type=int, required=True, help="bytes per arena slot")
    a = ap.parse_args(argv)
    _die_with_parent()
    sock = socket.socket(fileno=a.fd)
    try:
        return serve(sock, a.directory, a.data, a.arena, a.slot_bytes)
    except (OSError, ValueError) as e:
        print(f"copier: {e}", file=sys.stderr)
        return 1
    finally:
        sock.close()


if __name__ == "__main__":
    sys.exit(main())
