"""What the Prefect dashboard shows: the run report, tables, the chart and the model link.

Keys are stable (per config name) so versions accumulate across runs. Every figure comes from the
steps' result.json files and the measured timings of this run, with WER, CER, their interval and
the gate replaced by what home recomputed (tasks/verdict.py `verified_metrics`); the results table
and the gate verdict are tasks/scorecard.py's, the same as in the model card, and no string the
machine sent is rendered as markdown."""
from __future__ import annotations

import base64
import io
from pathlib import Path
from typing import Optional

from prefect import task
from prefect.artifacts import (create_image_artifact, create_link_artifact, create_markdown_artifact,
                               create_table_artifact)

from contract.config import RunConfig
from contract.fingerprint import inputs_in_words
from infra.machines.machine import Lease

from .billing import estimate_rows, total_seconds, total_usd
from .scorecard import gate_verdict, md_text, results_markdown, results_table, serving_markdown, step_metrics
from .verdict import verified_metrics


def chart_png(rows: list[dict]) -> Optional[bytes]:
    """WER vs size, marker area by latency. None when nothing was measured."""
    pts = [r for r in rows if r["wer_pct"] is not None and r["size_mb"]]
    if not pts:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    for r in pts:
        area = 40 + 200 * (r["latency_s"] or 0)
        ax.scatter(r["size_mb"], r["wer_pct"], s=area, alpha=0.6)
        label = r["variant"] + (f"\n{r['latency_s']:.2f}s/clip" if r["latency_s"] else "")
        ax.annotate(label, (r["size_mb"], r["wer_pct"]), fontsize=7, xytext=(4, 4), textcoords="offset points")
    ax.set_xlabel("size on disk (MB)")
    ax.set_ylabel("WER (%)")
    ax.set_title("WER vs size (marker area: latency per clip)")
    ax.grid(alpha=0.3)
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def render_report(cfg: RunConfig, lease: Optional[Lease], results: dict, costs: list[dict],
                  estimate: dict, gate: dict, link: dict, approval: Optional[dict] = None) -> str:
    metrics = verified_metrics(step_metrics(results), gate or {})
    rows = results_table(cfg.quant.scheme, metrics)
    totals = [r for r in costs if r.get("total")]
    several = len(totals) > 1  # several machines, or failed start attempts: each one's total is a line
    lines = [f"# QAT run `{cfg.name}`", "",
             "## Configuration", "",
             f"- model: `{cfg.model.name_or_path}` ({cfg.model.language}, {cfg.model.task})",
             f"- data: {cfg.data.source} `{cfg.data.dataset or cfg.data.manifest}`, max_samples {cfg.data.max_samples}",
             *(f"- {what} input: {md_text(text, 300)}" for what, text in inputs_in_words(cfg).items()),
             f"- quantization: **{cfg.quant.scheme}**" + (f" (group {cfg.quant.group_size}, vocabulary {cfg.quant.vocab_bits}-bit)" if cfg.quant.scheme == "int4" else ""),
             f"- training: {cfg.train.length}, lr {cfg.train.learning_rate}, "
             f"batch {cfg.train.per_device_batch_size} x accumulation {cfg.train.grad_accum}, freeze_encoder {cfg.train.freeze_encoder}",
             ""]
    if lease:
        lines += ["## Machine", "",
                  f"- backend: {lease.backend}, label `{lease.label}`" + (f", instance {lease.instance_id}" if lease.instance_id else ""),
                  f"- GPU: {lease.gpu_name or 'none'} x{lease.num_gpus}, ${lease.dph_total:.3f}/h, {lease.location or 'n/a'}",
                  f"- estimate before renting: ${estimate.get('estimated_usd', 0):.2f} "
                  f"({estimate.get('planned_hours', cfg.machine.planned_hours)} h at ${estimate.get('dph', 0):.3f}/h); cap ${cfg.machine.max_cost_usd:.2f}",
                  ""]
    lines += ["## Timings and cost", "", "| step | seconds | $ |", "|---|---:|---:|"]
    lines += [f"| {r['step']} | {r['seconds']:.1f} | {r['usd']:.4f} |" for r in costs if several or r not in totals]
    what = "every machine and failed start attempt" if several else "machine life"
    lines += [f"| **total ({what}, creation to confirmed destroy, bandwidth included)** | **{total_seconds(costs):.1f}** | "
              f"**{total_usd(costs):.4f}** |", ""]
    lines += ["## Results (test set)", "", *results_markdown(rows, name="variant"), ""]
    lines += ["## Serving, per device", "", *serving_markdown(cfg.quant.scheme, metrics)]
    lines += ["## Quality gate", "", gate_verdict(gate, cfg.quant.scheme, cfg.eval.max_wer_degradation), ""]
    lines += ["## Links", "", f"- model: {link.get('url') or link.get('path')}", ""]
    if not link.get("uploaded"):
        lines.append(f"- not uploaded: {md_text(link.get('reason', ''), 2000)}")
    elif isinstance(link.get("champion"), dict):
        lines.append(f"- published: {md_text(link['champion'].get('reason', ''), 2000)}")
    if approval:  # tasks/approval.py: who approved or rejected the upload, when, their note
        lines.append(f"- approval: {md_text(approval['line'], 2400)}")
    return "\n".join(lines)


def _cost_table(cfg: RunConfig, costs: list[dict]) -> None:
    create_table_artifact(costs, key=f"qat-{cfg.name}-cost",
                          description="seconds and dollars per step of every machine (dph_total x time), the "
                                      "instances of failed start attempts and the bandwidth copied home")


@task(name="publish cost table")
def publish_cost_table(cfg: RunConfig, costs: list[dict]) -> None:
    """The cost table alone, for a run that failed before its report (a budget stop, a lost run)."""
    if costs:
        _cost_table(cfg, costs)


@task(name="publish report")
def publish_report(cfg: RunConfig, lease: Optional[Lease], results: dict, costs: list[dict], estimate: dict,
                   gate: dict, link: dict, run_dir: Path, approval: Optional[dict] = None) -> dict:
    key = f"qat-{cfg.name}"
    md = render_report(cfg, lease, results, costs, estimate, gate, link, approval)
    report_dir = run_dir / "report"
    report_dir.mkdir(parents=True, exist_ok=True)
    (report_dir / "report.md").write_text(md)
    create_markdown_artifact(md, key=f"{key}-report", description=f"QAT run report ({cfg.name})")
    rows = results_table(cfg.quant.scheme, verified_metrics(step_metrics(results), gate or {}))
    measured_rows = [r for r in rows if any(r[k] is not None for k in ("wer_pct", "cer_pct", "size_mb", "latency_s"))]
    if measured_rows:
        create_table_artifact(measured_rows, key=f"{key}-metrics", description="metrics per variant (test set)")
    if costs:
        _cost_table(cfg, costs + estimate_rows(estimate, costs, step_metrics(results)["train"]))
    png = chart_png(rows)
    if png:
        (report_dir / "chart.png").write_bytes(png)
        create_image_artifact(image_url="data:image/png;base64," + base64.b64encode(png).decode(),
                              key=f"{key}-chart", description="WER vs size vs latency")
    target = link.get("url") or Path(link.get("path", run_dir)).resolve().as_uri()
    create_link_artifact(target, link_text="model" if link.get("uploaded") else "local model directory",
                         key=f"{key}-model", description="the quantized model")
    return {"report": str(report_dir / "report.md"), "chart": bool(png)}
