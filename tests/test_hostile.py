"""Hostile inputs: broken API answers, odd transcripts and audio, shell metacharacters.

Each must give a clear error (or a counted drop), never a crash, a leaked instance, the API key in a
traceback, or a command run by accident."""
from __future__ import annotations

import json
import logging
import subprocess
import sys
import traceback
import wave
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from infra.backends.vast import hostkeys
from infra.machines.machine import Lease, build_command
from infra.backends.vast.api import VastAPIError
from infra.backends.vast.instances import VastProvider
from contract.config import load_config, parse_config

MODES = ("html", "empty", "truncated", "missing_fields", "wrong_types")
NASTY = ["$(touch pwned1)", "`touch pwned2`", "a; touch pwned3", "x && touch pwned4 #", "'single' \"double\"",
         "new\nline", "tab\there", "back\\slash", "*", "~", "-n", "--", "", "é à ç 🎙", "$HOME", "a|touch pwned5",
         ">pwned6", "!!", "{a,b}"]


def _traceback(exc: BaseException) -> str:
    return "".join(traceback.format_exception(exc))


def _provider(emulator) -> VastProvider:
    return VastProvider(api_key=emulator.api_key, server_url=emulator.url, poll_s=0.2, backoff_s=0.02)


# ---------------------------------------------------------------- malformed Vast.ai answers

@pytest.mark.parametrize("mode", MODES)
def test_malformed_answer_to_create_leaks_nothing(emulator, mode, caplog):
    """The create call's answer is garbled: launch sweeps by label, tries again, and either rents
    a working machine or says clearly why not; nothing stays alive; the key is nowhere."""
    caplog.set_level(logging.DEBUG)
    p = _provider(emulator)
    armed = []

    def log(msg: str) -> None:  # "renting offer ..." is logged just before the create call
        if msg.startswith("renting offer") and not armed:
            armed.append(emulator.set_faults(malformed=mode, malformed_count=1))

    p.log = log
    cfg = load_config("tiny", {"machine.provision_timeout_s": 20, "machine.vast.create_attempts": 2})
    try:
        lease = p.launch(cfg.machine, f"qat-hostile-{mode}", "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHostile test")
    except VastAPIError as e:
        assert "Vast.ai" in str(e) or "offer" in str(e), str(e)
        assert emulator.api_key not in _traceback(e)
    else:
        assert p.destroy(int(lease.instance_id))
    assert armed, "the create call was never reached"
    assert emulator.live_instances() == [], f"{mode}: an instance was left alive"
    assert emulator.api_key not in caplog.text


@pytest.mark.parametrize("mode", MODES)
def test_malformed_answer_while_destroying_still_confirms(emulator, mode):
    p = _provider(emulator)
    offer = p.search_offers(load_config("tiny").machine.vast)[0]
    iid = p._sdk.create_instance(offer["id"], image="x", disk=10, label="qat-d")["new_contract"]
    emulator.set_faults(malformed=mode, malformed_count=2)
    assert p.destroy(iid) is True
    assert emulator.live_instances() == []


@pytest.mark.parametrize("status", [502, 503])
def test_html_gateway_errors_are_retried(emulator, status):
    """A Cloudflare-style 502/503 page is transient: retried, then the real answer is used."""
    emulator.set_faults(malformed="html", malformed_count=2, malformed_status=status)
    offers = _provider(emulator).search_offers(load_config("tiny").machine.vast)
    assert offers and all("dph_total" in o for o in offers)


@pytest.mark.parametrize("mode", ["html", "truncated", "wrong_types"])
def test_reaper_cli_on_garbage_exits_clearly_without_the_key(emulator, mode):
    p = _provider(emulator)
    offer = p.search_offers(load_config("tiny").machine.vast)[0]
    iid = p._sdk.create_instance(offer["id"], image="x", disk=10, label="qat-r")["new_contract"]
    emulator.set_faults(malformed=mode, malformed_count=10)
    env = {"VAST_API_KEY": emulator.api_key, "PATH": "/usr/bin:/bin"}
    r = subprocess.run([sys.executable, "-m", "infra.reaper", "--max-age-hours", "1", "--url", emulator.url],
                       capture_output=True, text=True, env=env, cwd=Path(__file__).resolve().parents[1], timeout=120)
    out = r.stdout + r.stderr
    if mode == "wrong_types":  # a readable listing whose row is garbled: that row skipped and said, the pass goes on
        assert r.returncode == 0 and "skipped: malformed Vast.ai list instances row" in r.stdout, out
    else:
        assert r.returncode == 2, out
        assert r.stderr.startswith("reaper: ") and "Vast.ai list instances" in r.stderr, out
    assert "Traceback" not in out and emulator.api_key not in out
    emulator.clear_faults()
    assert p.destroy(iid)


# ---------------------------------------------------------------- odd transcripts and audio

def _tone(seconds: float, sr: int = 16000) -> np.ndarray:
    t = np.arange(int(seconds * sr)) / sr
    return (0.3 * np.sin(2 * np.pi * 330 * t)).astype(np.float32)


