"""Which failures are worth a retry: transient ones (SSH drop, 429, network), never deterministic
ones (bad config, OOM, a full disk, a daily API quota, a step that reports it would fail again)."""
from __future__ import annotations

import errno
import socket
from typing import Any

from contract.catalogue import EXIT_RETRYABLE


class StepFailed(RuntimeError):
    """An on-machine step failed; `retryable` is home's decision (`exit_code_retryable`)."""

    def __init__(self, step: str, message: str, retryable: bool, tail: str = ""):
        self.step, self.retryable, self.tail = step, retryable, tail
        kind = "transient" if retryable else "deterministic, not retried"
        super().__init__(f"step {step} failed ({kind}): {message}" + (f"\n--- last output ---\n{tail}" if tail else ""))


def exit_code_retryable(code: int) -> bool:
    """Whether a failed step (or setup) is worth a retry, decided at home from its exit code class:
    only EXIT_RETRYABLE, the transient class the step chose by its own classification (network,
    a lost device); EXIT_DETERMINISTIC (config, OOM, disk full), a signal or any other code is not.
    The "retryable" field of a STEP_ERROR line is the machine's word and is never read: a machine
    cannot buy more than the task's own retries (remote_step: 3) this way."""
    return code == EXIT_RETRYABLE


# errno values of a network drop; any other OSError (ENOSPC, EACCES, ENOENT, EROFS ...) is local and deterministic
NETWORK_ERRNOS = {errno.ECONNRESET, errno.ECONNREFUSED, errno.ECONNABORTED, errno.ETIMEDOUT, errno.EHOSTUNREACH,
                  errno.ENETUNREACH, errno.ENETDOWN, errno.ENETRESET, errno.EPIPE, errno.EHOSTDOWN, errno.ENOTCONN,
                  errno.ESHUTDOWN}
TRANSIENT_STATUS = {408, 429, 500, 502, 503, 504}


def _network_error(exc: BaseException) -> bool:
    """A socket or connection failure (not a local file error)."""
    if isinstance(exc, (ConnectionError, TimeoutError, socket.timeout, socket.gaierror, socket.herror)):
        return True
    try:
        import requests

        if isinstance(exc, (requests.ConnectionError, requests.Timeout)):
            return True
    except ImportError:  # pragma: no cover - requests comes with vastai
        pass
    return isinstance(exc, OSError) and exc.errno in NETWORK_ERRNOS


def is_transient(exc: BaseException) -> bool:
    """By type and status code, never by the message text: an exception's own `retryable` flag
    (StepFailed, HubUploadError, a backend's ProviderError, BudgetExceeded, HostKeyChanged), the
    machine layer's TransientMachineError, an HTTP status worth a retry, a network error; everything
    else (a bad config's ValueError among them) is not."""
    if isinstance(getattr(exc, "retryable", None), bool):  # they know
        return exc.retryable
    from infra.machines.machine import CommandFailed, TransientMachineError

    if isinstance(exc, TransientMachineError):
        return True
    if isinstance(exc, CommandFailed):
        return False
    status = getattr(exc, "status", None) or getattr(exc, "status_code", None)
    if status is None and getattr(exc, "response", None) is not None:
        status = getattr(exc.response, "status_code", None)
    if isinstance(status, int):
        return status in TRANSIENT_STATUS
    return _network_error(exc)


def retry_transient(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect retry_condition_fn: retry only transient failures."""
    try:
        exc = state.result(raise_on_failure=False)
    except BaseException as e:  # the result itself raised
        exc = e
    return isinstance(exc, BaseException) and is_transient(exc)
