"""steps/fake_quant.py: which layers get fake-quantized, that it changes outputs and trains through,
that convert gives back plain Linears, and that the grids are ONNX Runtime's, bit for bit."""
from __future__ import annotations

import dataclasses
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn
from transformers import WhisperForConditionalGeneration

from steps import convert, fake_quant, int4_export
from steps.common import StepError
from contract.quant_spec import QuantSpec
from onnx_graphs import matmul_model, random_weights
from tiny_whisper import DEC_LAYERS, ENC_LAYERS, tiny_whisper

# Per encoder block: q, k, v, out, fc1, fc2; per decoder block: self q/k/v/out, cross q/k/v/out, fc1, fc2.
EXPECTED = ENC_LAYERS * 6 + DEC_LAYERS * 10
# plus what the export also quantizes: the output projection and the token embedding tied to it
TIED = 2


def batch(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(2, 80, 100, generator=g)
    labels = torch.randint(3, 120, (2, 6), generator=g)
    return feats, labels


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_prepare_wraps_what_the_export_quantizes_and_keeps_parameters(scheme):
    model = tiny_whisper()
    params_before = {n: p for n, p in model.named_parameters()}
    n = fake_quant.prepare(model, QuantSpec.of(scheme=scheme))
    assert n == EXPECTED + TIED == fake_quant.count_fake_quant(model)
    # convs and positional embeddings stay float; the tied output projection and token embedding
    # are quantized (steps/convert.py quantizes both), still sharing one Parameter
    m = model.model
    assert type(m.encoder.conv1) is nn.Conv1d and type(m.encoder.conv2) is nn.Conv1d
    assert type(m.decoder.embed_positions) is not fake_quant.FakeQuantEmbedding
    assert isinstance(model.proj_out, fake_quant.FakeQuantLinear) and model.proj_out.per_token
    assert isinstance(m.decoder.embed_tokens, fake_quant.FakeQuantEmbedding)
    assert model.proj_out.weight is m.decoder.embed_tokens.weight
    assert all(isinstance(x, fake_quant.FakeQuantLinear) for x in [m.encoder.layers[0].fc1, m.decoder.layers[1].encoder_attn.k_proj])
    # the same Parameter objects under the same names: an optimizer built later sees them
    assert {n: p for n, p in model.named_parameters()}.keys() == params_before.keys()
    assert all(p is params_before[n] for n, p in model.named_parameters())


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_fake_quant_changes_outputs_but_stays_close(scheme):
    model = tiny_whisper()
    feats, labels = batch()
    with torch.no_grad():
        ref = model(input_features=feats, labels=labels).logits
        fake_quant.prepare(model, QuantSpec.of(scheme=scheme, group_size=32))
        fq = model(input_features=feats, labels=labels).logits
        fake_quant.set_enabled(model, False)
        off = model(input_features=feats, labels=labels).logits
    assert torch.equal(off, ref)
    diff = (fq - ref).abs().max().item()
    assert diff > 1e-4, "fake quantization did not change the outputs"
    assert diff < 0.5 * ref.abs().max().item(), f"fake quantization broke the model (max diff {diff})"


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_gradients_flow_straight_through(scheme):
    model = tiny_whisper()
    fake_quant.prepare(model, QuantSpec.of(scheme=scheme))
    model.train()
    feats, labels = batch()
    model(input_features=feats, labels=labels).loss.backward()
    w = model.model.encoder.layers[0].self_attn.q_proj.weight
    assert w.grad is not None and w.grad.abs().sum() > 0
    # the straight-through estimator: d(sum fq(w))/dw == 1
    w = torch.randn(8, 64, requires_grad=True)
    fq = fake_quant.fake_quant_weight_int8(w) if scheme == "int8" else fake_quant.fake_quant_weight_blocks(w, 32)
    fq.sum().backward()
    assert torch.equal(w.grad, torch.ones_like(w))


def test_convert_gives_plain_linears_that_save_and_reload(tmp_path):
    model = tiny_whisper()
    keys = set(model.state_dict())
    fake_quant.prepare(model, QuantSpec.of(scheme="int8"))
    with torch.no_grad():
        model.model.decoder.layers[0].fc1.weight.add_(0.01)  # "training" changed a weight
    feats, labels = batch()
    fake_quant.set_enabled(model, False)
    with torch.no_grad():
        expected = model(input_features=feats, labels=labels).logits
    model = fake_quant.convert(model)
    assert fake_quant.count_fake_quant(model) == 0 and set(model.state_dict()) == keys
    assert all(type(m) is nn.Linear for m in model.modules() if isinstance(m, nn.Linear))
    assert type(model.model.decoder.embed_tokens) is nn.Embedding
    assert model.proj_out.weight is model.model.decoder.embed_tokens.weight  # still tied
    model.save_pretrained(tmp_path)
    again = WhisperForConditionalGeneration.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(again(input_features=feats, labels=labels).logits, expected)


def test_prepare_refuses_to_silently_do_nothing():
    with pytest.raises(StepError, match="Whisper"):
        fake_quant.prepare(nn.Linear(4, 4), QuantSpec.of(scheme="int8"))
    model = tiny_whisper()
    fake_quant.prepare(model, QuantSpec.of(scheme="int8"))
    with pytest.raises(StepError, match="already"):
        fake_quant.prepare(model, QuantSpec.of(scheme="int8"))
    empty = tiny_whisper()
    empty.model.encoder.layers, empty.model.decoder.layers = nn.ModuleList(), nn.ModuleList()
    with pytest.raises(StepError, match="no nn.Linear"):
        fake_quant.prepare(empty, QuantSpec.of(scheme="int4"))


# --- the grids are what ONNX Runtime runs -------------------------------------------------------

def test_int8_weight_grid_matches_ort_quantize_dynamic(tmp_path):
    w = random_weights(96, 48, 0)
    onnx.save(matmul_model(w), tmp_path / "m.onnx")
    convert.quantize_int8(tmp_path / "m.onnx", tmp_path / "q.onnx")  # what the convert step runs
    inits = {i.name: numpy_helper.to_array(i) for i in onnx.load(tmp_path / "q.onnx").graph.initializer}
    assert not inits["W_zero_point"].any()
    ort_w = inits["W_quantized"].astype(np.float32) * inits["W_scale"][None, :]
    ours = fake_quant.fake_quant_weight_int8(torch.from_numpy(w.T.copy())).numpy().T  # Linear weight = W^T
    np.testing.assert_array_equal(ours, ort_w)


def test_int8_activation_grid_matches_ort_dynamic_quantize_linear():
    graph = helper.make_graph(
        [helper.make_node("DynamicQuantizeLinear", ["X"], ["q", "s", "z"]),
         helper.make_node("DequantizeLinear", ["q", "s", "z"], ["Y"])], "dq",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, [7, 96])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [7, 96])])
    sess = ort.InferenceSession(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString())
    x = (np.random.default_rng(1).standard_normal((3, 7, 96)) * 2 + 0.3).astype(np.float32)
    x[2] = np.abs(x[2])  # an all-positive tensor: ORT widens the range to include 0
    expected = np.stack([sess.run(None, {"X": xi})[0] for xi in x])  # one range per utterance
    np.testing.assert_array_equal(fake_quant.fake_quant_act_uint8(torch.from_numpy(x)).numpy(), expected)
    per_token = np.stack([np.stack([sess.run(None, {"X": t[None].repeat(7, 0)})[0][0] for t in xi]) for xi in x])
    np.testing.assert_array_equal(fake_quant.fake_quant_act_uint8(torch.from_numpy(x), per_token=True).numpy(), per_token)