def test_odd_transcripts_and_broken_audio_are_kept_or_counted(tmp_path, french_manifest, tiny_model_dir):
    from datasets import load_from_disk

    from steps import prepare
    from steps.common import execute_step

    good = {s: [r for r in french_manifest if r["split"] == s][:1] for s in ("train", "dev", "test")}
    tone = tmp_path / "tone.wav"
    sf.write(tone, _tone(2.0), 16000)
    odd_texts = ["Ça coûte 5 € — l'été « chaud » 🌞", "zéro\u200blargeur\u200d et \u202edroite-à-gauche",
                 "contrôle\x07\x1b[31m rouge", "NUL\x00 au milieu", "ﬁn de ligature ＦＵＬＬ", "<|endoftext|> <|fr|>"]
    rows = [r for rs in good.values() for r in rs]
    rows += [{"audio": str(tone), "text": t, "speaker": "odd", "split": "train"} for t in odd_texts]

    (tmp_path / "empty.wav").write_bytes(b"")                         # 0 bytes
    with wave.open(str(tmp_path / "header_only.wav"), "wb") as w:      # a valid WAV with no samples
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(16000)
    full = (tmp_path / "full.wav")
    sf.write(full, _tone(2.0), 16000, subtype="PCM_16")
    (tmp_path / "truncated.wav").write_bytes(full.read_bytes()[:30])  # header cut in the middle
    (tmp_path / "random.flac").write_bytes(np.random.default_rng(0).bytes(4096))
    sf.write(tmp_path / "nan.wav", np.full(32000, np.nan, np.float32), 16000, subtype="FLOAT")
    sf.write(tmp_path / "silent.wav", np.zeros(32000, np.float32), 16000)
    (tmp_path / "a_directory.wav").mkdir()
    # A file that decodes to nothing may be called unreadable (libsndfile) or empty (the FFmpeg fallback).
    broken = {"empty.wav": ("unreadable_audio", "empty_audio"), "header_only.wav": ("empty_audio",),
              "truncated.wav": ("unreadable_audio", "empty_audio"), "random.flac": ("unreadable_audio",),
              "nan.wav": ("non_finite_audio",), "silent.wav": ("silent_audio",), "a_directory.wav": ("unreadable_audio",)}
    rows += [{"audio": str(tmp_path / name), "text": "un texte", "speaker": "bad", "split": "train"} for name in broken]
    rows += [{"audio": str(tone), "text": t, "speaker": "bad", "split": "train"} for t in (42, None, ["liste"], " \n\t ")]
    rows += [{"audio": str(tone), "text": "mot " * 600, "speaker": "bad", "split": "train"}]
    manifest = tmp_path / "manifest.jsonl"
    manifest.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n", encoding="utf-8")

    cfg = parse_config({"name": "t", "model": {"name_or_path": "fixture:tiny-random"}, "quant": {"scheme": "int8"},
                        "data": {"source": "manifest", "manifest": str(manifest), "max_samples": 50,
                                 "max_eval_samples": 50, "min_seconds": 0.5}, "machine": {"backend": "local"}})
    workdir = tmp_path / "work"
    assert execute_step("prepare", cfg, workdir, prepare.run) == 0
    m = json.loads((workdir / "prepare" / "result.json").read_text())["metrics"]
    dropped = dict(m["dropped"])
    assert dropped.pop("empty_text") == 4 and dropped.pop("labels_too_long") == 1, m["dropped"]
    audio_reasons = {r for rs in broken.values() for r in rs}
    assert set(dropped) <= audio_reasons and sum(dropped.values()) == len(broken), m["dropped"]
    assert dropped["non_finite_audio"] == 1 and dropped["silent_audio"] == 1 and dropped["empty_audio"] >= 1
    assert m["counts"] == {"train": 1 + len(odd_texts), "dev": 1, "test": 1}
    train = load_from_disk(str(workdir / "prepare" / "train"))
    kept = [r["text"] for r in train if r["speaker"] == "odd"]
    assert len(kept) == len(odd_texts) and "Ça coûte 5 € — l'été « chaud » 🌞" in kept
    assert all(len(r["labels"]) > 3 for r in train)


# ---------------------------------------------------------------- shell metacharacters

ECHO_ARGV = [sys.executable, "-c", "import json, os, sys; print(json.dumps([sys.argv[1:], os.environ.get('V')]))"]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(args=st.lists(st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=12),
                     max_size=4),
       value=st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=12))
def test_build_command_passes_any_text_verbatim(tmp_path, args, value):
    """Through a real shell, every argv item, env value and the cwd arrive exactly as given."""
    cwd = tmp_path / "dir $(touch pwned) `x` ; 'q'"
    cwd.mkdir(exist_ok=True)
    cmd = build_command(ECHO_ARGV + args, env={"V": value}, cwd=str(cwd))
    r = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, cwd=tmp_path, timeout=30)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == [args, value]
    assert not list(tmp_path.rglob("pwned*"))


