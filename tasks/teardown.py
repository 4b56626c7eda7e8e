"""The layer of teardown beyond the flow's `finally`: the on_crashed / on_cancellation hook finds the
machine by its label (tasks/labels.py: the installation id and the flow run id, never in-memory state)."""
from __future__ import annotations

import logging

from infra.backends import registry

from . import labels, secrets

log = logging.getLogger("qat.teardown")


def destroy_label(label: str, prefix: str | None = None, match=None) -> list[int]:
    """Destroy (and confirm) every instance carrying this label (or, with `prefix` and `match`, every
    instance under prefix whose label satisfies match), on every backend, each asked with its own
    credentials (one without any has rented nothing to find). Idempotent. Every backend is tried;
    the first failure is raised after."""
    match = match or (lambda lbl: lbl == label)
    destroyed, failures = [], []
    for backend in registry.BACKENDS.values():
        try:
            creds = secrets.credentials(backend.name)
            for inst in backend.find_instances(prefix or label, creds, log=log.info):
                if match(inst.label):
                    backend.release(inst, creds)
                    destroyed.append(inst.instance_id)
        except Exception as e:
            failures.append(e)
    if failures:
        raise failures[0]
    return destroyed


def destroy_by_label(flow, flow_run, state) -> None:
    """on_crashed / on_cancellation hook: the process may be dying, so only the label is trusted.
    Should the installation id be unreadable (server unreachable), any `qat-<id>-<this run id>`
    label is this run's: a flow run id is a UUID4, unique."""
    try:
        label = labels.run_label(flow_run.id)
        kw = {}
    except Exception as e:
        log.warning("teardown hook: installation id unreadable (%s); matching labels by run id", type(e).__name__)
        label = f"{labels.PREFIX}*-{flow_run.id}"
        kw = {"prefix": labels.PREFIX, "match": lambda lbl: labels.is_label_of_run(lbl, flow_run.id)}
    try:
        gone = destroy_label(label, **kw)
        log.warning("teardown hook (%s): destroyed %s", state.name, gone or "nothing (already gone)")
    except Exception as e:  # the reaper is the next layer
        log.error("teardown hook (%s) could not destroy %s: %s; the reap flow will", state.name, label,
                  secrets.redact(str(e)))