def test_decoder_self_side_ranges_are_per_token_like_cached_generation():
    model = tiny_whisper()
    fake_quant.prepare(model, QuantSpec.of(scheme="int8"))
    layer = lambda m: {n: l.per_token for n, l in m.named_modules() if isinstance(l, fake_quant.FakeQuantLinear)}
    assert not any(layer(model.model.encoder).values())
    dec = layer(model.model.decoder)
    assert {n for n, t in dec.items() if not t} == {f"layers.{i}.encoder_attn.{p}" for i in range(DEC_LAYERS)
                                                   for p in ("k_proj", "v_proj")}


def _tie_weights(k: int, n: int) -> np.ndarray:
    """Weights on which rounding ties happen: per block a max of 8 steps and values at x.5 steps."""
    rng = np.random.default_rng(7)
    steps = rng.integers(-15, 15, size=(k, n)) / 2.0  # multiples of half a step, exact in float32
    steps[::32, :] = -8.0  # each block's largest magnitude: the scale is exactly 2**-6
    return (steps * 2.0 ** -6).astype(np.float32)


@pytest.mark.parametrize("k,ties", [(96, False), (100, False), (96, True)])  # 100: a last, partial block
def test_int4_weight_grid_matches_ort_matmul_nbits(tmp_path, k, ties):
    """The decoder's grid (and the encoder's, with encoder_layout "nbits" at level 0: float activations)."""
    w = _tie_weights(k, 48) if ties else random_weights(k, 48, k)
    onnx.save(matmul_model(w), tmp_path / "m.onnx")
    spec = dataclasses.replace(QuantSpec.of("int4", 32), encoder_layout="nbits")
    int4_export.quantize_int4(tmp_path / "m.onnx", tmp_path / "q.onnx", spec, "encoder")  # as convert does
    model = onnx.load(str(tmp_path / "q.onnx"))
    assert [n.op_type for n in model.graph.node] == ["MatMulNBits"]
    sess = ort.InferenceSession(str(tmp_path / "q.onnx"))
    ort_w = sess.run(None, {"X": np.eye(k, dtype=np.float32)})[0]  # identity input reads the weights back
    ours = fake_quant.fake_quant_weight_blocks(torch.from_numpy(w.T.copy()), 32).numpy().T
    np.testing.assert_array_equal(ours, ort_w)
    assert np.abs(ours - w).max() > 1e-3  # and it is really 4-bit
    # and accuracy level 0 computes with float activations: any input
    x = np.random.default_rng(0).standard_normal((5, k)).astype(np.float32)
    np.testing.assert_allclose(sess.run(None, {"X": x})[0], x @ ours, rtol=0, atol=1e-5)


