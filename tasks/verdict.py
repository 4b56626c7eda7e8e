"""The orchestrator's own quality verdict, re-scored at home from the machine's transcripts.

The rented machine is a stranger's computer: its result.json is a claim, not a measurement. The
evaluate step also sends back, per variant, every test utterance's reference and hypothesis
(`evaluate/utterances_<variant>.csv`, written by steps/evaluate.py `write_utterances`). Here those
CSVs are read (size, row and field caps; any bad row refuses the file) and held against the test
set home read itself (tasks/references.py: ids and references from the manifest or the Hub, never
from the machine): every test id present exactly once, no other id, each reference the test split's.
The hypotheses are then scored against home's references, normalized with contract/normalize.py,
corpus WER/CER counted with contract/quality.py (jiwer, as the step counts them), and the gate
rule (contract/quality.py `gate_rule`, the step's own) applied to the recomputed per-utterance
errors (paired bootstrap intervals of each difference, the same seed as the step). The
machine's numbers are only compared: a claimed WER more than `WER_TOLERANCE` points away from the
recomputed one, a claimed verdict or count that differs, or transcripts missing, malformed or not
of the test set, and the gate fails saying the machine's claim did not match.

The machine's normalized columns and error counts are ignored. What this cannot catch: hypotheses
the machine forged (home does not run the model), e.g. each hypothesis written equal to the
true reference.

Plain code, no Prefect: tasks/gate.py and tasks/upload.py call `verify_evaluation`.
"""
from __future__ import annotations

import csv
import io
import math
import os
import re
import stat
from pathlib import Path
from typing import Any, Optional

from contract.catalogue import KNOWN_VARIANTS, ptq_variant, quantized_variant
from contract.config import RunConfig
from contract.normalize import normalize_french
from contract.quality import corpus_rate, gate_rule, utterance_errors

from .references import HomeTestSet, HomeTestSetUnreadable, home_test_set
from .scorecard import gate_sentence, md_text, measured

WER_TOLERANCE = 0.01          # points of WER a claim may differ from the recomputed value (the step rounds to 0.001)
MAX_CSV_BYTES = 64 * 2**20    # one variant's transcripts; 500 test clips take ~100 kB
MAX_ROWS = 200_000
MAX_FIELD_CHARS = 20_000      # one transcript; a 30 s clip is a few hundred characters
COLUMNS = ("id", "reference", "hypothesis", "reference_normalized", "hypothesis_normalized", "errors", "words",
           "char_errors", "chars")
CLAIM_MISMATCH = "the machine's claim did not match the orchestrator's check of its transcripts"
NO_VERDICT = "the evaluate step recorded no gate verdict"


_COUNT = re.compile(r"[0-9]{1,12}")


class BadTranscripts(ValueError):
    """The machine's per-utterance CSV is missing, too big or malformed; the message says where."""


def utterances_path(local_work: Path, variant: str) -> Path:
    return Path(local_work) / "evaluate" / f"utterances_{variant}.csv"


def verified_variants(scheme: str, references=("qat_fp32",)) -> tuple[str, ...]:
    """The variants the gate compares, in the order the gate names them."""
    return tuple(dict.fromkeys((quantized_variant(scheme), *references, ptq_variant(scheme))))


def _read_capped(path: Path) -> bytes:
    """The bytes of a regular file (no symlink, no device, no FIFO), at most MAX_CSV_BYTES."""
    name = f"evaluate/{path.name}"
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        raise BadTranscripts(f"{name} is missing") from None
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISREG(st.st_mode):
        raise BadTranscripts(f"{name} is not a regular file (a symlink or special file is refused)")
    if st.st_size > MAX_CSV_BYTES:
        raise BadTranscripts(f"{name} is {st.st_size} bytes, over the {MAX_CSV_BYTES} byte cap")
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            raise BadTranscripts(f"{name} is not a regular file")
        data = f.read(MAX_CSV_BYTES + 1)
    if len(data) > MAX_CSV_BYTES:
        raise BadTranscripts(f"{name} grew over the {MAX_CSV_BYTES} byte cap while read")
    return data


