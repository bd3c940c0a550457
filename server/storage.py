"""On-disk state of one optimizer: atomic checkpoints, a write-ahead log, recovery.

Layout of a data dir (one folder per optimizer):

    DIR/<name>/manifest.json       the current checkpoint and the one before, with SHA-256 sums
    DIR/<name>/ckpt-<version>.npz  the complete state at that version (a plain NumPy archive)
    DIR/<name>/wal-<version>.log   every change after that version, one record each

A checkpoint is written to a temporary file, fsynced and renamed, then the
manifest the same way, so a crash leaves either the old or the new one. Each
log record is fsynced before the change it describes is applied and
acknowledged; it carries a CRC-32, so a torn tail (a crash mid-write) is
found and cut. Recovery loads the newest good checkpoint (falling back to the
one before, saying so) and replays every later record. Logs are kept back to
the previous checkpoint, so the fallback loses nothing.
"""

import errno
import hashlib
import io
import json
import logging
import os
import shutil
import struct
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from optserve.client.wire import ITEMSIZE, data_type_of, numpy_dtype
from optserve.server.codec import Gradient
from optserve.server.errors import ResourceExhausted

log = logging.getLogger("optserve.storage")

DURABILITY_MODES = ("wal", "none")
FORMAT = 1
_RECORD_HEADER = struct.Struct("<4sQI")  # magic, payload bytes, CRC-32 of the payload
_MAGIC = b"OSW1"
_SPACE_ERRORS = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)
_IOV_MAX = 1024  # buffers one writev takes on Linux


class StorageError(Exception):
    """The data dir holds state that cannot be restored; the message names the file."""


@dataclass
class Checkpoint:
    """The complete state of an optimizer at one version."""

    meta: dict[str, Any]  # name, config, policy, training mode, tensor names, iterations, version, dedup
    slots: dict[str, dict[str, np.ndarray]]  # engine slot -> tensor name -> float32 array

    @property
    def version(self) -> int:
        return self.meta["version"]


@dataclass
class LogRecord:
    """One change after a checkpoint: a step (with the gradients the step used) or a finalize."""

    kind: str  # "step" or "finalize"
    version: int  # the version the change produces
    workers: list[tuple[str, int]] = field(default_factory=list)  # (worker_id, seq) it makes durable
    grads: dict[str, Gradient] = field(default_factory=dict)


