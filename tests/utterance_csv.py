"""Per-utterance transcripts as the evaluate step writes them (its own writer), with a chosen WER:
fixtures for the orchestrator's re-scoring (tasks/verdict.py)."""
from __future__ import annotations

import json
from pathlib import Path

from contract.normalize import normalize_french
from steps.evaluate import score, write_utterances

WORDS_PER_UTTERANCE = 100
UTTERANCES = 10  # 1000 reference words: a WER of 29.8 % is 298 substituted words


def transcripts(wer_pct: float) -> tuple[list[str], list[str], list[str]]:
    """(ids, references, hypotheses) whose corpus WER is exactly `wer_pct` (a multiple of 0.1)."""
    errors = round(wer_pct * UTTERANCES * WORDS_PER_UTTERANCE / 100)
    ids, refs, hyps = [], [], []
    for i in range(UTTERANCES):
        k = min(WORDS_PER_UTTERANCE, max(0, errors - i * WORDS_PER_UTTERANCE))
        ids.append(f"utt-{i:03d}")
        refs.append(" ".join(["Maison"] * WORDS_PER_UTTERANCE) + ".")
        hyps.append(" ".join(["jardin"] * k + ["maison"] * (WORDS_PER_UTTERANCE - k)))
    return ids, refs, hyps


def home_manifest(folder: Path) -> dict:
    """Config overrides naming a manifest whose test split is these transcripts' utterances (the test
    set the orchestrator reads at home, tasks/references.py)."""
    ids, refs, _ = transcripts(0.0)
    path = Path(folder) / "home-manifest.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"id": i, "audio": f"{i}.ogg", "text": r, "split": "test"}) + "\n"
                            for i, r in zip(ids, refs)))
    # backend local: a manifest outside the pushed folders is refused for a rented machine (contract/config.py)
    return {"data.manifest": str(path), "data.max_eval_samples": UTTERANCES, "machine.backend": "local"}


def write_variant(work: Path, variant: str, wer_pct: float) -> Path:
    """work/evaluate/utterances_<variant>.csv holding transcripts with that WER."""
    ids, refs, hyps = transcripts(wer_pct)
    refs_n, hyps_n = [normalize_french(r) for r in refs], [normalize_french(h) for h in hyps]
    out = Path(work) / "evaluate" / f"utterances_{variant}.csv"
    out.parent.mkdir(parents=True, exist_ok=True)
    write_utterances(out, ids, refs, hyps, refs_n, hyps_n, score(refs_n, hyps_n))
    return out


def counts(wer: dict[str, float]) -> dict:
    """{variant: (per-utterance word errors, reference words)} the evaluate step counts on these
    transcripts: what its gate (steps/evaluate.py `gate`) is given."""
    out = {}
    for variant, value in wer.items():
        _, refs, hyps = transcripts(value)
        s = score([normalize_french(r) for r in refs], [normalize_french(h) for h in hyps])
        out[variant] = (s.word_errors, s.words)
    return out


def write_evaluation(work: Path, wer: dict[str, float]) -> None:
    """One CSV per variant of {variant: WER %}."""
    for variant, value in wer.items():
        write_variant(work, variant, value)
