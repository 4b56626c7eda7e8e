"""steps/train.py on the tiny random Whisper, CPU: outputs, QAT kept on, frozen encoder, exact resume."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from steps import train, train_loop
from steps.common import StepError
from train_runs import context, history, make_prepared, train_until_interrupted


def test_train_writes_model_history_checkpoints_and_metrics(tmp_path):
    make_prepared(tmp_path)
    ctx = context(tmp_path, max_steps=4, save_every=1, eval_every=2, gradient_checkpointing=True)
    events = []
    ctx.progress = lambda done, total, **kw: events.append(kw)
    m = train.run(ctx)
    assert m["optimizer_steps"] == 4 and m["fake_quant_modules"] == 34 and m["quant_scheme"] == "int8"
    # the first step (where compilation happens) apart from the steady state, in the metrics and progress lines
    assert m["compiled"] is False and m["first_step_s"] > 0 and m["samples_per_s"] > 0 and m["optimizer"] == "adamw"
    assert events[0]["first_step_s"] == m["first_step_s"] and events[0]["samples_per_s"] is None
    assert events[-1]["samples_per_s"] == m["samples_per_s"] and events[-1]["steady_steps"] == 3
    assert m["checkpoint_bytes"] > 0 and m["label_tokens"] % 8 == 0 and m["train_flops_per_sample"] > 0
    assert m["precision"] == "fp32" and m["device"] == "cpu" and m["freeze_encoder"] is False
    assert m["samples_per_s"] > 0 and m["peak_memory_mb"] > 0 and m["trainable_params"] > 0
    assert m["dev_wer_first"] is not None and m["dev_wer"] is not None
    # the same data for train and dev: 4 steps at lr 1e-3 must lower the dev loss
    assert m["dev_loss"] < m["dev_loss_first"]
    h = history(ctx)
    assert [r["step"] for r in h if "loss" in r] == [1, 2, 3, 4]
    assert [r["step"] for r in h if "dev_wer" in r] == [0, 2, 4]
    # saved at 1, 2, 3 (the final step goes to model/); the last two kept
    assert sorted(p.name for p in (ctx.out / "checkpoints").iterdir()) == ["step-2", "step-3"]
    from transformers import WhisperForConditionalGeneration, WhisperProcessor

    model = WhisperForConditionalGeneration.from_pretrained(ctx.out / "model")
    assert not any("FakeQuant" in type(x).__name__ for x in model.modules())
    WhisperProcessor.from_pretrained(ctx.out / "model")
    assert ctx.outputs == ["train/model", "train/history.jsonl"]


@pytest.mark.parametrize("compiled", [False, pytest.param(True, marks=pytest.mark.slow)], ids=["eager", "compiled"])
def test_resume_gives_the_same_weights_as_an_uninterrupted_run(tmp_path, compiled):
    """CPU kernels are deterministic for equal shapes, order and thread count, and a checkpoint
    restores weights, AdamW moments, scheduler, RNG and data position bit for bit: so tolerance 0.
    Compiled blocks too: static shapes (labels padded to one length) make each kernel a function of
    its batch shape alone, whatever the process compiled before."""
    cfg = dict(max_steps=5, save_every=2, eval_every=3, grad_accum=2, warmup_steps=2,  # 10 micro-batches, 3 epochs
               compile=compiled)
    straight, broken = tmp_path / "straight", tmp_path / "broken"
    for d in (straight, broken):
        make_prepared(d, n_train=5, n_dev=2)
    train.run(context(straight, **cfg))

    ctx = context(broken, **cfg)
    real_progress = ctx.progress

    def crash_at_4(done, total, **kw):
        real_progress(done, total, **kw)
        if done == 4:
            raise RuntimeError("machine lost")

    ctx.progress = crash_at_4
    with pytest.raises(RuntimeError, match="machine lost"):
        train.run(ctx)
    # lost during step 4, before its checkpoint: history already holds steps 3 and 4, resume must drop them
    assert sorted(p.name for p in (ctx.out / "checkpoints").iterdir()) == ["step-2"]
    if compiled:  # the resumed run compiles afresh, like a new process on a new machine
        torch._dynamo.reset()
    m = train.run(context(broken, resume=True, **cfg))
    assert m["resumed_from_step"] == 2 and m["optimizer_steps"] == 5 and m["compiled"] is compiled

    a, b = load_file(straight / "train/model/model.safetensors"), load_file(broken / "train/model/model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    ha, hb = history(context(straight, **cfg)), history(context(broken, **cfg))
    assert [r["step"] for r in hb if "loss" in r] == [1, 2, 3, 4, 5]
    assert [r["loss"] for r in ha if "loss" in r] == [r["loss"] for r in hb if "loss" in r]


def test_frozen_encoder_trains_only_the_decoder_with_qat_on_both(tmp_path):
    make_prepared(tmp_path)
    from steps.models import load_model

    base = load_model("fixture:tiny-random").state_dict()
    m = train.run(context(tmp_path, scheme="int4", freeze_encoder=True, max_steps=2, eval_every=2))
    assert m["fake_quant_modules"] == 34 and m["freeze_encoder"] is True
    after = load_file(tmp_path / "train/model/model.safetensors")
    enc = [k for k in after if k.startswith("model.encoder.")]
    dec = [k for k in after if k.startswith("model.decoder.layers.")]
    assert enc and all(torch.equal(after[k], base[k]) for k in enc)
    assert any(not torch.equal(after[k], base[k]) for k in dec)
    assert m["trainable_params"] == sum(v.numel() for k, v in base.items()
                                        if not k.startswith("model.encoder.") and k != "proj_out.weight")


def test_resume_never_loads_a_checkpoint_of_another_config(tmp_path):
    """run() sets such a checkpoint aside (tests/test_rerun.py); load_checkpoint still refuses one."""
    train_until_interrupted(tmp_path)
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.AdamW(model.parameters())
    with pytest.raises(StepError, match="another train config"):
        train.load_checkpoint(tmp_path / "train" / "checkpoints" / "step-1", model, opt,
                              torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0), "another-hash")


def test_lr_schedule_warms_up_then_decays_to_zero():
    f = [train_loop.lr_factor(s, 3, 10) for s in range(10)]
    assert f[:3] == pytest.approx([1 / 3, 2 / 3, 1.0]) and f[3] == 1.0
    assert all(a > b for a, b in zip(f[3:], f[4:])) and 0 < f[-1] < 0.1
    assert train_loop.lr_factor(0, 0, 5) == 1.0


def test_data_order_is_seeded_and_covers_each_epoch():
    a, b, c = train.MicroBatches(7, 3, seed=1), train.MicroBatches(7, 3, seed=1), train.MicroBatches(7, 3, seed=2)
    assert a.per_epoch == 3
    first = [a.indices(m) for m in range(6)]
    assert first == [b.indices(m) for m in range(6)] != [c.indices(m) for m in range(6)]
    assert sorted(sum(first[:3], [])) == list(range(7)) == sorted(sum(first[3:], []))
    assert first[:3] != first[3:]  # a new order each epoch
    assert b.indices(4) == first[4]  # random access (resume) gives the same batch


def test_frozen_encoder_outputs_are_cached_without_changing_the_training(tmp_path):
    """Two epochs with the encoder run once per clip train the same decoder as running it every step."""
    runs = {}
    for cache_mb in (0, 64):
        work = tmp_path / f"cache{cache_mb}"
        make_prepared(work)
        ctx = context(work, freeze_encoder=True, max_steps=6, eval_every=100, save_every=100, encoder_cache_mb=cache_mb)
        calls = []
        logged = []
        ctx.log = logged.append
        encoded = []
        real_call, real_qat = train.EncoderCache.__call__, train.fake_quant.prepare
        train.EncoderCache.__call__ = lambda self, rows, feats: calls.append(list(rows)) or real_call(self, rows, feats)

        def prepare(model, quant):  # count the clips the encoder really runs on
            model.model.encoder.register_forward_hook(lambda m, args, out: encoded.append(len(out[0])))
            return real_qat(model, quant)
        train.fake_quant.prepare = prepare
        try:
            train.run(ctx)
        finally:
            train.EncoderCache.__call__, train.fake_quant.prepare = real_call, real_qat
        runs[cache_mb] = load_file(work / "train/model/model.safetensors")
        assert any(("cached" in line) == bool(cache_mb) for line in logged)
        assert len(calls) == (6 if cache_mb else 0)  # 3 micro-batches per epoch, 2 epochs
        assert sum(encoded) == 2 * 3 + (6 if cache_mb else 12)  # two dev evaluations of 3 clips + training
    for k in runs[0]:
        torch.testing.assert_close(runs[64][k], runs[0][k], rtol=0, atol=1e-5, msg=k)


def test_the_orchestrators_save_every_checkpoints_more_often_than_the_config(tmp_path):
    """`python -m steps train --save-every N` (tasks/remote_step.py, from the GPU's expected speed: a
    checkpoint at most 30 min old) saves more often than train.save_every, without changing the config."""
    make_prepared(tmp_path)
    ctx = context(tmp_path, max_steps=3, save_every=100, eval_every=10)
    ctx.save_every = 1
    train.run(ctx)
    assert sorted(p.name for p in (ctx.out / "checkpoints").iterdir()) == ["step-1", "step-2"]
    assert ctx.cfg.train.save_every == 100
