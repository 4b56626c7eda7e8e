"""Champion vs challenger: a new model replaces the published one only when it is not worse on the
same test utterances.

Each upload puts, beside the model, `eval/utterances.json` (`EVAL_FILE`): the config and scheme it
was trained for and, per test utterance id, the word errors and reference words of the published
quantized model, as home re-scored them (tasks/verdict.py). The next upload of the config reads it
back (`read_champion`) and compares the challenger with it by utterance id (`compare`):
contract/quality.py `paired_difference(challenger - champion)`; the challenger is published when the
upper bound of that interval is within `eval.max_wer_degradation` (the margin the gate already
accepts as "no worse"), else the run keeps the published model and says why.

When the published model cannot be re-scored at home (no such file: a model uploaded before these
files existed or by hand; a file of another config or scheme; other test utterance ids or other
reference lengths, e.g. after a change of the test set), there is no champion to compare with: the
new model is published and the report and the commit say why no comparison was made.

Each upload is its own Hub commit (`commit_message`): the run id, the revisions the run used (when
the results or the config hold them), the gate's figures and the comparison. The card shows the
repository's history from the Hub's commit list (`history`).
"""
from __future__ import annotations

import json
import tempfile
from typing import Any, Optional, Sequence

from huggingface_hub import HfApi
from huggingface_hub.errors import EntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError

from contract.bounded_json import UnsafeJSON, load_file
from contract.catalogue import quantized_variant
from contract.config import RunConfig
from contract.quality import paired_difference

from .scorecard import difference_text, gate_sentence, md_text, measured

EVAL_FILE = "eval/utterances.json"
MAX_EVAL_BYTES = 32 * 2**20
HISTORY_LINES = 20


def utterance_record(cfg: RunConfig, ids: Sequence[str], errors: Sequence[int], words: Sequence[int],
                     run_id: Optional[str]) -> bytes:
    """The bytes of `EVAL_FILE` for the model this run publishes."""
    return json.dumps({"config": cfg.name, "scheme": cfg.quant.scheme, "variant": quantized_variant(cfg.quant.scheme),
                       "run_id": run_id, "utterances": [[str(i), int(e), int(w)] for i, e, w in zip(ids, errors, words)]},
                      indent=0).encode()


def read_champion(api: HfApi, repo_id: str, cfg: RunConfig) -> dict:
    """{"champion": {id: (errors, words)} or None, "why": why there is none (None when there is one or
    the repository does not exist yet), "run_id"}. Hub errors other than "not there" propagate."""
    try:
        files = set(api.list_repo_files(repo_id, repo_type="model"))
    except (RepositoryNotFoundError, RevisionNotFoundError):
        return {"champion": None, "why": None, "run_id": None}
    if EVAL_FILE not in files:
        model = sorted(f for f in files if f.endswith(".onnx"))
        why = (f"the published model has no {EVAL_FILE} to compare with (uploaded before these files or by hand)"
               if model else None)
        return {"champion": None, "why": why, "run_id": None}
    with tempfile.TemporaryDirectory() as tmp:  # not kept in the user's Hub cache
        try:  # a network error propagates: no comparison is no reason to publish
            path = api.hf_hub_download(repo_id, EVAL_FILE, repo_type="model", cache_dir=tmp)
        except EntryNotFoundError:
            return {"champion": None, "why": f"{EVAL_FILE} vanished while read", "run_id": None}
        try:
            data = load_file(path, MAX_EVAL_BYTES)
        except (UnsafeJSON, OSError) as e:
            return {"champion": None, "why": f"the published {EVAL_FILE} is not readable ({md_text(e, 120)})",
                    "run_id": None}
    try:
        rows = data["utterances"]
        champion = {str(i): (int(e), int(w)) for i, e, w in rows}
        if len(champion) != len(rows) or any(e < 0 or w < 0 for e, w in champion.values()):
            raise ValueError("duplicate ids or negative counts")
    except (ValueError, TypeError, KeyError) as e:
        return {"champion": None, "why": f"the published {EVAL_FILE} is not readable ({md_text(e, 120)})",
                "run_id": None}
    if data.get("config") != cfg.name or data.get("scheme") != cfg.quant.scheme:
        return {"champion": None, "run_id": None,
                "why": (f"the published model is of config {md_text(data.get('config'), 60)} "
                        f"({md_text(data.get('scheme'), 20)}), not {cfg.name} ({cfg.quant.scheme})")}
    return {"champion": champion, "why": None, "run_id": data.get("run_id")}