def read_utterances(path: Path) -> list[tuple[str, str, str]]:
    """[(id, reference, hypothesis)] of one `utterances_<variant>.csv`; raises BadTranscripts naming the
    file and row for anything the evaluate step would not have written."""
    name = f"evaluate/{Path(path).name}"
    try:
        text = _read_capped(Path(path)).decode("utf-8")
    except UnicodeDecodeError as e:
        raise BadTranscripts(f"{name} is not UTF-8 (byte {e.start})") from None
    except OSError as e:
        raise BadTranscripts(f"{name} cannot be read ({type(e).__name__})") from None
    rows: list[tuple[str, str, str]] = []
    seen: set[str] = set()
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    try:
        header = next(reader, None)
        if header is None or tuple(header) != COLUMNS:
            shown = md_text(repr(header[:len(COLUMNS) + 1]), 300) if header is not None else "None"
            raise BadTranscripts(f"{name}: header {shown} is not {list(COLUMNS)}")
        for row in reader:
            n = reader.line_num
            if len(rows) >= MAX_ROWS:
                raise BadTranscripts(f"{name} holds more than {MAX_ROWS} utterances")
            if len(row) != len(COLUMNS):
                raise BadTranscripts(f"{name} line {n}: {len(row)} fields, expected {len(COLUMNS)}")
            uid, ref, hyp = row[0], row[1], row[2]
            long = [c for c, v in zip(COLUMNS, row) if len(v) > MAX_FIELD_CHARS]
            if long:
                raise BadTranscripts(f"{name} line {n}: {long[0]} longer than {MAX_FIELD_CHARS} characters")
            if not uid.strip():
                raise BadTranscripts(f"{name} line {n}: empty utterance id")
            if uid in seen:
                raise BadTranscripts(f"{name} line {n}: duplicate utterance id {md_text(repr(uid[:80]))}: it appears "
                                     f"twice (each test utterance must appear once)")
            if not all(_COUNT.fullmatch(v) for v in row[5:]):
                raise BadTranscripts(f"{name} line {n}: error counts must be non-negative integers")
            seen.add(uid)
            rows.append((uid, ref, hyp))
    except csv.Error as e:
        raise BadTranscripts(f"{name} line {reader.line_num}: not valid CSV ({e})") from None
    if not rows:
        raise BadTranscripts(f"{name} holds no utterances")
    return rows


def rescore(rows: list[tuple[str, str, str]], bootstrap_samples: int = 0) -> dict:
    """{"wer", "cer" (percent, rounded to 0.001 as the step records them), "utterances", "counts"
    (per-utterance word errors and reference words, for the gate's paired intervals), "ids"} of the rows,
    plus "wer_ci" (the 95 % bootstrap interval steps/evaluate.py `Scores.bootstrap` draws, same seed)
    when `bootstrap_samples` is given."""
    counts = [utterance_errors(normalize_french(ref), normalize_french(hyp)) for _, ref, hyp in rows]
    we, w, ce, c = (sum(x[i] for x in counts) for i in range(4))
    out = {"wer": round(corpus_rate(we, w), 3), "cer": round(corpus_rate(ce, c), 3), "utterances": len(rows),
           "counts": ([x[0] for x in counts], [x[1] for x in counts]), "ids": [uid for uid, _, _ in rows]}
    if bootstrap_samples and rows:
        import numpy as np

        err, tot = np.array([x[0] for x in counts]), np.array([x[1] for x in counts])
        idx = np.random.default_rng(0).integers(0, len(rows), size=(bootstrap_samples, len(rows)))
        rates = 100.0 * err[idx].sum(axis=1) / np.maximum(tot[idx].sum(axis=1), 1)
        out["wer_ci"] = [round(float(np.percentile(rates, 2.5)), 3), round(float(np.percentile(rates, 97.5)), 3)]
    return out


def _shown(ids: list[str]) -> str:
    return ", ".join(md_text(repr(i[:60])) for i in ids[:5]) + (f" and {len(ids) - 5} more" if len(ids) > 5 else "")


