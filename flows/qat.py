"""The `qat` flow: rent a GPU, train a quantization-aware French Whisper, ship it, give the GPU back.

    validate -> pin revisions -> estimate -> rent -> push -> set up -> prepare -> train -> convert -> bench
             -> evaluate -> destroy -> quality gate -> approval -> upload -> report

The machine is destroyed in a `finally` as soon as the remote work is over (gate, approval, upload
and the report run from the outputs already copied home); `on_crashed` / `on_cancellation` hooks and
the `reap` flow find it by its label if this process dies. With `hub.approval: required` the run is
suspended until a person answers, then re-runs from the top and finds every step done at home.
"""
# No `from __future__ import annotations` here: Prefect validates the flow's parameters from
# its real annotations (a served flow fails on string annotations).
from typing import Any, Optional

from prefect import flow, get_run_logger
from prefect.runtime import flow_run

from tasks.approval import await_approval
from tasks.billing import total_usd
from tasks.gate import quality_gate
from tasks.labels import run_label
from tasks.machine_run import run_on_machines
from tasks.rental import estimate_cost
from tasks.report import publish_report
from tasks.revisions import pin_revisions
from tasks.run_dir import STEPS, Backend, Scheme, all_steps_done, open_run_dir, results_at_home, validate_config
from tasks.teardown import destroy_by_label
from tasks.upload import upload_held, upload_to_hub


@flow(name="qat", log_prints=True,
      on_crashed=[destroy_by_label], on_cancellation=[destroy_by_label])
def qat(config: str = "int8",
        quantization: Optional[Scheme] = None,
        max_samples: Optional[int] = None,
        backend: Optional[Backend] = None,
        overrides: Optional[dict[str, Any]] = None) -> dict:
    """Quantization-aware training of a French Whisper, exported to ONNX int8/int4.

    Args:
        config: a name in configs/ (int8, int4, demo, tiny) or a path to a YAML file.
        quantization: override quant.scheme.
        max_samples: override data.max_samples.
        backend: override machine.backend.
        overrides: any other dotted overrides, e.g. {"train.learning_rate": 1e-5}.
    """
    log = get_run_logger()
    merged = dict(overrides or {})
    for key, value in (("quant.scheme", quantization), ("data.max_samples", max_samples), ("machine.backend", backend)):
        if value is not None:
            merged[key] = value
    cfg = pin_revisions(validate_config(config, merged))  # the Hub commits it starts from, before any cost
    run_dir, local_work = open_run_dir(cfg)

    estimate: dict = {}
    costs: list[dict] = []
    lease = None
    if not all_steps_done(cfg, local_work):
        estimate = estimate_cost(cfg)
        results, costs, lease = run_on_machines(cfg, run_label(flow_run.get_id()), run_dir, local_work)
    else:
        log.info("every step is already done for this config: nothing to rent")
        results = results_at_home(local_work)

    gate = quality_gate(cfg, results.get("evaluate"), local_work)
    link: dict = {"uploaded": False, "reason": "the upload failed: see the flow's error"}
    try:  # why nothing would be published (gate, champion, nothing new): nobody is asked then
        held = upload_held(cfg, results, gate, local_work)
    except Exception:  # the Hub could not be asked: the report still lands
        publish_report(cfg, lease, results, costs, estimate, gate, link, run_dir)
        raise
    # May suspend this run until a person answers; on the re-run the bill comes back from the run dir.
    approval, lease, costs, estimate = await_approval(cfg, gate, held, run_dir, lease, results, costs, estimate)
    try:
        link = upload_to_hub(cfg, results, gate, local_work) if approval["upload"] else approval["link"]
    finally:  # a refused or failed upload still gets its report
        publish_report(cfg, lease, results, costs, estimate, gate, link, run_dir, approval)
    total = total_usd(costs)
    log.info("done: gate %s, total cost $%.4f, model %s", "passed" if gate.get("passed") else "FAILED", total,
             link.get("url") or link.get("path"))
    return {"config": cfg.name, "gate": gate, "approval": approval["line"], "link": link, "cost_usd": total,
            "metrics": {s: (results.get(s) or {}).get("metrics", {}) for s in STEPS}}
