"""The layer of teardown beyond the flow's `finally`: the on_crashed / on_cancellation hook finds the
machine by its label (the flow run id, never in-memory state)."""
from __future__ import annotations

import logging

from infra import provision

from . import secrets

log = logging.getLogger("qat.teardown")


def destroy_label(label: str) -> list[int]:
    """Destroy (and confirm) every instance carrying this label. Idempotent."""
    key, url = secrets.vast_api_key(), secrets.vast_url()
    if not key:
        return []
    destroyed = []
    for inst in provision.find_instances(label, api_key=key, server_url=url):
        if inst.label == label:
            provision.release(inst, api_key=key, server_url=url)
            destroyed.append(inst.instance_id)
    return destroyed


def destroy_by_label(flow, flow_run, state) -> None:
    """on_crashed / on_cancellation hook: the process may be dying, so only the label is trusted."""
    label = f"qat-{flow_run.id}"
    try:
        gone = destroy_label(label)
        log.warning("teardown hook (%s): destroyed %s", state.name, gone or "nothing (already gone)")
    except Exception as e:  # the reaper is the next layer
        log.error("teardown hook (%s) could not destroy %s: %s; the reap flow will", state.name, label,
                  secrets.redact(str(e)))
