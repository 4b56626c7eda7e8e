"""StepError on its own (no pydantic, no config): what the training core and the GPU probe share."""


class StepError(RuntimeError):
    """A deterministic failure: retrying the same step with the same config fails again."""