@pytest.fixture
def ssh_machine(sshd_host):
    from infra.machines.ssh import SSHMachine

    lease = Lease(backend="ssh", label="qat-$(touch pwned-label);`id`", host=sshd_host.host, port=sshd_host.port,
                  user=sshd_host.user, key_path=str(sshd_host.key_path))
    m = SSHMachine(lease, connect_timeout=20).connect()
    yield m
    m.close()


def test_ssh_paths_and_arguments_with_metacharacters(ssh_machine, sshd_host, tmp_path):
    """run/put/get/write_text/exists/free_disk_gb with hostile remote paths: no command is injected."""
    m, home = ssh_machine, sshd_host.home
    seen: list[str] = []
    m.run(ECHO_ARGV + NASTY, env={"V": "$(touch pwned-env)"}, on_line=seen.append)
    assert json.loads(seen[-1]) == [NASTY, "$(touch pwned-env)"]
    remote = "qat/w $(touch pwned-a)/`touch pwned-b`;touch pwned-c/'it'\"s\""
    m.write_text(f"{remote}/run.yaml", "name: x\n")
    assert (home / remote / "run.yaml").read_text() == "name: x\n"
    assert m.exists(f"{remote}/run.yaml") and not m.exists(f"{remote}/$(touch pwned-d)")
    assert m.free_disk_gb(f"{remote}/not yet $(touch pwned-e)") > 0
    src = tmp_path / "src"
    (src / "pkg").mkdir(parents=True)
    (src / "pkg" / "a;b $(x).txt").write_text("payload")
    m.put(src, f"{remote}/code", include=["pkg"], respect_gitignore=False)
    assert (home / remote / "code" / "pkg" / "a;b $(x).txt").read_text() == "payload"
    m.get(f"{remote}/code", tmp_path / "back")
    assert (tmp_path / "back" / "pkg" / "a;b $(x).txt").read_text() == "payload"
    m.run(["ls"], cwd=remote, on_line=seen.append)
    assert "run.yaml" in seen
    assert not list(home.rglob("pwned*")) and not list(Path.cwd().glob("pwned*"))


def test_onstart_script_quotes_the_key(tmp_path):
    """A public key carrying shell syntax is written verbatim into authorized_keys, never run."""
    key = "ssh-ed25519 AAAA $(touch pwned1) `touch pwned2`; touch pwned3 'x'"
    script = hostkeys.onstart_script(key)
    r = subprocess.run(["bash", "-c", script], cwd=tmp_path, env={"HOME": str(tmp_path), "PATH": "/usr/bin:/bin"},
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / ".ssh" / "authorized_keys").read_text() == key + "\n"
    subprocess.run(["bash", "-c", script], cwd=tmp_path, env={"HOME": str(tmp_path), "PATH": "/usr/bin:/bin"}, check=True)
    assert (tmp_path / ".ssh" / "authorized_keys").read_text() == key + "\n"  # idempotent
    assert not list(tmp_path.rglob("pwned*"))


def test_a_full_disk_wrapped_by_a_library_is_deterministic_and_named():
    """datasets (and others) wrap ENOSPC in their own error: still 'disk full', never retried."""
    import errno

    from steps.common import _classify

    class DatasetGenerationError(Exception):
        pass

    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError as e:
            raise DatasetGenerationError("An error occurred while generating the dataset") from e
    except DatasetGenerationError as wrapped:
        retryable, message = _classify(wrapped)
    assert retryable is False and "disk is full" in message and "min_disk_gb" in message
    assert _classify(RuntimeError("socket closed"))[0] is True


# ---------------------------------------------------------------- what is worth a retry (by type and status)

def test_is_transient_by_type_and_status_not_by_text():
    import errno
    import socket

    import requests

    from infra.backends.vast.api import SearchQuotaExceeded, VastAPIError
    from tasks.retry import is_transient

    table = [
        (OSError(errno.ENOSPC, "No space left on device"), False),
        (OSError(errno.EACCES, "Permission denied"), False),
        (PermissionError(errno.EACCES, "Permission denied"), False),
        (FileNotFoundError(errno.ENOENT, "missing"), False),
        (OSError(errno.EROFS, "Read-only file system"), False),
        (OSError(errno.ECONNRESET, "Connection reset by peer"), True),
        (OSError(errno.EHOSTUNREACH, "No route to host"), True),
        (ConnectionResetError(errno.ECONNRESET, "reset"), True),
        (BrokenPipeError(errno.EPIPE, "broken pipe"), True),
        (TimeoutError("timed out"), True),
        (socket.timeout("timed out"), True),
        (socket.gaierror(-2, "Name or service not known"), True),
        (requests.ConnectionError("connection aborted"), True),
        (RuntimeError("disk 429 GB is full"), False),  # "429" in the text is not a rate limit
        (VastAPIError("Vast.ai search offers failed: HTTP 429", status=429, retryable=True), True),
        (VastAPIError("Vast.ai create instance failed: HTTP 400", status=400), False),
        (SearchQuotaExceeded("Vast.ai daily search quota exceeded; retry after UTC midnight", status=429), False),
    ]
    for exc, expected in table:
        assert is_transient(exc) is expected, (exc, expected)
