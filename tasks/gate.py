"""Quality gate and upload, from the local copy of the results (no machine needed)."""
from __future__ import annotations

from pathlib import Path

from prefect import get_run_logger, task

from steps.config import RunConfig

from . import secrets
from .retry import retry_transient


@task(name="quality gate")
def quality_gate(cfg: RunConfig, evaluate: dict) -> dict:
    """The verdict the evaluate step measured, with a sentence a person can read."""
    gate = dict((evaluate or {}).get("metrics", {}).get("gate") or {})
    if not gate:
        return {"passed": False, "reason": "the evaluate step recorded no gate verdict"}
    q, f, p = gate.get("qat_wer"), gate.get("qat_fp32_wer"), gate.get("ptq_wer")
    parts = [f"QAT {cfg.quant.scheme} WER {q:.2f}% vs QAT fp32 {f:.2f}% (allowed +{cfg.eval.max_wer_degradation} points)"
             if q is not None and f is not None else "QAT WER not measured"]
    if p is not None and q is not None:
        parts.append(f"vs PTQ {cfg.quant.scheme} {p:.2f}%")
    gate["reason"] = "; ".join(parts)
    log = get_run_logger()
    (log.info if gate.get("passed") else log.warning)("quality gate %s: %s",
                                                      "passed" if gate.get("passed") else "FAILED", gate["reason"])
    return gate


@task(name="upload to hub", retries=2, retry_delay_seconds=[10, 60], retry_jitter_factor=0.5,
      retry_condition_fn=retry_transient)
def upload_model(cfg: RunConfig, results: dict, gate: dict, local_work: Path) -> dict:
    from .model_card import render_model_card
    from .upload_hub import upload_model as upload

    log = get_run_logger()
    model_dir = local_work / "convert" / f"qat_{cfg.quant.scheme}"
    if not gate.get("passed"):
        log.warning("quality gate failed: not uploading; the model stays in %s", model_dir)
        return {"uploaded": False, "reason": "quality gate failed", "path": str(model_dir)}
    if not cfg.hub.repo_id:
        return {"uploaded": False, "reason": "hub.repo_id is not set in the config", "path": str(model_dir)}
    metrics = {k: (results.get(k) or {}).get("metrics", {}) for k in ("evaluate", "bench", "train", "convert")}
    card = render_model_card(cfg, metrics)
    out = upload(model_dir, cfg.hub.repo_id, secrets.hf_token(), private=cfg.hub.private, card=card)
    log.info("upload: %s", out.get("url") or out.get("reason"))
    out.setdefault("path", str(model_dir))
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in out.items()}
