"""infra/machines/archive.py: the one way files come home from an (untrusted) machine. Crafted hostile tars are
refused member by member, before anything is written; nothing outside dest changes; dest is
replaced only by a fully checked archive."""
import hashlib
import io
import os
import re
import stat
import tarfile
from pathlib import Path

import pytest

from infra.machines.archive import UnsafeArchive, extract_archive, safe_member_name
from infra.machines.local import LocalMachine
from infra.machines.machine import MachineError


def _file(name: str, data: bytes = b"x", mode: int = 0o644) -> tuple[tarfile.TarInfo, bytes]:
    ti = tarfile.TarInfo(name)
    ti.size, ti.mode = len(data), mode
    return ti, data


def _special(name: str, kind: bytes, linkname: str = "") -> tuple[tarfile.TarInfo, None]:
    ti = tarfile.TarInfo(name)
    ti.type, ti.linkname = kind, linkname
    if kind in (tarfile.CHRTYPE, tarfile.BLKTYPE):
        ti.devmajor, ti.devminor = 1, 3
    return ti, None


def _dir(name: str) -> tuple[tarfile.TarInfo, None]:
    ti = tarfile.TarInfo(name)
    ti.type, ti.mode = tarfile.DIRTYPE, 0o755
    return ti, None


def make_tar(members, gz: bool = False, fmt=tarfile.PAX_FORMAT) -> io.BytesIO:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz" if gz else "w", format=fmt) as tar:
        for ti, data in members:
            tar.addfile(ti, io.BytesIO(data) if data is not None else None)
    buf.seek(0)
    return buf


def tree_hash(root: Path) -> str:
    """Names, types, modes and contents of everything under root (links not followed)."""
    h = hashlib.sha256()
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(dirnames + filenames):
            p = Path(dirpath) / name
            st = p.lstat()
            h.update(f"{p.relative_to(root)}|{stat.S_IFMT(st.st_mode)}|{stat.S_IMODE(st.st_mode)}".encode())
            if stat.S_ISREG(st.st_mode):
                h.update(p.read_bytes())
            elif stat.S_ISLNK(st.st_mode):
                h.update(os.readlink(p).encode())
    return h.hexdigest()


@pytest.fixture
def place(tmp_path):
    """dest (with old content) and a sentinel tree beside it, as a hostile archive would aim at."""
    work = tmp_path / "work"
    dest = work / "incoming"
    (dest / "old").mkdir(parents=True)
    (dest / "old" / "keep.txt").write_text("old content\n")
    sentinel = tmp_path / "sentinel"
    sentinel.mkdir()
    (sentinel / "x").write_text("precious\n")
    (sentinel / "secret.txt").write_text("do not touch\n")
    (tmp_path / "x").write_text("also precious\n")
    before = (tree_hash(tmp_path / "sentinel"), tree_hash(dest), (tmp_path / "x").read_bytes())
    yield work, dest, sentinel
    assert (tree_hash(tmp_path / "sentinel"), tree_hash(dest), (tmp_path / "x").read_bytes()) == before
    assert sorted(p.name for p in work.iterdir()) == ["incoming"]  # no temp dir left behind
    assert not list(tmp_path.rglob("pwned*"))