class OptimizerStore:
    """The folder of one optimizer in a data dir."""

    def __init__(self, directory: Path, durability: str):
        if durability not in DURABILITY_MODES:
            raise ValueError(f"durability must be one of {DURABILITY_MODES}, got {durability!r}")
        self.directory = directory
        self.durability = durability
        self._wal_fd: int | None = None

    def create(self, checkpoint: Checkpoint) -> None:
        """Makes the folder and writes the first checkpoint, before the optimizer is acknowledged."""
        self.directory.mkdir(parents=True)
        self.start_log(checkpoint.version)
        self.save(checkpoint)

    def start_log(self, version: int) -> None:
        """Sends later records to a new log file for changes after `version`."""
        if self.durability != "wal":
            return
        self.close()
        path = self.directory / f"wal-{version:012d}.log"
        self._wal_fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        _fsync_dir(self.directory)

    def append(self, record: LogRecord) -> None:
        """Writes and fsyncs one record; on a full disk cuts it off again and refuses."""
        if self._wal_fd is None:
            return
        parts = _encode_record(record)
        size = os.fstat(self._wal_fd).st_size
        try:
            _write_all(self._wal_fd, parts)  # O_APPEND: at the end
            os.fsync(self._wal_fd)
        except OSError as err:
            os.ftruncate(self._wal_fd, size)
            if err.errno in _SPACE_ERRORS:
                raise ResourceExhausted(f"data dir: no space to log the change to {self.directory.name!r} "
                                        f"({os.strerror(err.errno)}); nothing was applied") from None
            raise

    def save(self, checkpoint: Checkpoint) -> None:
        """Writes a checkpoint atomically, points the manifest at it, and prunes what it replaces."""
        name = f"ckpt-{checkpoint.version:012d}.npz"
        arrays = {f"{slot}/{tensor}": value for slot, tensors in checkpoint.slots.items()
                  for tensor, value in tensors.items()}
        arrays["meta"] = np.frombuffer(json.dumps(checkpoint.meta).encode(), np.uint8)
        try:
            digest = _write_atomic(self.directory / name, lambda f: np.savez(f, **arrays))
            manifest = self._manifest()
            entries = [{"file": name, "version": checkpoint.version, "sha256": digest}]
            entries += [e for e in manifest.get("checkpoints", [])[:1] if e["file"] != name]
            _write_atomic(self.directory / "manifest.json",
                          lambda f: f.write(json.dumps({"format": FORMAT, "checkpoints": entries}).encode()))
        except OSError as err:
            if err.errno in _SPACE_ERRORS:
                raise ResourceExhausted(f"data dir: no space for a checkpoint of {self.directory.name!r} "
                                        f"({os.strerror(err.errno)})") from None
            raise
        self._prune(min(e["version"] for e in entries), {e["file"] for e in entries})

    def load(self) -> tuple[Checkpoint, list[LogRecord]]:
        """The newest good checkpoint and every log record after it, torn tails cut off."""
        manifest = self._manifest()
        entries = manifest.get("checkpoints", [])
        if not entries:
            raise StorageError(f"{self.directory / 'manifest.json'}: missing or empty; refusing to start over it")
        failures = []
        for entry in entries:
            path = self.directory / entry["file"]
            try:
                checkpoint = _read_checkpoint(path, entry["sha256"])
            except StorageError as err:
                failures.append(str(err))
                log.error("%s", err)
                continue
            if failures:
                log.warning("restoring %r from the previous checkpoint %s and the log since version %d",
                            self.directory.name, path.name, checkpoint.version)
            return checkpoint, self._read_log(checkpoint.version)
        raise StorageError("no usable checkpoint, refusing to start: " + "; ".join(failures))

    def close(self) -> None:
        """Closes the open log file."""
        if self._wal_fd is not None:
            os.close(self._wal_fd)
            self._wal_fd = None

    def delete(self) -> None:
        """Removes the folder: renamed away first, so a crash never leaves half of it."""
        self.close()
        graveyard = self.directory.with_name(f".deleted-{self.directory.name}-{time.time_ns()}")
        os.rename(self.directory, graveyard)
        _fsync_dir(self.directory.parent)
        shutil.rmtree(graveyard, ignore_errors=True)

    def _manifest(self) -> dict[str, Any]:
        path = self.directory / "manifest.json"
        if not path.exists():
            return {}
        try:
            return json.loads(path.read_text())
        except (ValueError, OSError) as err:
            raise StorageError(f"{path}: unreadable manifest ({err}); refusing to start over it") from None

    def _read_log(self, after_version: int) -> list[LogRecord]:
        records = []
        for path in sorted(self.directory.glob("wal-*.log")):
            for record in _read_log_file(path):
                if record.version > after_version:
                    records.append(record)
        expected = after_version + 1
        for record in records:
            if record.version != expected:
                raise StorageError(f"{self.directory}: the log jumps from version {expected - 1} to "
                                   f"{record.version}; refusing to start with a gap")
            expected += 1
        return records

    def _prune(self, oldest_kept: int, kept_checkpoints: set[str]) -> None:
        """Deletes checkpoints not in the manifest, and logs that end before the oldest one kept."""
        for path in self.directory.glob("ckpt-*.npz"):
            if path.name not in kept_checkpoints:
                path.unlink()
        logs = sorted(self.directory.glob("wal-*.log"))
        for path, newer in zip(logs, logs[1:]):
            if _start_version(newer) <= oldest_kept:
                path.unlink()
        for path in self.directory.glob("*.tmp"):
            path.unlink()


def _read_checkpoint(path: Path, sha256: str) -> Checkpoint:
    try:
        data = path.read_bytes()
    except OSError as err:
        raise StorageError(f"checkpoint {path}: unreadable ({err.strerror})") from None
    if hashlib.sha256(data).hexdigest() != sha256:
        raise StorageError(f"checkpoint {path}: corrupt (its SHA-256 does not match the manifest)")
    with np.load(path) as archive:
        meta = json.loads(archive["meta"].tobytes())
        slots: dict[str, dict[str, np.ndarray]] = {}
        for key in archive.files:
            if key != "meta":
                slot, tensor = key.split("/", 1)
                slots.setdefault(slot, {})[tensor] = archive[key]
    return Checkpoint(meta, slots)


