"""The LoRA cache's third tier: LoRA safetensors files on the worker's local disk.

Torch-free. Files are named by the sha256 of their bytes (``<sha256>.safetensors``)
directly under ``root``; the directory itself is the index, so what is there
after a restart, or what another process wrote, is what the tier holds:

* **LRU by bytes**: a file's mtime is when it was last written or read (every hit
  sets it), so recency survives a restart. Past ``max_bytes`` the least recently
  used files are deleted. A file larger than the whole budget is not kept.
  ``max_bytes`` 0 turns the tier off, and the start-up sweep then empties the
  directory: no LoRA lingers where nothing reads or trims it.
* **Atomic writes**: bytes go to a temp file (``.<sha256>.<random>.tmp``) renamed
  onto the name, so a reader sees the whole file or none. No fsync: a power cut
  may leave a torn file under the name, and every read hashes the bytes anyway.
* **Checked on every read**: bytes whose sha256 is not their name (torn, damaged)
  are never returned; the file is deleted and the read is a miss, so the caller
  fetches from the blob store and writes it again. The start-up sweep also drops
  files too short to be safetensors and temp files older than
  ``ORPHAN_TEMP_AGE_S`` (a writer that died).
* **A failing disk is a miss**: an OSError while reading, writing or trimming is
  logged and the caller falls back to the blob store, so the tier never fails a
  generation. Erasure (``evict``) is the exception: it raises, since a file it
  could not delete must not look deleted.

Two worker processes may share the directory: both see every file (a LoRA one
wrote is a hit for the other), a write of the same sha by both leaves one whole
file (the last rename), and a file deleted while the other reads it is either
read whole (POSIX keeps an open file's bytes) or found missing (a miss). Each
trims the directory's total to its own budget, least recently used first,
whoever wrote the file, so the smaller budget wins; two trims at once may delete
one file more than needed. A fresh temp file is another process's write in
progress and is neither counted nor touched, except by ``evict``, which deletes
that sha's temp files too, so the other's rename fails (its write is a miss).

Erasure (``evict``) deletes the files: the bytes are gone from the filesystem;
the blocks they used are freed, not overwritten (that is the disk encryption's
job).
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

log = logging.getLogger("atelier.lora_disk")

SUFFIX: Final = ".safetensors"
_TEMP_SUFFIX: Final = ".tmp"
_SHA256 = re.compile(r"[0-9a-f]{64}")
_FILE_NAME = re.compile(r"([0-9a-f]{64})\.safetensors")
_TEMP_NAME = re.compile(r"\.([0-9a-f]{64})\..*\.tmp")
# A temp file is written in one call of a few MB; one this old has no writer left.
ORPHAN_TEMP_AGE_S: Final = 600.0
# A safetensors file starts with its JSON header's length (u64, little-endian).
_HEADER_LENGTH_BYTES: Final = 8


@dataclass(frozen=True)
class DiskEntry:
    sha256: str
    nbytes: int
    used_ns: int  # the file's mtime: its last write or read


@dataclass
class DiskStats:
    hits: int = 0
    misses: int = 0
    writes: int = 0
    corrupt: int = 0  # files whose bytes did not match their name (deleted)
    evictions: int = 0  # files deleted to fit the budget
    erased: int = 0  # files deleted by evict()
    errors: int = 0  # OSErrors taken as misses


@dataclass(frozen=True)
class LoraInventory:
    """What a worker's LoRA tiers hold: sha256s (least recently used first) and
    bytes per tier. "vram" is the adapters resident in a pipeline (in host memory
    on a CPU worker), "host" the parsed state dicts, "disk" the files."""

    vram: tuple[str, ...] = ()
    host: tuple[str, ...] = ()
    disk: tuple[str, ...] = ()
    vram_bytes: int = 0
    host_bytes: int = 0
    disk_bytes: int = 0

    def held(self) -> set[str]:
        """Every sha256 any tier holds."""
        return {*self.vram, *self.host, *self.disk}

    def merged(self, other: LoraInventory) -> LoraInventory:
        """Both inventories (several pipelines share one worker's disk tier: pass
        the disk part once). A LoRA held by both is listed once, its bytes twice."""
        return LoraInventory(
            vram=tuple(dict.fromkeys((*self.vram, *other.vram))),
            host=tuple(dict.fromkeys((*self.host, *other.host))),
            disk=tuple(dict.fromkeys((*self.disk, *other.disk))),
            vram_bytes=self.vram_bytes + other.vram_bytes,
            host_bytes=self.host_bytes + other.host_bytes,
            disk_bytes=self.disk_bytes + other.disk_bytes,
        )

    def tiers(self) -> dict[str, list[str]]:
        """``{"vram": [...], "host": [...], "disk": [...]}``, as a heartbeat publishes
        it (``core.fleet.workers.Inventory.loras``). A LoRA is listed in every tier
        that holds it (resident ones are usually in host RAM too)."""
        return {"vram": list(self.vram), "host": list(self.host), "disk": list(self.disk)}

    def nbytes(self) -> dict[str, int]:
        return {"vram": self.vram_bytes, "host": self.host_bytes, "disk": self.disk_bytes}

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready: ``tiers()`` and ``{"bytes": nbytes()}``."""
        return {**self.tiers(), "bytes": self.nbytes()}