def against_home(rows: list[tuple[str, str, str]], test: HomeTestSet, name: str) -> list[tuple[str, str, str]]:
    """[(id, home's reference, the machine's hypothesis)] in home's order; raises BadTranscripts naming
    ids not in the test set, test ids missing, and references that are not the test split's."""
    hyp = {uid: h for uid, _, h in rows}
    problems = []
    unknown = [uid for uid, _, _ in rows if uid not in test.refs]
    if unknown:
        problems.append(f"{len(unknown)} utterance id(s) not in the test set: {_shown(unknown)}")
    missing = [uid for uid in test.refs if uid not in hyp]
    if missing:
        problems.append(f"{len(missing)} of the {len(test.refs)} test utterances missing: {_shown(missing)}")
    forged = [uid for uid, ref, _ in rows
              if uid in test.refs and normalize_french(ref) != normalize_french(test.refs[uid])]
    if forged:
        problems.append(f"{len(forged)} reference(s) that are not the test split's: {_shown(forged)}")
    if problems:
        raise BadTranscripts(f"{name} does not hold the test set home read from {test.source}: " + "; ".join(problems))
    return [(uid, ref, hyp[uid]) for uid, ref in test.refs.items()]


def recompute(local_work: Path, scheme: str, test: HomeTestSet, bootstrap_samples: int = 0,
              references=("qat_fp32",)) -> dict[str, dict]:
    """{variant: rescore(...)}, each variant's hypotheses scored against home's references: the gate's
    variants (raises BadTranscripts when a file is missing, malformed or not the test set),
    then any other known variant whose transcripts came home and hold the test set (others left out)."""
    out = {v: rescore(against_home(read_utterances(utterances_path(local_work, v)), test,
                                   f"evaluate/utterances_{v}.csv"), bootstrap_samples)
           for v in verified_variants(scheme, references)}
    for v in sorted(KNOWN_VARIANTS - set(out)):
        if utterances_path(local_work, v).is_file():
            try:
                out[v] = rescore(against_home(read_utterances(utterances_path(local_work, v)), test,
                                              f"evaluate/utterances_{v}.csv"), bootstrap_samples)
            except BadTranscripts:
                continue  # not a gate variant: its figures are simply not shown
    return out


def _claim_mismatches(metrics: dict, claimed_gate: dict, rescored: dict[str, dict], ours: dict,
                      scheme: str) -> list[str]:
    """What the machine claimed that its own transcripts do not support."""
    out = []
    wer = metrics.get("wer") if isinstance(metrics.get("wer"), dict) else {}
    for v, r in rescored.items():
        c = measured(wer.get(v))
        if c is None or not math.isfinite(c) or abs(c - r["wer"]) > WER_TOLERANCE:
            out.append(f"{v}: the machine claimed WER {_num(wer.get(v))}, its transcripts give {r['wer']:.3f}")
    for key, v in zip(("qat_wer", "qat_fp32_wer", "ptq_wer"), verified_variants(scheme)):
        c = measured(claimed_gate.get(key))
        if c is None or not math.isfinite(c) or abs(c - rescored[v]["wer"]) > WER_TOLERANCE:
            out.append(f"gate {key}: the machine claimed {_num(claimed_gate.get(key))}, its transcripts give "
                       f"{rescored[v]['wer']:.3f}")
    if claimed_gate.get("passed") is not ours["passed"]:
        out.append(f"the machine claimed the gate {_word(claimed_gate.get('passed'))}; on its own transcripts it "
                   f"{'passes' if ours['passed'] else 'fails'}")
    n = metrics.get("n_utterances")
    rows = {r["utterances"] for r in rescored.values()}
    if n is not None and rows != {measured(n)}:
        out.append(f"the machine claimed {_num(n)} test utterances, its transcripts hold {sorted(rows)}")
    return out


def _num(x: Any) -> str:
    v = measured(x)
    return f"{v:.3f}" if v is not None else "nothing" if x is None else md_text(repr(x), 40)


def _word(passed: Any) -> str:
    return "passed" if passed is True else "failed" if passed is False else f"{_num(passed)} (no verdict)"