def _encode_record(record: LogRecord) -> list[memoryview]:
    """Header, then a JSON description of the arrays, then their raw little-endian bytes.

    The parts are views of the arrays, not copies, for `writev` to write
    (`_write_all`), and the CRC is accumulated part by part.
    """
    tensors, arrays = [], []
    for name, grad in record.grads.items():
        parts = grad if isinstance(grad, tuple) else (grad,)
        parts = tuple(np.require(p, requirements="C") for p in parts)  # copies only what is not contiguous
        tensors.append({"name": name, "parts": [[data_type_of(p.dtype), list(p.shape)] for p in parts]})
        arrays.extend(parts)
    meta = json.dumps({"kind": record.kind, "version": record.version, "workers": record.workers,
                       "tensors": tensors}).encode()
    payload = [memoryview(struct.pack("<I", len(meta))), memoryview(meta)]
    payload += [memoryview(a.reshape(-1).view(np.uint8)) for a in arrays]
    crc = 0
    for part in payload:
        crc = zlib.crc32(part, crc)
    size = sum(len(part) for part in payload)
    return [memoryview(_RECORD_HEADER.pack(_MAGIC, size, crc)), *payload]


def _write_all(fd: int, parts: list[memoryview]) -> None:
    """Writes every byte of `parts`, in order, with as few `writev` calls as the kernel allows."""
    parts = [part for part in parts if len(part)]
    while parts:
        written = os.writev(fd, parts[:_IOV_MAX])
        if not written:
            raise OSError(errno.ENOSPC, "the log took no bytes")
        while parts and written >= len(parts[0]):
            written -= len(parts.pop(0))
        if parts:
            parts[0] = parts[0][written:]


def _decode_record(payload: bytes) -> LogRecord:
    (meta_size,) = struct.unpack_from("<I", payload)
    meta = json.loads(payload[4:4 + meta_size])
    offset = 4 + meta_size
    grads: dict[str, Gradient] = {}
    for tensor in meta["tensors"]:
        parts = []
        for data_type, shape in tensor["parts"]:
            count = int(np.prod(shape, dtype=np.int64))
            parts.append(np.frombuffer(payload, numpy_dtype(data_type), count, offset).reshape(shape))
            offset += count * ITEMSIZE[data_type]
        grads[tensor["name"]] = tuple(parts) if len(parts) == 2 else parts[0]
    return LogRecord(meta["kind"], meta["version"], [tuple(w) for w in meta["workers"]], grads)


def _read_log_file(path: Path) -> list[LogRecord]:
    """Every whole record of a log file; a torn or corrupt tail is cut off the file."""
    data = path.read_bytes()
    records, offset = [], 0
    while offset < len(data):
        end = offset + _RECORD_HEADER.size
        if end <= len(data):
            magic, size, crc = _RECORD_HEADER.unpack_from(data, offset)
            payload = data[end:end + size]
            if magic == _MAGIC and len(payload) == size and zlib.crc32(payload) == crc:
                records.append(_decode_record(payload))
                offset = end + size
                continue
        log.warning("%s: cut %d bytes of torn or corrupt log after the last whole record (at byte %d)",
                    path, len(data) - offset, offset)
        with open(path, "r+b") as f:
            f.truncate(offset)
            os.fsync(f.fileno())
        break
    return records


def _start_version(path: Path) -> int:
    return int(path.stem.split("-")[1])


class _HashingWriter:
    """A write-only, unseekable file that hashes what passes through, so nothing is read back.

    Unseekable, writers such as zipfile (np.savez) write strictly in order, so
    the hash is that of the file's final contents.
    """

    def __init__(self, file):
        self._file = file
        self.sha256 = hashlib.sha256()

    def write(self, data) -> int:
        self.sha256.update(data)
        return self._file.write(data)

    def flush(self) -> None:
        self._file.flush()

    def seekable(self) -> bool:
        return False

    def read(self, size: int = -1) -> bytes:  # present so NumPy takes this for a file, never called
        raise io.UnsupportedOperation("write-only")

    def tell(self) -> int:  # zipfile then counts positions itself
        raise io.UnsupportedOperation("unseekable")


def _write_atomic(path: Path, write) -> str:
    """Writes via a temporary file, fsync and rename; returns the SHA-256 of what it wrote."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        hashing = _HashingWriter(f)
        write(hashing)
        f.flush()
        os.fsync(f.fileno())
    os.rename(tmp, path)
    _fsync_dir(path.parent)
    return hashing.sha256.hexdigest()


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def list_stores(root: Path, durability: str) -> list[OptimizerStore]:
    """The stores of every optimizer in a data dir (folders starting with '.' are not optimizers)."""
    root.mkdir(parents=True, exist_ok=True)
    for leftover in root.glob(".deleted-*"):
        shutil.rmtree(leftover, ignore_errors=True)
    return [OptimizerStore(path, durability) for path in sorted(root.iterdir())
            if path.is_dir() and not path.name.startswith(".")]

