"""The one way files come home from a machine: our own tar extractor, for archives we did not make.

A rented machine is a stranger's computer, so whatever it sends is hostile until checked. This
module does not rely on tarfile's extraction filters (``filter="data"`` can be bypassed before
Python 3.11.13 / 3.12.11, CVE-2025-4517 and friends): tarfile only parses headers here, and every
member is checked by the rules below BEFORE anything is written for it.

Rules (a broken rule raises `UnsafeArchive`, naming the member and the rule):

- only regular files and directories: symlinks, hard links, character/block devices, fifos,
  sparse and contiguous files, and any other type are refused;
- names: not absolute, no ``..`` part, not empty or ``.`` (the archive's own root entry ``./``,
  a directory, is the one exception: it is skipped), no NUL, at most MAX_DEPTH parts, MAX_PART_BYTES
  per part and MAX_NAME_BYTES in all (checked in one pass over the name: work per member is linear
  in its length, and nothing deeper than MAX_DEPTH ever lands, so no later walk of the tree at home
  can recurse out of stack); after normalisation (``./`` prefixes, doubled and trailing slashes
  dropped) the name must match ``allow`` (``re.fullmatch``) when given;
- members under a top-level name in ``exclude`` (a step's bulk outputs) are dropped, whatever the
  machine's own ``tar --exclude`` did: nothing is written for them;
- each member is created inside a FRESH private temporary directory made next to ``dest``, where
  this function alone creates directories and regular files (never a link), so a checked name
  cannot resolve outside it; which names exist is kept in memory, never looked up on disk; nothing
  is ever written through (files are created with O_EXCL|O_NOFOLLOW, a name seen twice or a file
  where a directory is needed is refused);
- caps: ``max_members`` members, ``max_bytes`` in all (the declared sizes, checked before a member
  is written, and the bytes actually written), and the decompressed tar stream itself (headers
  included) may not run far past ``max_bytes``; the members' data may not exceed ``max_ratio``
  times the compressed bytes read, once past RATIO_FREE_BYTES (a small gzip bomb); pax and
  long-name header payloads are capped
  (MAX_HEADER_BYTES each, MAX_HEADER_TOTAL in all): tarfile reads them into memory and, before
  Python 3.11.10, parses them with a quadratically backtracking regex (CVE-2024-6232); and at most
  MAX_HEADER_READS header reads may precede one member (tarfile recurses once per pax or long-name
  header in a chain: 2000 of them end in RecursionError);
- modes are ours: directories 0o755, files 0o644 (0o755 when the member had an execute bit);
  never setuid/setgid/sticky, no owners, no times from the archive;
- only when every member was checked and written is the temporary directory swapped into
  ``dest`` (the old ``dest``, if any, is moved aside, replaced, then deleted). On any refusal or
  error the temporary directory is removed and ``dest`` is untouched.
"""
from __future__ import annotations

import gzip
import io
import logging
import os
import re
import shutil
import tarfile
import tempfile
import uuid
import zlib
from pathlib import Path
from typing import IO, Optional, Sequence, Union

from .machine import MachineError

MAX_BYTES = 200 * 1000**3  # 200 GB: more than any step's outputs (checkpoints included)
MAX_MEMBERS = 200_000
# Generous default allowlist for names from a machine: anything printable (no control characters,
# so no newline or escape sequence can reach a log line or a terminal).
DEFAULT_ALLOW = re.compile(r"[^\x00-\x1f\x7f]+")
# pax / GNU long-name header payloads: tarfile reads each into memory and (before 3.11.10) parses it
# with a quadratic regex. A real one holds a path (PATH_MAX 4096) and a few times: 8 KiB each is
# plenty; payloads over one 512-byte block add up to at most 8 MiB per archive.
MAX_HEADER_BYTES = 8 * 1024
MAX_HEADER_TOTAL = 8 * 1024 * 1024
# A member is one 512-byte header, or a few headers and payloads (pax, GNU long name and long link).
MAX_HEADER_READS = 16
# Names: our outputs nest 5 levels (train/checkpoints-set-aside/<hash>/step-N/file); parts as the
# filesystem's NAME_MAX; a whole name well inside PATH_MAX (4096) with the home directory in front.
MAX_DEPTH = 32
MAX_PART_BYTES = 255
MAX_NAME_BYTES = 2048
# Members' data bytes per compressed byte: weights and checkpoints compress ~1.1x, JSON and CSV ~10x,
# a gzip bomb ~1000x. Below RATIO_FREE_BYTES of data no ratio is checked (small files vary more).
MAX_RATIO = 50
RATIO_FREE_BYTES = 32 * 1024 * 1024
CHUNK = 1024 * 1024
log = logging.getLogger("qat.machine")

