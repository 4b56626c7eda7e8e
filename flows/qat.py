"""The `qat` flow: rent a GPU, train a quantization-aware French Whisper, ship it, give the GPU back.

    validate -> estimate -> rent -> push -> set up -> prepare -> train -> convert -> bench
             -> evaluate -> destroy -> quality gate -> upload -> report

The machine is destroyed in a `finally` as soon as the remote work is over (gate, upload and the
report run from the outputs already copied home); `on_crashed` / `on_cancellation` hooks and the
`reap` flow find it by its label if this process dies.
"""
# No `from __future__ import annotations` here: Prefect validates the flow's parameters from
# its real annotations (a served flow fails on string annotations).
import os
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Literal, Optional

from prefect import flow, get_run_logger, task
from prefect.concurrency.sync import concurrency
from prefect.runtime import flow_run

from infra.cost import CostMeter
from infra.machine import Lease
from steps.common import STEPS, is_done, read_result
from steps.config import REPO_ROOT, RunConfig, load_config
from tasks.gate import quality_gate, upload_model
from tasks.machine import destroy_machine, estimate_cost, push_code, rent_machine, setup_environment
from tasks.report import publish_report
from tasks.retry import is_transient
from tasks.steps import MachineLost, run_step
from tasks.teardown import destroy_by_label, machine_alive

GPU_LIMIT = "vast-gpus"
MAX_MACHINES = 3  # a run that loses its machine (preemption) rents a new one this many times at most


def runs_dir() -> Path:
    return Path(os.environ.get("QAT_RUNS_DIR", REPO_ROOT / "runs"))


@task(name="validate config")
def validate_config(config: str, overrides: dict[str, Any]) -> RunConfig:
    """Refuse bad input before a single cent is spent."""
    cfg = load_config(config, overrides)
    get_run_logger().info("config %s valid: %s on %s, %s, backend %s", cfg.name, cfg.model.name_or_path,
                          cfg.data.dataset or cfg.data.manifest, cfg.quant.scheme, cfg.machine.backend)
    return cfg


def run_label() -> str:
    return f"qat-{flow_run.get_id() or 'local-' + str(int(time.time()))}"


def _on_machine(cfg: RunConfig, lease: Lease, local_work: Path, results: dict, meter: CostMeter) -> None:
    """Push, set up, then each step in order; every step's outputs come home as it finishes."""
    with meter.step("push code"):
        push_code(lease, cfg, local_work)
    with meter.step("set up environment"):
        setup_environment(lease, cfg)
    for step in STEPS:
        with meter.step(step):
            results[step] = run_step(lease, cfg, step, local_work)


def _cost_rows(lease: Lease, meter: CostMeter, machine_no: int) -> list[dict]:
    """Seconds and dollars per step, plus the rest of the billed life, for one machine."""
    prefix = f"machine {machine_no}: " if machine_no > 1 else ""
    return [{"step": prefix + r["step"], "seconds": r["seconds"], "usd": r["usd"], "usd_per_hour": lease.dph_total,
             "instance": lease.instance_id} for r in meter.as_rows()]


@flow(name="qat", log_prints=True,
      on_crashed=[destroy_by_label], on_cancellation=[destroy_by_label])
def qat(config: str = "int8",
        quantization: Optional[Literal["int8", "int4"]] = None,
        max_samples: Optional[int] = None,
        backend: Optional[Literal["vast", "local", "ssh"]] = None,
        overrides: Optional[dict[str, Any]] = None) -> dict:
    """Quantization-aware training of a French Whisper, exported to ONNX int8/int4.

    Args:
        config: a name in configs/ (int8, int4, demo, tiny) or a path to a YAML file.
        quantization: override quant.scheme.
        max_samples: override data.max_samples.
        backend: override machine.backend (vast, local, ssh).
        overrides: any other dotted overrides, e.g. {"train.learning_rate": 1e-5}.
    """
    log = get_run_logger()
    merged = dict(overrides or {})
    for key, value in (("quant.scheme", quantization), ("data.max_samples", max_samples), ("machine.backend", backend)):
        if value is not None:
            merged[key] = value
    cfg = validate_config(config, merged)
    run_dir = runs_dir() / cfg.name
    local_work = run_dir / "work"
    local_work.mkdir(parents=True, exist_ok=True)
    (run_dir / "run.yaml").write_text(cfg.to_yaml())

    results: dict[str, dict] = {}
    costs: list[dict] = []
    lease: Optional[Lease] = None
    estimate: dict = {}
    if not all(is_done(cfg, local_work, s) for s in STEPS):
        estimate = estimate_cost(cfg)
        slot = concurrency(GPU_LIMIT, occupy=1) if cfg.machine.backend == "vast" else nullcontext()
        with slot:
            for machine_no in range(1, MAX_MACHINES + 1):
                lease = rent_machine(cfg, run_label(), run_dir)
                meter = CostMeter.from_lease(lease, cfg.machine.max_cost_usd)
                try:
                    _on_machine(cfg, lease, local_work, results, meter)
                    break
                except Exception as exc:
                    lost = isinstance(exc, MachineLost) or (is_transient(exc) and not machine_alive(lease))
                    if not lost or machine_no == MAX_MACHINES:
                        raise
                    log.warning("machine %s was lost (%s): renting another, resuming from what was copied home",
                                lease.label, type(exc).__name__)
                finally:
                    with meter.step("destroy machine"):
                        meter.destroyed(destroy_machine(lease)["destroyed_at"])
                    costs += _cost_rows(lease, meter, machine_no)
    else:
        log.info("every step is already done for this config: nothing to rent")
        results = {s: read_result(local_work, s) for s in STEPS}

    gate = quality_gate(cfg, results.get("evaluate"))
    link = upload_model(cfg, results, gate, local_work)
    publish_report(cfg, lease, results, costs, estimate, gate, link, run_dir)
    total = sum(r["usd"] for r in costs if r["step"].endswith("total"))
    log.info("done: gate %s, total cost $%.4f, model %s", "passed" if gate.get("passed") else "FAILED", total,
             link.get("url") or link.get("path"))
    return {"config": cfg.name, "gate": gate, "link": link, "cost_usd": total,
            "metrics": {s: (results.get(s) or {}).get("metrics", {}) for s in STEPS}}