def compare(cfg: RunConfig, found: dict, ids: Sequence[str], errors: Sequence[int], words: Sequence[int]) -> dict:
    """{"publish": bool, "compared": bool, "difference" (challenger - champion, or None), "reason"}."""
    champion, max_deg = found.get("champion"), cfg.eval.max_wer_degradation
    if champion is None:
        why = found.get("why")
        return {"publish": True, "compared": False, "difference": None,
                "reason": f"not compared with the published model: {why}" if why else "no model published yet"}
    if set(champion) != set(ids) or any(champion[i][1] != w for i, w in zip(ids, words)):
        return {"publish": True, "compared": False, "difference": None,
                "reason": (f"not compared with the published model: it was scored on other test utterances "
                           f"({len(champion)} published, {len(ids)} now, {len(set(champion) & set(ids))} shared "
                           f"with the same reference length): re-scoring it needs its transcripts")}
    d = paired_difference((errors, words), ([champion[i][0] for i in ids], words), cfg.eval.bootstrap_samples,
                          cfg.eval.confidence)
    shown = (f"this model minus the published one (run {md_text(found.get('run_id') or 'unknown', 60)}): "
             f"{difference_text(d, cfg.eval.confidence)} on {d['utterances']} test utterances")
    if d["high"] > max_deg:
        return {"publish": False, "compared": True, "difference": d,
                "reason": f"kept the published model: {shown}, upper bound over the allowed +{max_deg:g}"}
    return {"publish": True, "compared": True, "difference": d,
            "reason": f"not worse than the published model: {shown}, within the allowed +{max_deg:g}"}


def history(api: HfApi, repo_id: str) -> list[str]:
    """The repository's previous commits, newest first, as the card lists them ("date: title")."""
    try:
        commits = api.list_repo_commits(repo_id, repo_type="model")
    except (RepositoryNotFoundError, RevisionNotFoundError):
        return []
    return [f"{c.created_at:%Y-%m-%d %H:%M} UTC: {md_text(c.title, 200)}" for c in commits[:HISTORY_LINES]]


def revisions_of(cfg: RunConfig, results: dict) -> dict[str, str]:
    """{"model": ..., "data": ...}: the resolved revisions the results carry, else the config's pins."""
    found = (results or {}).get("revisions")
    out = {k: str(v) for k, v in found.items() if isinstance(v, str)} if isinstance(found, dict) else {}
    for key, section in (("model", cfg.model), ("data", cfg.data)):
        pinned = getattr(section, "revision", None)
        if key not in out and isinstance(pinned, str):
            out[key] = pinned
    return out


def commit_message(cfg: RunConfig, gate: dict, decision: dict, run_id: Optional[str],
                   revisions: dict[str, str]) -> tuple[str, str]:
    """(title, description) of the upload's Hub commit."""
    scheme = cfg.quant.scheme
    q, n = measured(gate.get("qat_wer")), gate.get("differences", {}).get("qat_fp32", {}).get("utterances")
    title = (f"{cfg.name}: {quantized_variant(scheme)} WER "
             + (f"{q:.2f}%" if q is not None else "not measured")
             + (f" on {n} test utterances" if n else "") + f" (run {run_id or 'outside a flow run'})")
    lines = [f"run: {run_id or 'outside a flow run'}",
             "revisions: " + (", ".join(f"{k} {v}" for k, v in sorted(revisions.items())) or "not resolved"),
             f"gate: {gate_sentence(gate, scheme, cfg.eval.max_wer_degradation)}",
             f"champion: {decision['reason']}"]
    return title, "\n".join(lines)


def card_lines(decision: Optional[dict], past: list[str]) -> list[str]:
    """The card's "History" section: the comparison with the model this one replaces, then the
    repository's previous commits."""
    if decision is None and not past:
        return []
    lines = ["## History", ""]
    if decision is not None:
        lines += [f"This upload: {decision['reason']}.", ""]
    if past:
        lines += ["Previous commits of this repository, newest first:", "", *(f"- {p}" for p in past), ""]
    return lines


def describe(decision: dict) -> dict[str, Any]:
    """What the upload's result (and the report) keep of the decision."""
    return {"published": decision["publish"], "compared": decision["compared"], "reason": decision["reason"],
            "difference": decision["difference"]}