def test_int4_vocabulary_at_4_bits_matches_ort_matmul_nbits(tmp_path):
    """With quant.vocab_bits 4 the MatMul producing the logits (proj_out) is 4-bit MatMulNBits, on the grid QAT trains."""
    k = 96
    w = random_weights(k, 48, 3)
    low = int(np.abs(w[:32, 7]).argmax())
    w[(low + 1) % 32, 7] = -w[low, 7] * 1.0001  # the block's largest magnitude, of the other sign: w[low] clamps
    onnx.save(matmul_model(w, out="logits"), tmp_path / "m.onnx")
    int4_export.quantize_int4(tmp_path / "m.onnx", tmp_path / "q.onnx", QuantSpec.of("int4", 32, 4), "decoder")
    model = onnx.load(str(tmp_path / "q.onnx"))
    bits = [helper.get_attribute_value(a) for n in model.graph.node for a in n.attribute if a.name == "bits"]
    assert bits == [4]
    ort_w = ort.InferenceSession(str(tmp_path / "q.onnx")).run(None, {"X": np.eye(k, dtype=np.float32)})[0]
    ours = fake_quant.fake_quant_weight_blocks(torch.from_numpy(w.T.copy()), 32, 4).numpy().T
    # identity rows through int8 activations (127 x 1/127) and MLAS's zero-point block sums: float residue only
    np.testing.assert_allclose(ours, ort_w, rtol=1e-6, atol=1e-7)
    step = np.repeat(np.abs(w).reshape(-1, 32, 48).max(axis=1), 32, axis=0) / 8
    err = np.abs(ours - w)
    assert err.max() > 1e-7 and np.all(err <= step * 1.0001)  # really quantized, at most one step (the clamp)
    assert err[low, 7] > 0.5 * step[low, 7]  # the clamped weight


def test_int4_vocabulary_at_8_bits_is_the_int8_schemes_layout(tmp_path):
    """quant.vocab_bits 8 (the default): proj_out is quantized as the int8 scheme does it (per-channel int8
    weights, uint8 activations per call: a fast CPU kernel), on the grid QAT trains; nothing is MatMulNBits."""
    w = random_weights(96, 48, 3)
    onnx.save(matmul_model(w, out="logits"), tmp_path / "m.onnx")
    int4_export.quantize_int4(tmp_path / "m.onnx", tmp_path / "q.onnx", QuantSpec.of("int4", 32, 8), "decoder")
    model = onnx.load(str(tmp_path / "q.onnx"))
    assert {n.op_type for n in model.graph.node} >= {"DynamicQuantizeLinear", "MatMulInteger"}
    assert "MatMulNBits" not in {n.op_type for n in model.graph.node}
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    ort_w = inits["W_quantized"].astype(np.float32) * inits["W_scale"][None, :]
    ours = fake_quant.fake_quant_weight_int8(torch.from_numpy(w.T.copy())).numpy().T
    np.testing.assert_array_equal(ours, ort_w)
    # and what QAT puts in front of it: the int8 scheme's proj_out, activations per token
    tw = tiny_whisper()
    fake_quant.prepare(tw, QuantSpec.of("int4", 32, 8))
    assert (tw.proj_out.scheme, tw.proj_out.per_token) == ("int8", True)
    assert tw.model.decoder.embed_tokens.scheme == "int8"


