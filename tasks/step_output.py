"""A step's output lines as home reads them (setup and every step alike): the last lines kept, the
STEP_ERROR report parsed, and the StepFailed raised when the command fails (tasks/retry.py: retried
by exit code only, whatever the report says)."""
from __future__ import annotations

from contract.catalogue import ERROR_PREFIX, marked_json
from infra.machines.streams import printable

from .retry import StepFailed, exit_code_retryable

TAIL_KEPT = 40  # lines kept for the failure message (its last TAIL_SHOWN) and the logs
TAIL_SHOWN = 15


class StepOutput:
    def __init__(self, step: str, log):
        self.step, self.log = step, log
        self.tail: list[str] = []
        self.error: dict = {}  # the STEP_ERROR report, once the machine printed one

    def line(self, line: str) -> None:
        """Keep the line and read a STEP_ERROR report from it (an unreadable one is logged, never fatal)."""
        self.tail.append(line)
        del self.tail[:-TAIL_KEPT]
        try:
            self.error.update(marked_json(line, ERROR_PREFIX) or {})
        except ValueError as e:
            self.log.warning("a STEP_ERROR line from the machine was ignored: %s", e)

    def failed(self, code: int) -> StepFailed:
        """The failure of a command that exited `code`: the report's message (printable) or the code."""
        return StepFailed(self.step, printable(str(self.error.get("message", f"exit code {code}"))),
                          exit_code_retryable(code), "\n".join(self.tail[-TAIL_SHOWN:]))
