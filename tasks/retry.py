"""Which failures are worth a retry: transient ones (SSH drop, 429, network), never deterministic
ones (bad config, OOM, a step that reports it would fail again)."""
from __future__ import annotations

from typing import Any


class StepFailed(RuntimeError):
    """An on-machine step failed; `retryable` comes from the step's own STEP_ERROR report."""

    def __init__(self, step: str, message: str, retryable: bool, tail: str = ""):
        self.step, self.retryable, self.tail = step, retryable, tail
        kind = "transient" if retryable else "deterministic, not retried"
        super().__init__(f"step {step} failed ({kind}): {message}" + (f"\n--- last output ---\n{tail}" if tail else ""))


DETERMINISTIC = ("ConfigError", "BudgetExceeded", "NoOffersError", "HostKeyChanged", "ValueError", "ValidationError")


def is_transient(exc: BaseException) -> bool:
    if isinstance(getattr(exc, "retryable", None), bool):  # StepFailed, HubUploadError: they know
        return exc.retryable
    if type(exc).__name__ in DETERMINISTIC:
        return False
    from infra.machine import CommandFailed, TransientMachineError

    if isinstance(exc, TransientMachineError):
        return True
    if isinstance(exc, CommandFailed):
        return False
    return isinstance(exc, (ConnectionError, TimeoutError, OSError)) or "429" in str(exc)


def retry_transient(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect retry_condition_fn: retry only transient failures."""
    try:
        exc = state.result(raise_on_failure=False)
    except BaseException as e:  # the result itself raised
        exc = e
    return isinstance(exc, BaseException) and is_transient(exc)
