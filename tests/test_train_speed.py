"""benchmarks/train_speed.py drives the train step's own core (Recipe, Trainer): it must keep up with
their fields, or `python -m benchmarks.train_speed` breaks unseen between its runs."""
from __future__ import annotations

import pytest

from benchmarks import train_speed


@pytest.mark.parametrize("variant", ["plain", "int8", "int4"])
def test_each_variant_trains_a_step_through_the_train_loop(variant):
    r = train_speed.one("tiny", variant, False, steps=1, label_tokens=8, batch=1)
    assert r["variant"] == variant and r["seconds_per_step"] > 0
    assert (r["fake_quant_modules"] > 0) == (variant != "plain"), r
