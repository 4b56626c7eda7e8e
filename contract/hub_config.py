"""The `hub` section: where the model is published, and who must approve it first."""
from __future__ import annotations

import os
import re
from typing import Literal, Optional

from pydantic import Field, field_validator

from .machine_config import Strict


# The Hub's naming rule for each half of a repo id: letters, digits, '-', '_', '.'; no '--' or '..';
# neither starting nor ending with '-' or '.'; at most 96 characters.
HUB_NAME = re.compile(r"(?!.*(?:--|\.\.))(?![-.])[A-Za-z0-9_.-]{1,96}(?<![-.])")


def resolve_endpoint(endpoint: Optional[str] = None) -> str:
    """The argument, else $HF_ENDPOINT read now (not at import), else the public Hub."""
    from huggingface_hub import constants

    return (endpoint or os.environ.get("HF_ENDPOINT") or constants._HF_DEFAULT_ENDPOINT).rstrip("/")


def hub_repo_id_problem(repo_id: str) -> Optional[str]:
    """Why `repo_id` is not a valid Hub model id ('owner/name'), or None when it is."""
    parts = repo_id.split("/")
    if len(parts) != 2 or not all(parts):
        return "must look like 'owner/name'"
    for what, part in zip(("owner", "name"), parts):
        if not HUB_NAME.fullmatch(part):
            return (f"{what} {part!r} breaks the Hub's naming rule: letters, digits, '-', '_' and '.' only, "
                    f"no '--' or '..', not starting or ending with '-' or '.', at most 96 characters")
    return None


class HubConfig(Strict):
    repo_id: Optional[str] = Field(default=None, description="owner/name on the Hugging Face Hub")
    private: bool = True
    license: str = Field(default="mit", pattern=r"^[A-Za-z0-9][A-Za-z0-9.+-]{0,63}$",
                         description="a Hub license id (mit, apache-2.0, cc-by-4.0, other): letters, digits, '.+-'")
    approval: Literal["required", "none"] = Field(default="required", description=(
        "required: once the gate passed, nothing is uploaded until a person approves the run in Prefect's "
        "input form (the run waits suspended, no machine rented); none: a passing run uploads at once"))
    approval_timeout_hours: float = Field(default=72, gt=0, le=24 * 30, description=(
        "how long an approval request waits for an answer; none by then: nothing is uploaded and the run fails"))

    @field_validator("repo_id")
    @classmethod
    def _repo(cls, v: Optional[str]) -> Optional[str]:
        problem = None if v is None else hub_repo_id_problem(v)
        if problem:
            raise ValueError(f"hub.repo_id {problem}")
        return v