FILE_TYPES = (tarfile.REGTYPE, tarfile.AREGTYPE)
_TYPE_NAMES = {tarfile.SYMTYPE: "symlink", tarfile.LNKTYPE: "hard link", tarfile.CHRTYPE: "character device",
               tarfile.BLKTYPE: "block device", tarfile.FIFOTYPE: "fifo", tarfile.GNUTYPE_SPARSE: "sparse file",
               tarfile.CONTTYPE: "contiguous file"}

Source = Union[str, os.PathLike, IO[bytes]]


class UnsafeArchive(MachineError):
    """An archive (or a name) from a machine broke a safety rule: refused, never retried."""

    retryable = False  # tasks.retry.is_transient honours this

    def __init__(self, member: str, rule: str):
        self.member, self.rule = member, rule
        super().__init__(f"refused {member!r} from the machine: {rule}")


def safe_member_name(name: str, allow: Optional[re.Pattern] = None) -> str:
    """The normalised relative name (``a/b``) if `name` is safe to create under a directory of
    ours; raises UnsafeArchive otherwise. Usable for single remote names (e.g. ``ls`` output):
    pass an `allow` such as ``re.compile(r"[^/]+")`` to insist on one path component."""
    if not isinstance(name, str):
        raise UnsafeArchive(repr(name), "the name is not text")
    if "\0" in name:
        raise UnsafeArchive(name, "the name contains a NUL byte")
    if name.startswith("/"):
        raise UnsafeArchive(name, "absolute names are not allowed")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise UnsafeArchive(name, "'..' parts are not allowed")
    if not parts:
        raise UnsafeArchive(name, "empty or '.' names are not allowed")
    if len(parts) > MAX_DEPTH:
        raise UnsafeArchive(name[:200] + "...", f"{len(parts)} levels deep (at most {MAX_DEPTH})")
    norm = "/".join(parts)
    if len(norm.encode(errors="surrogateescape")) > MAX_NAME_BYTES:
        raise UnsafeArchive(name[:200] + "...", f"a name of over {MAX_NAME_BYTES} bytes")
    for part in parts:
        if len(part.encode(errors="surrogateescape")) > MAX_PART_BYTES:
            raise UnsafeArchive(name[:200] + "...", f"a path part of over {MAX_PART_BYTES} bytes")
    if allow is not None and not allow.fullmatch(norm):
        raise UnsafeArchive(name, f"the name does not match the allowlist {allow.pattern!r}")
    return norm


class _Guard(io.RawIOBase):
    """What tarfile reads through: caps the whole decompressed stream and the headers tarfile reads
    into memory (and parses with regexes that backtrack quadratically before Python 3.11.10,
    CVE-2024-6232); seeks forward by reading, so a pipe or a gzip stream works too."""

    def __init__(self, raw: IO[bytes], cap: int, compressed: "_Counted", max_ratio: float):
        super().__init__()
        self.raw, self.cap, self.pos = raw, cap, 0
        self.compressed, self.max_ratio = compressed, max_ratio
        self.in_data = False  # True while we copy a member's data (big reads are fine then)
        self.header_bytes = 0
        self.header_reads = 0  # reads since the last member was handed out (reset by the caller)
        self.data_bytes = 0  # members' data read (what lands), for the ratio cap

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def read(self, n: int = -1) -> bytes:
        if n is None or n < 0:
            raise io.UnsupportedOperation("unbounded read")
        if not self.in_data:
            self.header_reads += 1
            if self.header_reads > MAX_HEADER_READS:
                raise UnsafeArchive(f"<header at byte {self.pos}>",
                                    f"a chain of over {MAX_HEADER_READS} headers (pax or long-name) before one member")
        if not self.in_data and n > tarfile.BLOCKSIZE:  # a pax or long-name header's payload
            self.header_bytes += n
            if n > MAX_HEADER_BYTES:
                raise UnsafeArchive(f"<header at byte {self.pos}>",
                                    f"an extended header of {n} bytes (over {MAX_HEADER_BYTES})")
            if self.header_bytes > MAX_HEADER_TOTAL:
                raise UnsafeArchive(f"<header at byte {self.pos}>",
                                    f"extended headers over {MAX_HEADER_TOTAL} bytes in all")
        return self._read(n)

    def _read(self, n: int) -> bytes:
        if self.pos + n > self.cap:
            n = max(0, self.cap - self.pos) + 1  # read just past the cap to know whether there is more
        data = self.raw.read(n)
        self.pos += len(data)
        if self.pos > self.cap:
            raise UnsafeArchive(f"<at byte {self.pos}>", f"the archive stream is larger than {self.cap} bytes")
        if self.in_data:
            self.data_bytes += len(data)
            if self.data_bytes > RATIO_FREE_BYTES and self.data_bytes > self.max_ratio * max(1, self.compressed.n):
                raise UnsafeArchive(f"<at byte {self.pos}>", f"it unpacks to over {self.max_ratio:g} times the "
                                    f"{self.compressed.n} compressed bytes read (a compression bomb)")
        return data

    def readinto(self, b) -> int:
        data = self.read(len(b))
        b[:len(data)] = data
        return len(data)

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        target = {io.SEEK_SET: offset, io.SEEK_CUR: self.pos + offset}.get(whence)
        if target is None:
            raise io.UnsupportedOperation("seek from the end")
        while self.pos < target:
            if not self._read(min(CHUNK, target - self.pos)):
                break
        if target < self.pos:
            self.raw.seek(target)
            self.pos = target
        return self.pos