REFUSED = {
    "absolute name": ([_file("/tmp/pwned-abs")], "absolute"),
    "dot-dot name": ([_file("../pwned")], r"'\.\.'"),
    "dot-dot inside": ([_file("a/../../x", b"overwritten")], r"'\.\.'"),
    "dot-dot later": ([_file("good.txt"), _file("sub/../../sentinel/x", b"overwritten")], r"'\.\.'"),
    "symlink": ([_special("link", tarfile.SYMTYPE, "../sentinel")], "symlink"),
    "symlink then write through": ([_special("link", tarfile.SYMTYPE, "../../sentinel"),
                                    _file("link/secret.txt", b"overwritten")], "symlink"),
    "relative symlink inside": ([_file("a.txt"), _special("b.txt", tarfile.SYMTYPE, "a.txt")], "symlink"),
    "hardlink": ([_special("hl", tarfile.LNKTYPE, "../sentinel/secret.txt")], "hard link"),
    "char device": ([_special("null", tarfile.CHRTYPE)], "character device"),
    "block device": ([_special("sda", tarfile.BLKTYPE)], "block device"),
    "fifo": ([_special("pipe", tarfile.FIFOTYPE)], "fifo"),
    "empty name": ([_file("")], "empty"),
    "dot name file": ([_file(".")], r"empty or '\.'"),
    "duplicate": ([_file("a.txt"), _file("a.txt", b"second")], "twice"),
    "file then dir under it": ([_file("a"), _file("a/b")], "directory is needed"),
    "control character": ([_file("evil\nname")], "allowlist"),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_hostile_members_are_refused(place, case):
    work, dest, _ = place
    members, rule = REFUSED[case]
    with pytest.raises(UnsafeArchive, match=rule) as e:
        extract_archive(make_tar(members), dest)
    assert isinstance(e.value, MachineError) and e.value.retryable is False
    assert repr(e.value.member) in str(e.value)


def test_gnu_sparse_member_is_refused(place):
    _, dest, _ = place
    ti, data = _file("sparse.bin", b"abc")
    ti.type = tarfile.GNUTYPE_SPARSE
    with pytest.raises(UnsafeArchive, match="sparse"):
        extract_archive(make_tar([(ti, data)], fmt=tarfile.GNU_FORMAT), dest)


def test_caps_on_bytes_and_members(place):
    _, dest, _ = place
    with pytest.raises(UnsafeArchive, match="more than 1000 bytes"):
        extract_archive(make_tar([_file("a", b"x" * 600), _file("b", b"y" * 600)]), dest, max_bytes=1000)
    with pytest.raises(UnsafeArchive, match="more than 1000 bytes"):  # one member alone
        extract_archive(make_tar([_file("big", b"x" * 1001)]), dest, max_bytes=1000)
    with pytest.raises(UnsafeArchive, match="more than 3 members"):
        extract_archive(make_tar([_file(f"f{i}") for i in range(4)]), dest, max_members=3)


def test_allowlist(place):
    _, dest, _ = place
    allow = re.compile(r"[\w.-]+(/[\w.-]+)*")
    with pytest.raises(UnsafeArchive, match="allowlist") as e:
        extract_archive(make_tar([_file("ok.txt"), _file("no spaces.txt")]), dest, allow=allow)
    assert e.value.member == "no spaces.txt"


def test_bad_stream_is_refused(place):
    _, dest, _ = place
    good = make_tar([_file("a.txt", b"hello" * 1000)], gz=True).getvalue()
    with pytest.raises(UnsafeArchive, match="not a valid tar"):
        extract_archive(io.BytesIO(good[: len(good) // 2]), dest)  # truncated gzip
    with pytest.raises(UnsafeArchive, match="not a valid tar"):
        extract_archive(io.BytesIO(b"this is no tar at all" * 100), dest)


def test_huge_pax_header_is_not_read_into_memory(place):
    _, dest, _ = place
    ti, data = _file("a.txt")
    ti.pax_headers = {"comment": "1" * (64 * 1024)}  # also the CVE-2024-6232 backtracking shape
    with pytest.raises(UnsafeArchive, match="extended header"):
        extract_archive(make_tar([(ti, data)]), dest)
    many = [_file(f"{i}/" + "n" * 200 + "/" + "m" * 200) for i in range(3000)]  # 3000 x 4.5 KiB pax headers
    for m, _ in many:
        m.pax_headers = {"comment": "c" * 4000}
    with pytest.raises(UnsafeArchive, match="in all"):
        extract_archive(make_tar(many), dest)


def test_long_names_in_gnu_and_pax_formats(tmp_path):
    long = "/".join(["d" * 200] * 10) + "/f.txt"  # ~2 KiB: GNU long-name / pax path headers
    for fmt in (tarfile.GNU_FORMAT, tarfile.PAX_FORMAT):
        assert extract_archive(make_tar([_file(long, b"deep")], fmt=fmt), tmp_path / "d") == [long]
        assert (tmp_path / "d" / long).read_bytes() == b"deep"


def test_good_archive_replaces_dest(tmp_path):
    dest = tmp_path / "work" / "incoming"
    (dest / "old").mkdir(parents=True)
    (dest / "old" / "stale.txt").write_text("stale")
    suid, _ = _file("run.sh", b"#!/bin/sh\necho hi\n", mode=0o4777)
    members = [_dir("./"), _dir("./sub"), _file("./sub/a.txt", b"alpha"), (suid, b"#!/bin/sh\necho hi\n"),
               _file("./b.bin", bytes(range(256)) * 100), _file("deep/er/c.txt", b""), _file("x//y/./z", b"z")]
    for gz in (False, True):
        names = extract_archive(make_tar(members, gz=gz), dest)
        assert names == ["sub", "sub/a.txt", "run.sh", "b.bin", "deep/er/c.txt", "x/y/z"]
        assert not (dest / "old").exists()  # replaced, not merged
        assert (dest / "sub" / "a.txt").read_bytes() == b"alpha"
        assert (dest / "b.bin").read_bytes() == bytes(range(256)) * 100
        assert (dest / "deep" / "er" / "c.txt").read_bytes() == b""
        assert (dest / "x" / "y" / "z").read_bytes() == b"z"
        assert stat.S_IMODE((dest / "run.sh").stat().st_mode) & 0o7000 == 0  # no setuid/setgid/sticky
        assert (dest / "run.sh").stat().st_mode & 0o100  # still executable by us
        assert stat.S_IMODE((dest / "sub" / "a.txt").stat().st_mode) & ~0o644 == 0
        assert sorted(p.name for p in dest.parent.iterdir()) == ["incoming"]


def test_extract_from_a_path_into_a_new_dest(tmp_path):
    tar = tmp_path / "in.tar.gz"
    tar.write_bytes(make_tar([_file("a.txt", b"A")], gz=True).getvalue())
    assert extract_archive(tar, tmp_path / "new" / "dest") == ["a.txt"]
    assert (tmp_path / "new" / "dest" / "a.txt").read_text() == "A"


def test_safe_member_name():
    assert safe_member_name("./a//b/") == "a/b"
    assert safe_member_name("step-100") == "step-100"
    for bad in ("", ".", "./", "/etc/passwd", "..", "a/../../b", "a/..", "x\0y"):
        with pytest.raises(UnsafeArchive):
            safe_member_name(bad)
    one = re.compile(r"[^/]+")
    with pytest.raises(UnsafeArchive, match="allowlist"):
        safe_member_name("a/b", one)
    assert safe_member_name("model.onnx", one) == "model.onnx"


def test_local_get_refuses_a_symlink_pointing_outside(tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("home secret\n")
    m = LocalMachine(tmp_path / "home")
    out = m.home / "qat" / "work" / "train"
    out.mkdir(parents=True)
    (out / "metrics.json").write_text("{}")
    (out / "leak").symlink_to(secret)
    dest = tmp_path / "back"
    with pytest.raises(UnsafeArchive, match="symlink") as e:
        m.get("qat/work/train", dest)
    assert e.value.member == "leak"
    assert not dest.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["home", "secret.txt"]
    assert secret.read_text() == "home secret\n"
    (out / "leak").unlink()
    m.get("qat/work/train", dest)
    assert sorted(p.name for p in dest.iterdir()) == ["metrics.json"]


def test_local_get_caps_and_special_files(tmp_path):
    m = LocalMachine(tmp_path / "home")
    (m.home / "big.bin").write_bytes(b"x" * 2000)
    with pytest.raises(UnsafeArchive, match="cap"):
        m.get("big.bin", tmp_path / "big.bin", max_bytes=1000)
    assert not list(tmp_path.glob("big.bin*"))
    m.get("big.bin", tmp_path / "big.bin", max_bytes=2000)
    assert (tmp_path / "big.bin").stat().st_size == 2000
    os.mkfifo(m.home / "pipe")
    with pytest.raises(UnsafeArchive, match="not a regular file"):
        m.get("pipe", tmp_path / "pipe")
    (m.home / "d").mkdir()
    os.mkfifo(m.home / "d" / "pipe")
    with pytest.raises(UnsafeArchive, match="fifo"):
        m.get("d", tmp_path / "d")


def test_ssh_get_refuses_links_and_caps(sshd_host, tmp_path):
    """The real path home: a rented machine's directory holding a symlink (or too much) is refused,
    and nothing lands; a clean directory replaces dest."""
    from infra.machines.machine import Lease
    from infra.machines.ssh import SSHMachine

    lease = Lease(backend="ssh", label="t", host=sshd_host.host, port=sshd_host.port, user=sshd_host.user,
                  key_path=str(sshd_host.key_path))
    secret = tmp_path / "secret.txt"
    secret.write_text("home secret\n")
    out = sshd_host.home / "qat" / "work" / "train"
    out.mkdir(parents=True)
    (out / "metrics.json").write_text("{}")
    (out / "leak").symlink_to(secret)
    dest = tmp_path / "back"
    with SSHMachine(lease, connect_timeout=20).connect() as m:
        with pytest.raises(UnsafeArchive, match="symlink"):
            m.get("qat/work/train", dest)
        assert not dest.exists() and secret.read_text() == "home secret\n"
        (out / "leak").unlink()
        (out / "w.bin").write_bytes(os.urandom(5000))
        with pytest.raises(UnsafeArchive, match="more than 4000 bytes"):
            m.get("qat/work/train", dest, max_bytes=4000)
        with pytest.raises(UnsafeArchive, match="cap"):
            m.get("qat/work/train/w.bin", tmp_path / "w.bin", max_bytes=4000)
        assert not dest.exists() and not list(tmp_path.glob("w.bin*"))
        dest.mkdir()
        (dest / "stale").write_text("old")
        m.get("qat/work/train", dest)
        assert sorted(p.name for p in dest.iterdir()) == ["metrics.json", "w.bin"]
        m.get("qat/work/train/w.bin", tmp_path / "w.bin")
        assert (tmp_path / "w.bin").read_bytes() == (out / "w.bin").read_bytes()
        assert sorted(p.name for p in tmp_path.iterdir()) == ["back", "secret.txt", "sshd", "w.bin"]


# ---------------------------------------------------------------- bounded work (issue 19: 4, 11)

def _pax_chain(n: int) -> io.BytesIO:
    """n pax headers in a row, then one file: tarfile recurses once per header."""
    payload = b"20 comment=abcdefgh\n"
    ti = tarfile.TarInfo("././@PaxHeader")
    ti.type, ti.size = tarfile.XHDTYPE, len(payload)
    chain = (ti.tobuf(tarfile.USTAR_FORMAT) + payload.ljust(tarfile.BLOCKSIZE, b"\0")) * n
    return io.BytesIO(chain + make_tar([_file("a.txt")], fmt=tarfile.USTAR_FORMAT).getvalue())


BOUNDED = {
    "a tree 1100 levels deep": (lambda: make_tar([_file("d/" * 1100 + "f")]), r"1101 levels deep \(at most 32\)"),
    "33 levels": (lambda: make_tar([_file("d/" * 32 + "f")]), "33 levels deep"),
    "a 256-byte part": (lambda: make_tar([_file("a/" + "n" * 256)]), "a path part of over 255 bytes"),
    "a 2 KiB name": (lambda: make_tar([_file("/".join(["n" * 200] * 11))]), "a name of over 2048 bytes"),
    "a chain of 2000 pax headers": (lambda: _pax_chain(2000), "a chain of over 16 headers"),
    "a gzip bomb": (lambda: make_tar([_file("zeros", bytes(40 * 1024 * 1024))], gz=True), "compression bomb"),
}


@pytest.mark.parametrize("case", sorted(BOUNDED))
def test_deep_long_chained_and_bomb_archives_are_refused_cheaply(place, case, monkeypatch):
    """Refused as UnsafeArchive (never RecursionError), with nothing left beside dest (the place
    fixture checks), after reading a bounded part of the tar stream: the work is counted in bytes
    asked of the (decompressed) stream tarfile reads through, not timed (a loaded machine is slow)."""
    from infra.machines import archive

    asked = []
    read = archive._Guard._read

    def counted(self, n: int) -> bytes:
        asked.append(n)
        return read(self, n)

    monkeypatch.setattr(archive._Guard, "_read", counted)
    _, dest, _ = place
    make, rule = BOUNDED[case]
    src = make()
    with pytest.raises(UnsafeArchive, match=rule):
        extract_archive(src, dest)
    # the bomb's 40 MiB member: cut just past RATIO_FREE_BYTES; the others: a few headers (the
    # 2000-header chain is 2 MB, each of the rest one member's headers and a block of data)
    bound = archive.RATIO_FREE_BYTES + 2 * archive.CHUNK if case == "a gzip bomb" else 16 * 1024
    assert 0 < sum(asked) <= bound, (len(asked), sum(asked))


def test_the_deepest_allowed_tree_and_short_chains_still_extract(tmp_path):
    deep = "/".join(["d"] * 31) + "/f"
    assert extract_archive(make_tar([_file(deep, b"ok")]), tmp_path / "a")[-1] == deep
    assert extract_archive(_pax_chain(3), tmp_path / "b") == ["a.txt"]
    zeros = make_tar([_file("zeros", bytes(8 * 1024 * 1024))], gz=True)  # under RATIO_FREE_BYTES: no ratio check
    assert extract_archive(zeros, tmp_path / "c") == ["zeros"]


def test_excluded_top_level_names_are_dropped_whatever_the_machine_sent(tmp_path):
    members = [_dir("./"), _file("./model.bin", b"m"), _dir("./checkpoints"), _dir("./checkpoints/step-4"),
               _file("./checkpoints/step-4/optimizer.pt", b"bulk"), _file("./checkpoints-set-aside/h/step-1/x", b"b"),
               _file("./checkpointsX", b"kept: not an excluded name")]
    names = extract_archive(make_tar(members), tmp_path / "train", exclude=("checkpoints", "checkpoints-set-aside"))
    assert names == ["model.bin", "checkpointsX"]
    assert sorted(p.name for p in (tmp_path / "train").iterdir()) == ["checkpointsX", "model.bin"]
