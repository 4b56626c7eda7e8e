"""The emulator's fault knobs, each named once: its scope, its default and the values it accepts.

What each knob does is in README.md (Fault knobs) and in the code that reads it (cloud.py, server.py).
Scopes: INSTANCE knobs are set globally, per id or per label prefix and read per instance
(`Cloud.faults_for`); the others are global: COUNTER (the next N calls; 0 once spent or cleared),
SETTING (kept until changed or cleared) and MALFORMED (armed together by `malformed`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

from devtools.emulator import evil, image

INSTANCE, COUNTER, SETTING, MALFORMED = "instance", "counter", "setting", "malformed"

# A knob's check: (name, value that is not None) -> what the 400 says, or None when the value is accepted.
Check = Callable[[str, Any], Optional[str]]


def number(message: Optional[str] = None) -> Check:
    return lambda name, value: None if isinstance(value, (int, float)) else message or f"{name} must be a number"


def one_of(*values: Any, message: Optional[str] = None) -> Check:
    return lambda name, value: None if value in values else message or f"{name} must be one of {values}"


def _evil_modes(name: str, value: Any) -> Optional[str]:
    try:
        evil.modes(value)
    except ValueError as e:
        return str(e)
    return None


def _field_names(name: str, value: Any) -> Optional[str]:
    ok = isinstance(value, list) and all(isinstance(k, str) for k in value)
    return None if ok else f"{name} must be a list of row field names"


def _absolute_path(name: str, value: Any) -> Optional[str]:
    return None if isinstance(value, str) and value.startswith("/") else f"{name} must be an absolute path"


@dataclass(frozen=True)
class Knob:
    scope: str
    check: Optional[Check] = None  # None: any value
    # INSTANCE: its value when no rule sets it (None: absent from faults_for); SETTING: its value when
    # unset or cleared (what Vast.ai does, docs/REFERENCE.md section 1b); MALFORMED: its value when
    # `malformed` is armed without it.
    default: Any = None


KNOBS: dict[str, Knob] = {
    "stuck_loading": Knob(INSTANCE),
    "ssh_refuse_s": Knob(INSTANCE, number()),
    "preempt_after_s": Knob(INSTANCE, number()),
    "preempt_mode": Knob(INSTANCE, one_of("exited", "offline", "vanish", "stopped")),
    "host_reclaims": Knob(INSTANCE),
    "destroy_fail_once": Knob(INSTANCE, one_of(True, False, "error", "silent",
                                               message='destroy_fail_once must be true, "error" or "silent"')),
    "disk_full_mb": Knob(INSTANCE, number()),
    "boot_seconds": Knob(INSTANCE, number()),
    "null_after_create_s": Knob(INSTANCE, number()),
    "destroy_lag_s": Knob(INSTANCE, number()),
    # rows of instances being created are half-filled for a while, as Vast's are (docs/REFERENCE.md
    # section 1b); by default a few of the product's poll intervals in tests
    "half_filled_s": Knob(INSTANCE, number(), default=1.0),
    "garbled_fields": Knob(INSTANCE, _field_names),
    "evil": Knob(INSTANCE, _evil_modes),
    "evil_target": Knob(INSTANCE, _absolute_path),
    "nvidia_smi": Knob(INSTANCE, one_of(*image.NVIDIA_SMI_MODES)),
    "driver_cuda": Knob(INSTANCE, number("driver_cuda must be a CUDA version number such as 12.4")),
    "image_torchvision": Knob(INSTANCE, one_of(*image.TORCHVISION_MODES)),
    "http_429": Knob(COUNTER, number()),
    "quota_429": Knob(COUNTER, number()),
    "lost_create": Knob(COUNTER, number()),
    "http_429_retry_after": Knob(SETTING, number(), default=1),
    "lost_create_mode": Knob(SETTING, one_of("504", "500", "drop"), default="504"),
    "list_lag_s": Knob(SETTING, number(), default=0),
    "foreign_rows": Knob(SETTING, number(), default=0),
    "gone_404_after_s": Knob(SETTING, number(), default=60),
    "malformed": Knob(MALFORMED, one_of("html", "missing_fields", "wrong_types", "truncated", "empty")),
    "malformed_count": Knob(MALFORMED, default=1),
    "malformed_status": Knob(MALFORMED, default=200),
    "malformed_fields": Knob(MALFORMED),
}


def _named(scope: str) -> set[str]:
    return {name for name, knob in KNOBS.items() if knob.scope == scope}


INSTANCE_KNOBS = _named(INSTANCE)
INSTANCE_DEFAULTS = {name: KNOBS[name].default for name in INSTANCE_KNOBS if KNOBS[name].default is not None}
GLOBAL_COUNTERS = _named(COUNTER)
GLOBAL_SETTINGS = _named(SETTING)
GLOBAL_DEFAULTS = {name: KNOBS[name].default for name in GLOBAL_SETTINGS}
GLOBAL_KNOBS = set(KNOBS) - INSTANCE_KNOBS


def split(body: dict, targeted: bool) -> tuple[dict, dict]:
    """A faults body (without clear, id, label_prefix) as (instance knobs, global knobs), every value
    checked; `targeted`: the body names an id or a label prefix. ValueError with what the 400 says."""
    unknown = set(body) - set(KNOBS)
    if unknown:
        raise ValueError(f"unknown fault knob(s) {sorted(unknown)}; known: {sorted(KNOBS)}")
    global_part = {k: v for k, v in body.items() if k in GLOBAL_KNOBS}
    if global_part and targeted:
        raise ValueError(f"{sorted(global_part)} are global: drop id/label_prefix")
    for name, knob in KNOBS.items():
        if knob.check is not None and body.get(name) is not None:
            problem = knob.check(name, body[name])
            if problem:
                raise ValueError(problem)
    return {k: v for k, v in body.items() if k in INSTANCE_KNOBS}, global_part


def malformed_armed(global_part: dict) -> dict:
    """What arming `malformed` stores: its group's knobs, a knob the body leaves out at its default."""
    armed = {name: global_part.get(name, knob.default) for name, knob in KNOBS.items() if knob.scope == MALFORMED}
    return armed | {name: int(armed[name]) for name in ("malformed_count", "malformed_status")}