def check_sha256(sha256: str) -> str:
    """``sha256`` if it is 64 lowercase hex digits: it becomes a file name."""
    if not _SHA256.fullmatch(sha256):
        raise ValueError(f"not a sha256 hex digest: {sha256!r}")
    return sha256


class LoraDiskCache:
    """LoRA files by sha256 under ``root``, at most ``max_bytes`` of them in all.

    Construction sweeps the directory (``sweep``); an unusable ``root`` (a file,
    no permission) raises there, once, rather than at every generation.
    """

    def __init__(self, root: Path, max_bytes: int) -> None:
        if max_bytes < 0:
            raise ValueError("max_bytes must not be negative")
        self.root = Path(root)
        self.max_bytes = max_bytes
        self.stats = DiskStats()
        # Keeps this process's trims and sweeps from interleaving; other processes
        # are fine without it (see the module's docstring).
        self._lock = threading.Lock()
        self.sweep()

    @property
    def enabled(self) -> bool:
        return self.max_bytes > 0

    def path(self, sha256: str) -> Path:
        return self.root / f"{check_sha256(sha256)}{SUFFIX}"

    # --- reads ------------------------------------------------------------------------

    def get(self, sha256: str) -> bytes | None:
        """The file's bytes, checked against ``sha256``; None on a miss."""
        if not self.enabled:
            return None
        path = self.path(sha256)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            self.stats.misses += 1
            return None
        except OSError as error:
            self._failed("read", path, error)
            return None
        if hashlib.sha256(data).hexdigest() != sha256:
            log.warning("LoRA file %s does not match its sha256: deleted", path)
            self.stats.corrupt += 1
            _unlink(path)
            return None
        _touch(path)
        self.stats.hits += 1
        return data

    def contains(self, sha256: str) -> bool:
        """A file is there (its bytes are checked only when read)."""
        return self.enabled and self.path(sha256).is_file()

    def entries(self) -> list[DiskEntry]:
        """The files, least recently used first."""
        found = [
            DiskEntry(match[1], stat.st_size, stat.st_mtime_ns)
            for match, stat in self._scan(_FILE_NAME)
        ]
        return sorted(found, key=lambda entry: (entry.used_ns, entry.sha256))

    def inventory(self) -> LoraInventory:
        entries = self.entries()
        return LoraInventory(
            disk=tuple(e.sha256 for e in entries), disk_bytes=sum(e.nbytes for e in entries)
        )

    # --- writes -----------------------------------------------------------------------

    def put(self, sha256: str, data: bytes) -> bool:
        """Keep ``data`` (whose sha256 must be ``sha256``) and trim the directory to
        the budget; True if the file is there afterwards. A file already there
        is only marked used."""
        path = self.path(sha256)
        if len(data) > self.max_bytes:
            return False
        if _size(path) == len(data):
            _touch(path)
            return True
        if hashlib.sha256(data).hexdigest() != sha256:
            raise ValueError("the LoRA's bytes do not match the sha256 given")
        try:
            self._write_atomic(path, data)
        except OSError as error:
            self._failed("write", path, error)
            return False
        self.stats.writes += 1
        try:
            self.trim()
        except OSError as error:
            self._failed("trim", self.root, error)
        return path.exists()

    def trim(self) -> list[str]:
        """Delete least recently used files until the directory fits the budget."""
        with self._lock:
            entries = self.entries()
            total = sum(entry.nbytes for entry in entries)
            removed: list[str] = []
            for entry in entries:
                if total <= self.max_bytes:
                    break
                _unlink(self.path(entry.sha256))
                total -= entry.nbytes
                removed.append(entry.sha256)
            self.stats.evictions += len(removed)
            return removed

    def evict(self, shas: Iterable[str]) -> list[str]:
        """Delete these LoRAs' files, and any temp file being written for them;
        return the sha256s whose file was there."""
        doomed = {check_sha256(sha) for sha in shas}
        removed = [sha for sha in sorted(doomed) if _unlink(self.path(sha))]
        for match, _ in self._scan(_TEMP_NAME):
            if match[1] in doomed:
                _unlink(self.root / match[0])
        self.stats.erased += len(removed)
        return removed

    def sweep(self) -> None:
        """At start-up: delete temp files no writer will finish and files too short
        to be safetensors, then trim to the budget (it may have shrunk)."""
        stale_before = time.time_ns() - int(ORPHAN_TEMP_AGE_S * 1e9)
        with self._lock:
            for match, stat in self._scan(_TEMP_NAME):
                if stat.st_mtime_ns < stale_before:
                    _unlink(self.root / match[0])
            for match, stat in self._scan(_FILE_NAME):
                if not _plausible(self.root / match[0], stat.st_size):
                    self.stats.corrupt += 1
                    _unlink(self.root / match[0])
        self.trim()

    # --- internals ----------------------------------------------------------------------

    def _scan(self, pattern: re.Pattern[str]) -> Iterator[tuple[re.Match[str], os.stat_result]]:
        """Directory entries whose name matches ``pattern``, with their stat."""
        try:
            listing = list(os.scandir(self.root))
        except FileNotFoundError:
            return
        for item in listing:
            match = pattern.fullmatch(item.name)
            if match is None:
                continue
            try:
                stat = item.stat()
            except FileNotFoundError:  # deleted by another process since the listing
                continue
            yield match, stat

    def _write_atomic(self, path: Path, data: bytes) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        fd, temp = tempfile.mkstemp(dir=self.root, prefix=f".{path.stem}.", suffix=_TEMP_SUFFIX)
        try:
            with os.fdopen(fd, "wb") as file:
                file.write(data)
            _touch(Path(temp))
            os.replace(temp, path)
        except BaseException:
            _unlink(Path(temp))
            raise

    def _failed(self, what: str, path: Path, error: OSError) -> None:
        log.warning("LoRA disk tier: %s of %s failed (%s); using the blob store", what, path, error)
        self.stats.errors += 1


def _size(path: Path) -> int | None:
    try:
        return path.stat().st_size
    except OSError:
        return None


def _touch(path: Path) -> None:
    """Mark the file used now (its mtime is its recency). The time is set, not left
    to the kernel, whose file times step at its timer tick (~4 ms): two uses in one
    tick would tie and LRU order would fall back to names."""
    now = time.time_ns()
    try:
        os.utime(path, ns=(now, now))
    except OSError:  # deleted meanwhile (evicted by another process): nothing to mark
        pass


def _unlink(path: Path) -> bool:
    try:
        path.unlink()
    except FileNotFoundError:
        return False
    return True


def _plausible(path: Path, size: int) -> bool:
    """Long enough for the header its first 8 bytes announce (a crash may leave an
    empty or cut file under the name)."""
    if size < _HEADER_LENGTH_BYTES:
        return False
    try:
        with path.open("rb") as file:
            header = int.from_bytes(file.read(_HEADER_LENGTH_BYTES), "little")
    except OSError:
        return False
    return _HEADER_LENGTH_BYTES + header <= size
