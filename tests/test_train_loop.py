"""steps/train_loop.py: compiled blocks without graph breaks, the FLOP count, the first step timed apart,
8-bit optimizer states that resume exactly, and a GPU probe that runs with torch + transformers only."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import WhisperConfig

from benchmarks.gpu_probe import SHAPES
from contract.quant_spec import QuantSpec
from steps import fake_quant, train_loop
from steps.train_loop import Recipe, Trainer
from tiny_whisper import tiny_whisper

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("scheme", ["int8", "int4", None])
def test_fake_quantized_blocks_compile_without_graph_breaks(scheme):
    model = tiny_whisper().train()
    if scheme:
        fake_quant.prepare(model, QuantSpec.of(scheme))
    enc, dec = model.model.encoder.layers[0], model.model.decoder.layers[0]
    x = torch.randn(2, 50, 64, requires_grad=True)
    for fn in (lambda a: enc(a, None, None)[0].sum(),
               lambda a: dec(a[:, :6], encoder_hidden_states=a)[0].sum()):
        torch._dynamo.reset()
        e = torch._dynamo.explain(fn)(x)
        assert e.graph_break_count == 0 and e.graph_count == 1, [str(b.reason)[:300] for b in e.break_reasons]


def test_flops_per_sample_at_the_real_shapes():
    """~7e12 FLOPs per 30 s sample with 96 label tokens, 98 % in the encoder (docs/REFERENCE.md)."""
    f = train_loop.flops_per_sample(WhisperConfig(**SHAPES["large-v3-distil"]), 96)
    assert 6.8e12 < f["train_flops"] < 7.1e12 and 0.97 < f["encoder_share"] < 0.99
    frozen = train_loop.flops_per_sample(WhisperConfig(**SHAPES["large-v3-distil"]), 96, train_encoder=False)
    assert frozen["train_flops"] < 0.4 * f["train_flops"]


def test_first_step_is_timed_apart_from_the_steady_state():
    trainer = Trainer(tiny_whisper(), Recipe(quant=QuantSpec.of("int8"), gradient_checkpointing=True, compile=False,
                                            learning_rate=1e-3), total_steps=3)
    feats, labels = torch.randn(2, 80, 100), torch.randint(3, 120, (2, 6))
    assert trainer.speed()["samples_per_s"] is None
    rows = [trainer.step([{"input_features": feats, "labels": labels}]) for _ in range(3)]
    s = trainer.speed()
    assert s["first_step_s"] == pytest.approx(rows[0]["seconds"], abs=1e-3) and s["steady_steps"] == 2
    assert s["samples_per_s"] == pytest.approx(4 / (rows[1]["seconds"] + rows[2]["seconds"]), rel=1e-2)
    assert rows[-1]["loss"] < rows[0]["loss"]


def test_the_gpu_probe_needs_neither_pydantic_nor_datasets_torchvision_or_torchao(tmp_path):
    """The GPU image brings torch and transformers: the probe must run on what it brings."""
    site = Path(torch.__file__).parent.parent
    bare = tmp_path / "site"
    bare.mkdir()
    for entry in site.iterdir():
        if not entry.name.startswith(("pydantic", "datasets", "torchvision", "torchao", "prefect")):
            (bare / entry.name).symlink_to(entry)
    out = tmp_path / "gpu.json"
    code = ("import sys; from benchmarks import gpu_probe; sys.exit(gpu_probe.main(['--shapes', 'tiny', '--batch', '2', "
            f"'--steps', '1', '--warmup', '0', '--label-tokens', '8', '--modes', 'int8_eager', '--out', {str(out)!r}]))")
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{bare}"}
    proc = subprocess.run([sys.executable, "-S", "-c", code], cwd=REPO, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(out.read_text())["results"]["int8_eager"]["fake_quant_linears"] == 34  # 32 block linears + proj_out + tied embedding


@pytest.mark.slow
def test_8bit_optimizer_states_resume_exactly(tmp_path):
    """AdamW8bit (torchao): a checkpoint of model + optimizer + scheduler continues bit for bit."""
    pytest.importorskip("torchao")
    recipe = Recipe(quant=QuantSpec.of("int8"), optimizer="adamw8bit", compile=False, learning_rate=1e-3, warmup_steps=1)
    batches = [{"input_features": torch.randn(2, 80, 100, generator=torch.Generator().manual_seed(i)),
                "labels": torch.randint(3, 120, (2, 6), generator=torch.Generator().manual_seed(i))} for i in range(3)]
    straight = Trainer(tiny_whisper(), recipe, total_steps=3)
    for b in batches:
        straight.step([b])
    first = Trainer(tiny_whisper(), recipe, total_steps=3)
    first.step([batches[0]])
    for name, obj in (("model", first.model), ("optimizer", first.optimizer), ("scheduler", first.scheduler)):
        torch.save(obj.state_dict(), tmp_path / f"{name}.pt")
    resumed = Trainer(tiny_whisper(seed=5), recipe, total_steps=3)
    resumed.model.load_state_dict(torch.load(tmp_path / "model.pt"))
    resumed.optimizer.load_state_dict(torch.load(tmp_path / "optimizer.pt"))
    resumed.scheduler.load_state_dict(torch.load(tmp_path / "scheduler.pt"))
    assert type(resumed.optimizer).__name__ == "AdamW8bit"
    for b in batches[1:]:
        resumed.step([b])
    a, b = straight.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_progress_artifact_shows_the_first_step_apart_from_the_steady_state():
    from tasks.remote_step import progress_description

    text = progress_description("train", 100, {"done": 5, "first_step_s": 42.0, "compiled": True, "samples_per_s": 52.2})
    assert text == "train: steps done out of 100; first step 42 s (compiling); steady state 52.2 samples/s"
    assert progress_description("bench", 3, {"done": 1}) == "bench: steps done out of 3"


@pytest.mark.slow
def test_every_block_of_a_kind_shares_one_compiled_graph():
    """32 encoder layers must not be 32 compilations (dynamo's recompile limit is 8: past it, layers
    would silently run eagerly). One graph for the encoder blocks, one for the decoder blocks."""
    from torch._dynamo.utils import counters
    from transformers import WhisperForConditionalGeneration

    cfg = WhisperConfig(**{**SHAPES["tiny"], "encoder_layers": 10, "max_source_positions": 50})
    torch._dynamo.reset()
    counters.clear()
    trainer = Trainer(WhisperForConditionalGeneration(cfg), Recipe(quant=QuantSpec.of("int8"), compile=True), total_steps=2)
    batch = {"input_features": torch.randn(2, 80, 100), "labels": torch.randint(3, 900, (2, 8))}
    for _ in range(2):
        trainer.step([batch])
    assert counters["stats"]["unique_graphs"] == 2 and not counters["recompiles"]


def test_the_probe_keeps_going_past_a_failing_mode_and_writes_what_it_has(tmp_path, monkeypatch):
    from benchmarks import gpu_probe

    written = []

    def fake(mode, *args):
        if mode == "int8_compiled":
            raise RuntimeError("inductor exploded\ntraceback text")
        return {"samples_per_s": 2.0 if mode == "plain_eager" else 3.0}

    monkeypatch.setattr(gpu_probe, "probe_mode", fake)
    out = tmp_path / "gpu.json"
    real_write = Path.write_text
    monkeypatch.setattr(Path, "write_text", lambda self, text: written.append(text) or real_write(self, text))
    gpu_probe.main(["--shapes", "tiny", "--modes", "plain_eager,int8_compiled,int4_compiled", "--out", str(out)])
    r = json.loads(out.read_text())["results"]
    assert r["int8_compiled"] == {"error": "RuntimeError: inductor exploded"}
    assert r["int4_compiled"]["speedup_vs_plain_eager"] == 1.5
    assert len(written) == 3  # after every mode: a run cut short keeps what it finished


def test_checkpoint_bytes_home_per_hour_follow_save_every_and_the_sync_interval():
    from benchmarks.checkpoint_size import per_hour

    # 52.2 samples/s, 32 per step: 5872 steps/h; every 3000 steps -> 1.96 checkpoints/h of 9.06 GB
    h = per_hour(9_062_136_108, 52.2, 32, 3000, 600, 0.02)
    assert h["optimizer_steps_per_hour"] == 5872 and h["checkpoints_copied_home_per_hour"] == pytest.approx(1.96, abs=0.01)
    assert h["gb_home_per_hour"] == pytest.approx(17.73, abs=0.02) and h["usd_per_hour_at"]["usd"] == pytest.approx(0.355, abs=1e-3)
    # saved more often than the sync runs: only the newest is copied, at most once per interval
    assert per_hour(9e9, 52.2, 32, 10, 600, 0.02)["checkpoints_copied_home_per_hour"] == 6.0