class _Counted(io.RawIOBase):
    """Counts the bytes read from the source (compressed, for a tar.gz): the ratio cap's divisor."""

    def __init__(self, raw: IO[bytes]):
        super().__init__()
        self.raw, self.n = raw, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return self.raw.seekable()

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        return self.raw.seek(offset, whence)

    def tell(self) -> int:
        return self.raw.tell()

    def readinto(self, b) -> int:
        data = self.raw.read(len(b))
        b[:len(data)] = data
        self.n += len(data)
        return len(data)


def _open_stream(src: IO[bytes]) -> IO[bytes]:
    """src itself (plain tar) or a gzip reader over it, told apart by the gzip magic."""
    if hasattr(src, "peek"):
        magic = src.peek(2)[:2]  # type: ignore[attr-defined]
    elif src.seekable():
        start = src.tell()
        magic = src.read(2)
        src.seek(start)
    else:
        src = io.BufferedReader(src)  # type: ignore[arg-type]
        magic = src.peek(2)[:2]
    return gzip.GzipFile(fileobj=src, mode="rb") if magic == b"\x1f\x8b" else src


def _member_type(m: tarfile.TarInfo) -> str:
    if m.type in FILE_TYPES and m.sparse is None:
        return "file"
    if m.type == tarfile.DIRTYPE:
        return "dir"
    if m.sparse is not None:
        return "sparse file"
    return _TYPE_NAMES.get(m.type, f"member of type {m.type!r}")


def _make_dirs(root: str, norm: str, label: str, made: dict[str, bool]) -> str:
    """Create each missing directory of norm under root; returns its path. `made` (name -> is a
    directory) holds everything this extraction created: nothing is looked up on disk."""
    if made.get(norm) is not True:  # the parent of the previous member, usually: nothing to do
        name = ""
        for part in norm.split("/"):
            name = f"{name}/{part}" if name else part
            kind = made.get(name)
            if kind is None:
                os.mkdir(os.path.join(root, name), 0o755)
                made[name] = True
            elif not kind:
                raise UnsafeArchive(label, "a directory is needed where the archive already put a file")
    return os.path.join(root, norm)


def _write_file(root: str, norm: str, label: str, reader: IO[bytes], size: int, mode: int,
                budget: int, made: dict[str, bool]) -> int:
    """Create norm under root (exclusively, never through a link) with size bytes from reader."""
    parent, _, base = norm.rpartition("/")
    dirpath = _make_dirs(root, parent, label, made) if parent else root
    if norm in made:
        raise UnsafeArchive(label, "the archive holds this name twice" if not made[norm]
                            else "a file where the archive already put a directory")
    made[norm] = False
    path = os.path.join(dirpath, base)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
                     | getattr(os, "O_CLOEXEC", 0), 0o755 if mode & 0o111 else 0o644)
    except FileExistsError:
        raise UnsafeArchive(label, "the archive holds this name twice") from None
    written = 0
    with os.fdopen(fd, "wb") as out:
        while True:
            chunk = reader.read(min(CHUNK, size - written + 1))
            if not chunk:
                break
            written += len(chunk)
            if written > size:
                raise UnsafeArchive(label, f"more data than its declared {size} bytes")
            if written > budget:
                raise UnsafeArchive(label, "the archive holds more than the byte cap")
            out.write(chunk)
    if written != size:
        raise UnsafeArchive(label, f"truncated: {written} of its declared {size} bytes")
    return written


