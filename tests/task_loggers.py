"""Task bodies run through .fn() outside a flow run, where Prefect's get_run_logger has no run to log
to: the tasks modules a test drives get a plain logger instead."""
from __future__ import annotations

import logging
from types import ModuleType

import pytest


def use_plain_loggers(monkeypatch: pytest.MonkeyPatch, *modules: ModuleType) -> None:
    """Each module's get_run_logger gives the plain "test" logger, for this test."""
    for module in modules:
        monkeypatch.setattr(module, "get_run_logger", lambda: logging.getLogger("test"))


def plain_loggers_for(*modules: ModuleType, autouse: bool = True):
    """A fixture `plain_loggers` that does use_plain_loggers for these modules; autouse unless told
    (`plain_loggers = plain_loggers_for(tasks.gate)` in the test module, or a helper it imports from)."""

    @pytest.fixture(autouse=autouse, name="plain_loggers")
    def plain_loggers(monkeypatch):
        use_plain_loggers(monkeypatch, *modules)

    return plain_loggers
