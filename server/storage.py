"""On-disk state of one optimizer: atomic checkpoints, a write-ahead log, recovery.

Layout of a data dir (one folder per optimizer):

    DIR/<name>/manifest.json       the current checkpoint and the one before, with SHA-256 sums
    DIR/<name>/ckpt-<version>.npz  the complete state at that version (a plain NumPy archive)
    DIR/<name>/wal-<version>.log   every change after that version, one record each

A new optimizer's folder is written as DIR/.creating-<name>-<ns> (first
checkpoint and manifest, fsynced) and renamed into place, so a crash during a
create leaves only a dot-folder, removed on the next start. A checkpoint is
written to a temporary file, fsynced and renamed, then the manifest the same
way, so a crash leaves either the old or the new one. Each log record is
fsynced before the change it describes is applied and acknowledged; it carries
a CRC-32. A bad last record (a crash mid-write) is a torn tail, cut and kept
aside; a bad record with a whole record after it is damage, and so is a log the
manifest names but the folder lacks: recovery refuses it, naming the file and
byte offset, unless the operator accepts the loss. Recovery loads the newest
good checkpoint (falling back to the one before, saying so) and replays every
later record. Logs are kept back to the previous checkpoint, so the fallback
loses nothing.
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

from optserve.wire.dtypes import ITEMSIZE, data_type_of, numpy_dtype
from optserve.server.errors import FailedPrecondition, ResourceExhausted
from optserve.server.modes import Gradient
from optserve.server.sharding import ShardNorms

log = logging.getLogger("optserve.storage")

DURABILITY_MODES = ("wal", "none")
FORMAT = 2  # 2: archive keys are "<slot>/<index>" with the tensor names in "layout"; 1: "<slot>/<tensor name>"
_RECORD_HEADER = struct.Struct("<4sQI")  # magic, payload bytes, CRC-32 of the payload
_MAGIC = b"OSW1"
_SPACE_ERRORS = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)
_IOV_MAX = 1024  # buffers one writev takes on Linux
_CREATING = ".creating-"  # DIR/.creating-<name>-<ns>: a create's folder until its first checkpoint is whole
_TORN = ".torn-"  # wal-<v>.log.torn-<offset>: a torn tail cut off the log, kept until the log is pruned
_LOST = ".lost-"  # wal-<v>.log.lost-<offset>: log given up by --accept-log-loss, kept for the operator


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
    norms: ShardNorms | None = None  # a shard's step: the other shards' sums of squares it clipped with
    round_square_sums: ShardNorms | None = None  # a two-phase sync round: this shard's own sums of squares


class OptimizerStore:
    """The folder of one optimizer in a data dir."""

    def __init__(self, directory: Path, durability: str):
        if durability not in DURABILITY_MODES:
            raise ValueError(f"durability must be one of {DURABILITY_MODES}, got {durability!r}")
        self.directory = directory
        self.durability = durability
        self._wal_fd: int | None = None
        self._wal_name: str | None = None  # the open log's file name: the log that follows the next checkpoint

    def create(self, checkpoint: Checkpoint) -> None:
        """Writes the folder with its first checkpoint under a dot-name, then renames it into place.

        Runs before the optimizer is acknowledged. A failure removes only the
        dot-folder it made, and a crash leaves only that dot-folder, which
        `list_stores` removes: never a folder without a manifest.
        """
        final = self.directory
        if final.exists():
            raise FailedPrecondition(f"name: the data dir holds a folder {final} that is no optimizer this server "
                                     f"serves; move it away to create {final.name!r}")
        staging = final.with_name(f"{_CREATING}{final.name}-{time.time_ns()}")
        self.directory = staging
        try:
            staging.mkdir()
            self.start_log(checkpoint.version)
            self.save(checkpoint)
            os.rename(staging, final)  # atomic: the folder appears whole, manifest and all
        except BaseException as err:
            self.close()
            shutil.rmtree(staging, ignore_errors=True)
            if isinstance(err, OSError) and err.errno in _SPACE_ERRORS:
                raise ResourceExhausted(f"data dir: no space for the folder of {final.name!r} "
                                        f"({os.strerror(err.errno)})") from None
            raise
        finally:
            self.directory = final
        _fsync_dir(final.parent)

    def start_log(self, version: int) -> None:
        """Sends later records to a new log file for changes after `version`."""
        if self.durability != "wal":
            return
        self.close()
        path = self.directory / f"wal-{version:012d}.log"
        self._wal_fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        self._wal_name = path.name
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
        arrays = _archive_arrays(checkpoint)
        try:
            digest = _write_atomic(self.directory / name, lambda f: np.savez(f, **arrays))
            manifest = self._manifest()
            entries = [{"file": name, "version": checkpoint.version, "sha256": digest,
                        "log": self._wal_name if self._wal_fd is not None else None}]
            entries += [e for e in manifest.get("checkpoints", [])[:1] if e["file"] != name]
            _write_atomic(self.directory / "manifest.json",
                          lambda f: f.write(json.dumps({"format": FORMAT, "checkpoints": entries}).encode()))
        except OSError as err:
            if err.errno in _SPACE_ERRORS:
                raise ResourceExhausted(f"data dir: no space for a checkpoint of {self.directory.name!r} "
                                        f"({os.strerror(err.errno)})") from None
            raise
        self._prune(min(e["version"] for e in entries), {e["file"] for e in entries})

    def load(self, accept_log_loss: bool = False) -> tuple[Checkpoint, list[LogRecord], bool]:
        """The newest good checkpoint, every log record after it, and whether log was lost.

        A torn tail is cut off (its bytes kept aside). Damage (a bad record with
        a whole one after it, a version gap, a log the manifest names but the
        folder lacks) raises StorageError and changes no file, unless
        `accept_log_loss`: then the log is cut at the damage, the rest kept
        aside, and the third value is True.
        """
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
            named = [e["log"] for e in entries if e.get("log") and e["version"] >= checkpoint.version]
            records, lost = self._read_log(checkpoint.version, named, accept_log_loss)
            return checkpoint, records, lost
        raise StorageError("no usable checkpoint, refusing to start: " + "; ".join(failures))

    def close(self) -> None:
        """Closes the open log file."""
        if self._wal_fd is not None:
            os.close(self._wal_fd)
            self._wal_fd = None

    def delete(self) -> None:
        """Removes the folder: renamed away first, so a crash never leaves half of it (nor a create's new one)."""
        graveyard = self.directory.with_name(f".deleted-{self.directory.name}-{time.time_ns()}")
        os.rename(self.directory, graveyard)  # if this fails, the folder and its open log stay as they were
        self.close()
        try:
            _fsync_dir(self.directory.parent)
        except OSError as err:  # the rename is done; only its durability is in doubt
            log.warning("%s: could not fsync the data dir after deleting %r: %s", self.directory.parent,
                        self.directory.name, err)
        shutil.rmtree(graveyard, ignore_errors=True)

    def _manifest(self) -> dict[str, Any]:
        path = self.directory / "manifest.json"
        if not path.exists():
            return {}
        try:
            return json.loads(path.read_text())
        except (ValueError, OSError) as err:
            raise StorageError(f"{path}: unreadable manifest ({err}); refusing to start over it") from None

    def _read_log(self, after_version: int, named: list[str], accept_loss: bool) -> tuple[list[LogRecord], bool]:
        """The records after `after_version`, consecutive; `named`: logs the manifest says must exist.

        Every file is read before any is changed, so a refusal leaves them all
        as they were; only then are torn tails cut (or, accepting a loss, the
        damage and everything after it set aside).
        """
        lost = False
        for missing in [name for name in named if not (self.directory / name).exists()]:
            problem = f"{self.directory / missing}: missing, but the manifest says this log follows a checkpoint"
            if not accept_loss:
                raise StorageError(f"{problem}; refusing to start without it (--accept-log-loss would)")
            log.error("%s; starting without it, as --accept-log-loss allows", problem)
            lost = True
        logs = sorted(self.directory.glob("wal-*.log"))
        scans = [_scan_log_file(path) for path, newer in zip(logs, [*logs[1:], None])
                 if newer is None or _start_version(newer) > after_version]  # others end before the checkpoint
        records, expected, damage = [], after_version + 1, None
        for index, scan in enumerate(scans):
            for offset, record in scan.records:
                if record.version < expected:
                    continue
                if record.version != expected:
                    damage = (index, offset, f"{scan.path}: the log jumps from version {expected - 1} to "
                                             f"{record.version} at byte {offset}")
                    break
                records.append(record)
                expected += 1
            if damage is None and scan.damaged:
                damage = (index, scan.end, f"{scan.path}: damaged record at byte {scan.end} of {scan.size}, with "
                                           f"whole records after it (not a torn tail)")
            if damage is not None:
                break
        if damage is None:
            for scan in scans:
                if scan.end < scan.size:
                    _cut_torn_tail(scan)
            return records, lost
        index, offset, problem = damage
        if not accept_loss:
            raise StorageError(f"{problem}; the log is left as it is; refusing to start (--accept-log-loss starts "
                               f"with the {len(records)} change(s) before it and keeps the rest aside)")
        _set_aside(scans[index].path, offset)
        for scan in scans[index + 1:]:
            _set_aside(scan.path, 0)
        log.error("%s; --accept-log-loss: restoring %r with the %d change(s) before it, the rest of the log kept "
                  "aside as %s", problem, self.directory.name, len(records), f"wal-*.log{_LOST}<offset>")
        return records, True

    def _prune(self, oldest_kept: int, kept_checkpoints: set[str]) -> None:
        """Deletes checkpoints not in the manifest, and logs that end before the oldest one kept."""
        for path in self.directory.glob("ckpt-*.npz"):
            if path.name not in kept_checkpoints:
                path.unlink()
        logs = sorted(self.directory.glob("wal-*.log"))
        for path, newer in zip(logs, logs[1:]):
            if _start_version(newer) <= oldest_kept:
                path.unlink()
                for torn in path.parent.glob(f"{path.name}{_TORN}*"):
                    torn.unlink()
        for path in self.directory.glob("*.tmp"):
            path.unlink()


def _archive_arrays(checkpoint: Checkpoint) -> dict[str, np.ndarray]:
    """The arrays of a checkpoint archive, keyed "<slot>/<index>", the tensor names in the JSON "layout".

    Keys never hold a tensor name: NumPy adds and strips ".npy", zip cuts
    names at a NUL and caps them at 64 KiB, so names as keys could collide.
    """
    names = list(dict.fromkeys(tensor for tensors in checkpoint.slots.values() for tensor in tensors))
    index = {name: position for position, name in enumerate(names)}
    arrays = {f"{slot}/{index[tensor]}": value for slot, tensors in checkpoint.slots.items()
              for tensor, value in tensors.items()}
    arrays["layout"] = _json_array({"format": FORMAT, "tensors": names})
    arrays["meta"] = _json_array(checkpoint.meta)
    return arrays


def _json_array(value: Any) -> np.ndarray:
    return np.frombuffer(json.dumps(value).encode(), np.uint8)


def _read_checkpoint(path: Path, sha256: str) -> Checkpoint:
    try:
        data = path.read_bytes()
    except OSError as err:
        raise StorageError(f"checkpoint {path}: unreadable ({err.strerror})") from None
    if hashlib.sha256(data).hexdigest() != sha256:
        raise StorageError(f"checkpoint {path}: corrupt (its SHA-256 does not match the manifest)")
    slots: dict[str, dict[str, np.ndarray]] = {}
    with np.load(io.BytesIO(data)) as archive:
        meta = json.loads(archive["meta"].tobytes())
        if "layout" not in archive.files:  # format 1: keys "<slot>/<tensor name>"
            for key in archive.files:
                if key != "meta":
                    slot, tensor = key.split("/", 1)
                    slots.setdefault(slot, {})[tensor] = archive[key]
            return Checkpoint(meta, slots)
        layout = json.loads(archive["layout"].tobytes())
        if layout["format"] != FORMAT:
            raise StorageError(f"checkpoint {path}: format {layout['format']}, but this server reads formats 1 "
                               f"to {FORMAT}")
        keys = [key.split("/") for key in archive.files if key not in ("meta", "layout")]
        for slot, position in sorted(keys, key=lambda key: int(key[1])):
            slots.setdefault(slot, {})[layout["tensors"][int(position)]] = archive[f"{slot}/{position}"]
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
    meta = {"kind": record.kind, "version": record.version, "workers": record.workers, "tensors": tensors}
    if record.norms is not None:
        meta["norms"] = record.norms.to_dict()
    if record.round_square_sums is not None:
        meta["round_square_sums"] = record.round_square_sums.to_dict()
    meta = json.dumps(meta).encode()
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


def _decode_record(payload: bytes | memoryview) -> LogRecord:
    (meta_size,) = struct.unpack_from("<I", payload)
    meta = json.loads(bytes(payload[4:4 + meta_size]))
    offset = 4 + meta_size
    grads: dict[str, Gradient] = {}
    for tensor in meta["tensors"]:
        parts = []
        for data_type, shape in tensor["parts"]:
            count = int(np.prod(shape, dtype=np.int64))
            parts.append(np.frombuffer(payload, numpy_dtype(data_type), count, offset).reshape(shape))
            offset += count * ITEMSIZE[data_type]
        grads[tensor["name"]] = tuple(parts) if len(parts) == 2 else parts[0]
    norms = ShardNorms.from_dict(meta["norms"]) if meta.get("norms") else None
    sums = ShardNorms.from_dict(meta["round_square_sums"]) if meta.get("round_square_sums") else None
    return LogRecord(meta["kind"], meta["version"], [tuple(w) for w in meta["workers"]], grads, norms, sums)


@dataclass
class _LogScan:
    """What one log file holds, read without changing it."""

    path: Path
    records: list[tuple[int, LogRecord]]  # the whole records from the start, each with its byte offset
    end: int  # where those records end
    size: int  # bytes in the file
    damaged: bool  # a whole record lies after `end`: the bad bytes there are damage, not a torn tail


def _scan_log_file(path: Path) -> _LogScan:
    """The whole records of a log file from its start, and whether a whole record follows the first bad one."""
    data = path.read_bytes()
    records, offset = [], 0
    while offset < len(data):
        found = _record_at(data, offset)
        if found is None:
            break
        records.append((offset, found[0]))
        offset = found[1]
    damaged = False
    start = offset + 1
    while offset < len(data) and not damaged:  # bounded: each try starts after the last magic found
        start = data.find(_MAGIC, start)
        if start < 0:
            break
        damaged = _record_at(data, start) is not None
        start += 1
    return _LogScan(path, records, offset, len(data), damaged)


def _record_at(data: bytes, offset: int) -> tuple[LogRecord, int] | None:
    """The whole, CRC-checked record that starts at `offset`, and where it ends; None if there is none."""
    end = offset + _RECORD_HEADER.size
    if end > len(data):
        return None
    magic, size, crc = _RECORD_HEADER.unpack_from(data, offset)
    if magic != _MAGIC or end + size > len(data):
        return None
    payload = memoryview(data)[end:end + size]
    if zlib.crc32(payload) != crc:
        return None
    try:
        return _decode_record(payload), end + size
    except (ValueError, KeyError, TypeError, IndexError, struct.error):  # a checksum match on bytes of no record
        return None


def _cut_torn_tail(scan: _LogScan) -> None:
    """Cuts a torn tail (a crash mid-write: no whole record after it) off the log, keeping its bytes beside it."""
    aside = scan.path.with_name(f"{scan.path.name}{_TORN}{scan.end}")
    try:
        _copy_tail(scan.path, scan.end, aside)
    except OSError as err:  # a full disk must not stop a restart over bytes that were never acknowledged
        log.warning("%s: could not keep the torn tail aside (%s)", scan.path, err)
        aside = None
    log.warning("%s: cut %d bytes of torn or corrupt log after the last whole record (at byte %d; no whole "
                "record follows)%s", scan.path, scan.size - scan.end, scan.end,
                f"; kept as {aside.name}" if aside else "")
    with open(scan.path, "r+b") as f:
        f.truncate(scan.end)
        os.fsync(f.fileno())


def _set_aside(path: Path, offset: int) -> None:
    """Moves the bytes of a log from `offset` on to a `.lost-` file beside it (the whole file from 0)."""
    aside = path.with_name(f"{path.name}{_LOST}{offset}")
    try:
        if offset == 0:
            os.rename(path, aside)
        else:
            _copy_tail(path, offset, aside)
            with open(path, "r+b") as f:
                f.truncate(offset)
                os.fsync(f.fileno())
        _fsync_dir(path.parent)
    except OSError as err:
        raise StorageError(f"{path}: cannot keep the log from byte {offset} aside ({err}); "
                           f"refusing to start") from None


def _copy_tail(path: Path, offset: int, target: Path) -> None:
    with open(path, "rb") as f:
        f.seek(offset)
        tail = f.read()
    _write_atomic(target, lambda out: out.write(tail))


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
    """The stores of every optimizer in a data dir (folders starting with '.' are not optimizers).

    Removes what deletes and unacknowledged creates left behind, and moves
    aside a folder without a manifest whose logs are all empty (a create that
    crashed before its first checkpoint, as older versions wrote them).
    """
    root.mkdir(parents=True, exist_ok=True)
    for leftover in [*root.glob(".deleted-*"), *root.glob(f"{_CREATING}*")]:
        shutil.rmtree(leftover, ignore_errors=True)
    stores = []
    for path in sorted(root.iterdir()):
        if not path.is_dir() or path.name.startswith("."):
            continue
        if not (path / "manifest.json").exists() and all(
                log_file.stat().st_size == 0 for log_file in path.glob("wal-*.log")):
            aside = root / f".abandoned-{path.name}-{time.time_ns()}"
            os.rename(path, aside)
            _fsync_dir(root)
            log.warning("%s: no manifest and no logged change: the leftover of a create that was never "
                        "acknowledged; moved aside to %s", path, aside)
            continue
        stores.append(OptimizerStore(path, durability))
    return stores