def home_gate(cfg: RunConfig, counts: dict) -> dict:
    """contract/quality.py `gate_rule` with the config's eval settings, as steps/evaluate.py `gate`."""
    e = cfg.eval
    return gate_rule(cfg.quant.scheme, counts, max_wer_degradation=e.max_wer_degradation,
                     references=e.gate_references, confidence=e.confidence, samples=e.bootstrap_samples)


def verify_evaluation(cfg: RunConfig, evaluate: Optional[dict], local_work: Path,
                      test: Optional[HomeTestSet] = None, keep_counts: bool = False) -> dict:
    """The gate verdict that decides an upload: `gate_rule` over the per-utterance errors recomputed
    at home (each difference with its paired interval).

    Returns the gate's shape ({"passed", "inconclusive", "scheme", "qat_wer", "qat_fp32_wer",
    "ptq_wer", "differences", "needed_utterances", "max_wer_degradation", "reasons", ...}) plus
    "reason" (the sentence the report and the card print), "verified" (True only when the machine's
    claims matched its transcripts), "recomputed" ({variant: {"wer", "cer", "utterances"}}, plus
    "counts" and "ids" when `keep_counts`) and "claimed" (the machine's verdict, as it said it).
    `test` is the test set home holds (tasks/references.py `home_test_set(cfg)` when not given)."""
    scheme, max_deg = cfg.quant.scheme, cfg.eval.max_wer_degradation
    metrics = (evaluate or {}).get("metrics") if isinstance(evaluate, dict) else None
    metrics = metrics if isinstance(metrics, dict) else {}
    claimed = metrics.get("gate")
    if not isinstance(claimed, dict) or not claimed:
        return {**home_gate(cfg, {}), "passed": False, "reasons": [NO_VERDICT], "reason": NO_VERDICT,
                "verified": False, "recomputed": {}, "claimed": None}
    try:
        rescored = recompute(local_work, scheme, test or home_test_set(cfg), cfg.eval.bootstrap_samples,
                             cfg.eval.gate_references)
    except (BadTranscripts, HomeTestSetUnreadable) as e:
        detail = f"its per-utterance transcripts cannot be checked: {e}"
        return {**home_gate(cfg, {}), "passed": False, "reasons": [detail],
                "reason": f"{CLAIM_MISMATCH} ({detail})", "verified": False, "recomputed": {}, "claimed": claimed}
    ours = home_gate(cfg, {v: r["counts"] for v, r in rescored.items()})
    if not keep_counts:
        rescored = without_counts(rescored)
    mismatches = _claim_mismatches(metrics, claimed, rescored, ours, scheme)
    if mismatches:
        return {**ours, "passed": False, "reasons": mismatches,
                "reason": f"{CLAIM_MISMATCH}: " + "; ".join(mismatches) + f" ({gate_sentence(ours, scheme, max_deg)})",
                "verified": False, "recomputed": rescored, "claimed": claimed}
    return {**ours, "reason": gate_sentence(ours, scheme, max_deg), "verified": True, "recomputed": rescored,
            "claimed": claimed}


def without_counts(recomputed: dict[str, dict]) -> dict[str, dict]:
    """`recomputed` without the per-utterance "counts" and "ids" (what the report and the card keep)."""
    return {v: {k: x for k, x in r.items() if k not in ("counts", "ids")} for v, r in recomputed.items()}


def verified_metrics(metrics: dict, verdict: dict) -> dict:
    """The steps' metrics with evaluate's figures replaced by home's: the gate by the orchestrator's
    verdict, WER/CER/WER interval and the utterance count by what home recomputed (the machine's own
    quality figures are dropped: what the model card and the report may print)."""
    ev = {k: v for k, v in (metrics.get("evaluate") or {}).items() if k not in ("wer", "cer", "wer_ci", "cer_ci",
                                                                               "n_utterances")}
    recomputed = verdict.get("recomputed") or {}
    ev["gate"] = verdict
    for key in ("wer", "cer", "wer_ci"):
        ev[key] = {v: r[key] for v, r in recomputed.items() if key in r}
    if recomputed:
        ev["n_utterances"] = next(iter(recomputed.values()))["utterances"]
    return {**metrics, "evaluate": ev}