def test_one_spec_sets_the_grid_training_sees_and_the_export_writes(tmp_path):
    """contract/quant_spec.py is the one owner: a group size set there reaches both QAT and the export."""
    spec = QuantSpec.of("int4", group_size=64)
    model = tiny_whisper()
    fake_quant.prepare(model, spec)
    assert {m.group_size for m in model.modules() if isinstance(m, fake_quant.FakeQuantLinear) and m.scheme == "int4"} == {64}
    onnx.save(matmul_model(random_weights(128, 48, 0)), tmp_path / "m.onnx")
    int4_export.quantize_int4(tmp_path / "m.onnx", tmp_path / "q.onnx", spec, "decoder")
    (node,) = onnx.load(str(tmp_path / "q.onnx")).graph.node
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    assert (attrs["block_size"], attrs["bits"], attrs.get("accuracy_level", 0)) == (64, spec.bits, spec.decoder_accuracy_level)
    int4_export.quantize_int4(tmp_path / "m.onnx", tmp_path / "q.onnx", spec, "encoder")
    multiples = {i.name: list(i.dims) for i in onnx.load(str(tmp_path / "q.onnx")).graph.initializer
                 if i.name.endswith("_int4_multiples")}
    assert list(multiples.values()) == [[128 // 64, 1, 48]], multiples
    assert {m.int8_activations for m in model.model.decoder.modules()
            if isinstance(m, fake_quant.FakeQuantLinear) and m.scheme == "int4"} == {spec.decoder_accuracy_level == 4}
    with pytest.raises(ValueError, match="vocab_bits"):
        QuantSpec.of("int8", vocab_bits=4)


@pytest.mark.parametrize("k", [96, 100])  # 100: a last, partial block
def test_int4_decoder_activation_grid_matches_ort_accuracy_level_4(tmp_path, k):
    """The decoder's MatMulNBits run at accuracy_level 4: MLAS quantizes each row's activations to int8 in
    blocks of group_size (scale max|x|/127, half to even). QAT's FakeQuantLinear computes the same."""
    w = _tie_weights(k, 48)  # weights exactly on the 4-bit grid: only the activations are rounded
    onnx.save(matmul_model(w), tmp_path / "m.onnx")
    spec = QuantSpec.of("int4", 32)
    int4_export.quantize_int4(tmp_path / "m.onnx", tmp_path / "q.onnx", spec, "decoder")
    (node,) = onnx.load(str(tmp_path / "q.onnx")).graph.node
    assert {a.name: helper.get_attribute_value(a) for a in node.attribute}["accuracy_level"] == 4
    sess = ort.InferenceSession(str(tmp_path / "q.onnx"))
    rng = np.random.default_rng(3)
    x = (rng.standard_normal((6, k)) * rng.uniform(0.05, 20, (6, 1))).astype(np.float32)
    x[1, 40:72] = 0.0  # an all-zero block
    layer = nn.Linear(k, 48, bias=False)
    layer.weight.data = torch.from_numpy(w.T.copy())
    fq = fake_quant.FakeQuantLinear(layer, "int4", 32, int8_activations=True)
    with torch.no_grad():
        ours = fq(torch.from_numpy(x)).numpy()
        float_acts = x @ w
    shipped = sess.run(None, {"X": x})[0]
    scale = np.abs(shipped).max(axis=1, keepdims=True)
    np.testing.assert_allclose(ours / scale, shipped / scale, rtol=0, atol=2e-6)  # float summation order only
    assert np.abs(float_acts - shipped).max() / scale.max() > 1e-4  # the activations are really int8


def test_int4_layouts_per_linear():
    """The decoder's cross-attention k/v read all encoder frames once per clip: int8 weights per channel, one
    activation range per clip, as the int8 scheme trains them; every other decoder Linear is int4 with int8
    activation blocks; every encoder Linear is int4 codes run by the int8 kernel, one range per utterance."""
    model = tiny_whisper()
    fake_quant.prepare(model, QuantSpec.of("int4"))
    dec = {n: (m.scheme, m.per_token, m.int8_activations) for n, m in model.model.decoder.named_modules()
           if isinstance(m, fake_quant.FakeQuantLinear)}
    cross = {f"layers.{i}.encoder_attn.{p}" for i in range(DEC_LAYERS) for p in ("k_proj", "v_proj")}
    assert {n for n, v in dec.items() if v[0] == "int8"} == cross
    assert all(dec[n] == ("int8", False, False) for n in cross)
    assert all(v == ("int4", True, True) for n, v in dec.items() if n not in cross)
    enc = [(m.scheme, m.per_token, m.int8_activations, m.int8_kernel) for m in model.model.encoder.modules()
           if isinstance(m, fake_quant.FakeQuantLinear)]
    assert enc and set(enc) == {("int4", False, False, True)}  # the encoder's 4-bit codes on the int8 kernel


@pytest.mark.parametrize("k", [96, 512])
def test_int4_encoder_grid_is_what_ort_runs_with_the_int8_kernel(tmp_path, k):
    """The int4 encoder's file holds 4-bit codes and block multiples; the session folds them into int8
    weights and runs the int8 scheme's kernel. QAT's FakeQuantLinear computes the same, to float rounding."""
    w = random_weights(k, 48, k)
    w[:, 5] = 0.0  # an all-zero output channel
    w[32:64, 7] *= 1e-3  # a block far below its channel's largest weight: multiple 1
    onnx.save(matmul_model(w), tmp_path / "m.onnx")
    int4_export.quantize_int4(tmp_path / "m.onnx", tmp_path / "q.onnx", QuantSpec.of("int4", 32), "encoder")
    so = ort.SessionOptions()
    so.optimized_model_filepath = str(tmp_path / "loaded.onnx")
    sess = ort.InferenceSession(str(tmp_path / "q.onnx"), so, providers=["CPUExecutionProvider"])
    assert [n.op_type for n in onnx.load(str(tmp_path / "loaded.onnx")).graph.node] == ["DynamicQuantizeMatMul"]
    stored = {i.name: i for i in onnx.load(str(tmp_path / "q.onnx")).graph.initializer}
    codes = numpy_helper.to_array(stored["W_int4_codes"])
    assert stored["W_int4_codes"].data_type == TensorProto.INT4 and codes.shape == (k // 32, 32, 48)
    assert len(stored["W_int4_codes"].raw_data) == k * 48 // 2  # two 4-bit codes per byte
    assert not any(i.data_type == TensorProto.INT8 and len(i.dims) == 2 for i in stored.values())
    x = np.random.default_rng(0).standard_normal((1, 7, k)).astype(np.float32) * 3
    layer = nn.Linear(k, 48, bias=False)
    layer.weight.data = torch.from_numpy(w.T.copy())
    fq = fake_quant.FakeQuantLinear(layer, "int4", 32, int8_kernel=True)
    with torch.no_grad():
        ours = fq(torch.from_numpy(x)).numpy()[0]
    shipped = sess.run(None, {"X": x[0]})[0]
    scale = np.abs(shipped).max()
    np.testing.assert_allclose(ours / scale, shipped / scale, rtol=0, atol=2e-6)  # float summation order only
    assert np.abs(x[0] @ w - shipped).max() / scale > 1e-3  # and it is really quantized
    assert np.all(shipped[:, 5] == 0)


def test_the_oldest_onnxruntime_the_card_pins_runs_the_int4_encoder(tmp_path):
    """The int4 encoder is ONNX opset 21 (Cast from INT4); the model card's install line (pyproject.toml's
    pin) promises its lowest onnxruntime loads it. A fresh venv with exactly that version runs the
    exported encoder and gets this environment's outputs (onnxruntime 1.22 has no Cast from INT4)."""
    import subprocess
    import sys

    from packaging.requirements import Requirement

    from tasks.model_card import serving_requirements

    pin = next(Requirement(r) for r in serving_requirements() if Requirement(r).name == "onnxruntime")
    lowest = next(s.version for s in pin.specifier if s.operator == ">=")
    source = matmul_model(random_weights(96, 48, 0))
    source.ir_version = 8  # as the exporter writes the real encoder (opset 18); the int4 export raises it to 10
    onnx.save(source, tmp_path / "m.onnx")
    int4_export.quantize_int4(tmp_path / "m.onnx", tmp_path / "q.onnx", QuantSpec.of("int4", 32), "encoder")
    assert onnx.load(str(tmp_path / "q.onnx")).ir_version == int4_export.INT4_IR_VERSION
    onnx.checker.check_model(str(tmp_path / "q.onnx"), full_check=True)
    x = np.random.default_rng(1).standard_normal((5, 96)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    here = ort.InferenceSession(str(tmp_path / "q.onnx"), providers=["CPUExecutionProvider"]).run(None, {"X": x})[0]
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", f"onnxruntime=={lowest}", "numpy"],
                         capture_output=True, text=True, timeout=600)
    assert pip.returncode == 0, pip.stderr[-2000:]
    probe = ("import sys, numpy as np, onnxruntime as ort\n"
             "s = ort.InferenceSession(sys.argv[1], providers=['CPUExecutionProvider'])\n"
             "np.save(sys.argv[3], s.run(None, {'X': np.load(sys.argv[2])})[0])\n")
    run = subprocess.run([str(venv / "bin" / "python"), "-c", probe, str(tmp_path / "q.onnx"), str(tmp_path / "x.npy"),
                          str(tmp_path / "y.npy")], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, f"onnxruntime {lowest} cannot run the int4 encoder: {run.stderr[-1500:]}"
    np.testing.assert_allclose(np.load(tmp_path / "y.npy"), here, rtol=1e-5, atol=1e-5)


def test_int4_encoder_codes_are_4_bit_and_their_products_int8():
    w = torch.from_numpy(random_weights(64, 96, 3).T.copy())  # [out 96, in 64]
    w[4] = 0.0
    codes, multiples, scale = fake_quant.int4_int8_kernel_codes(w, 32)
    assert codes.min() >= -8 and codes.max() <= 7 and codes.eq(codes.round()).all()
    assert multiples.min() >= 1 and multiples.max() <= fake_quant.INT8_KERNEL_MULTIPLES
    int8 = codes.view(96, 2, 32) * multiples.unsqueeze(-1)
    assert int8.min() >= -128 and int8.max() <= 112  # inside int8
    assert torch.all(codes[4] == 0)
    # each block's multiple beats (or ties) the smallest multiple that clips nothing
    back = (int8 * scale[:, None, None] - w.view(96, 2, 32)).square().sum(-1)
    ceiling = torch.clamp(torch.ceil(w.view(96, 2, 32).abs().amax(-1) / (7 * scale[:, None])), 1, 16)
    plain = (torch.round(w.view(96, 2, 32) / (ceiling * scale[:, None]).unsqueeze(-1)) * (ceiling * scale[:, None]).unsqueeze(-1)
             - w.view(96, 2, 32)).square().sum(-1)
    assert torch.all(back <= plain * (1 + 1e-5)) and torch.any(back < 0.99 * plain)
    with pytest.raises(StepError, match="group_size"):
        fake_quant.int4_int8_kernel_codes(w[:, :50], 32)


def test_the_encoder_layout_for_gpu_serving_is_a_config_choice(tmp_path):
    """quant.encoder_layout nbits (GPU serving: MatMulNBits has a CUDA kernel) reaches QAT and the export;
    the int8 scheme and unknown layouts are refused when the config loads."""
    from contract.config import ConfigError
    from contract.quant_spec import quant_spec
    from conftest import tiny_config

    assert quant_spec(tiny_config(**{"quant.scheme": "int4"}).quant).encoder_layout == "int4_int8_kernel"
    spec = quant_spec(tiny_config(**{"quant.scheme": "int4", "quant.encoder_layout": "nbits"}).quant)
    model = tiny_whisper()
    fake_quant.prepare(model, spec)
    enc = {(m.int8_kernel, m.int8_activations) for m in model.model.encoder.modules() if isinstance(m, fake_quant.FakeQuantLinear)}
    assert enc == {(False, False)}  # MatMulNBits blocks, float activations
    onnx.save(matmul_model(random_weights(64, 48, 0)), tmp_path / "m.onnx")
    int4_export.quantize_int4(tmp_path / "m.onnx", tmp_path / "q.onnx", spec, "encoder")
    (node,) = onnx.load(str(tmp_path / "q.onnx")).graph.node
    assert node.op_type == "MatMulNBits"
    assert {a.name: helper.get_attribute_value(a) for a in node.attribute}.get("accuracy_level", 0) == 0
    for bad in ({"quant.scheme": "int8", "quant.encoder_layout": "nbits"},
                {"quant.scheme": "int4", "quant.encoder_layout": "int8_dynamic"}):
        with pytest.raises(ConfigError, match="encoder_layout"):
            tiny_config(**bad)