def _swap_into(tmp: Path, dest: Path) -> None:
    """Put tmp at dest; an old dest is moved aside first, restored if the move fails, then removed."""
    if not os.path.lexists(dest):
        os.rename(tmp, dest)
        return
    old = dest.with_name(f".{dest.name}.old-{uuid.uuid4().hex[:12]}")
    os.rename(dest, old)
    try:
        os.rename(tmp, dest)
    except BaseException:
        os.rename(old, dest)
        raise
    if old.is_dir() and not old.is_symlink():
        shutil.rmtree(old, ignore_errors=True)
    else:
        old.unlink(missing_ok=True)


def extract_archive(source: Source, dest: Path, *, allow: Optional[re.Pattern] = DEFAULT_ALLOW,
                    max_bytes: int = MAX_BYTES, max_members: int = MAX_MEMBERS, exclude: Sequence[str] = (),
                    max_ratio: float = MAX_RATIO) -> list[str]:
    """Unpack a tar or tar.gz from an untrusted machine into dest (replacing it), by the rules in
    this module's docstring. Returns the normalised names created (directories and files), in
    archive order. Raises UnsafeArchive (dest untouched) when any member breaks a rule."""
    dest = Path(dest)
    if isinstance(source, (str, os.PathLike)):
        with open(source, "rb") as f:
            return extract_archive(f, dest, allow=allow, max_bytes=max_bytes, max_members=max_members,
                                   exclude=exclude, max_ratio=max_ratio)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.incoming-", dir=dest.parent))
    root = os.path.realpath(tmp)
    # headers: 512 bytes, padding up to 511, pax or long-name headers (a few KiB) per member
    cap = max_bytes + (max_members + 2) * 8192 + 1024 * 1024
    names: list[str] = []
    made: dict[str, bool] = {}
    dropped: dict[str, int] = {}
    total, count = 0, 0
    try:
        compressed = _Counted(source)
        stream = _Guard(_open_stream(io.BufferedReader(compressed)), cap, compressed, max_ratio)
        try:
            with tarfile.open(fileobj=stream, mode="r:") as tar:  # type: ignore[call-overload]
                while True:
                    stream.header_reads = 0
                    m = tar.next()
                    if m is None:
                        break
                    count += 1
                    label = m.name
                    if count > max_members:
                        raise UnsafeArchive(label, f"the archive holds more than {max_members} members")
                    kind = _member_type(m)
                    if kind == "dir" and m.name in (".", "./"):
                        continue  # the archive's own root entry ("./" from `tar -C dir .`): nothing to make
                    norm = safe_member_name(m.name, allow)
                    if kind not in ("file", "dir"):
                        raise UnsafeArchive(label, f"a {kind} (only regular files and directories are allowed)")
                    top = norm.split("/", 1)[0]
                    if top in exclude:  # bulk that stays on the machine, whatever its tar sent
                        dropped[top] = dropped.get(top, 0) + 1
                        continue
                    if kind == "dir":
                        _make_dirs(root, norm, label, made)
                    else:
                        if m.size < 0 or total + m.size > max_bytes:
                            raise UnsafeArchive(label, f"the archive holds more than {max_bytes} bytes "
                                                       f"(this member declares {m.size})")
                        reader = tar.extractfile(m)
                        assert reader is not None
                        stream.in_data = True
                        try:
                            total += _write_file(root, norm, label, reader, m.size, m.mode, max_bytes - total,
                                                 made)
                        finally:
                            stream.in_data = False
                    names.append(norm)
        except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as e:
            raise UnsafeArchive("<archive>", f"not a valid tar archive: {type(e).__name__}: {e}") from None
        if dropped:
            log.warning("dropped from the archive (bulk outputs stay on the machine, its tar sent them anyway): %s",
                        ", ".join(f"{n} members under {top}/" for top, n in sorted(dropped.items())))
        os.chmod(tmp, 0o755)
        _swap_into(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return names
