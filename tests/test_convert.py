"""steps/convert.py: ONNX export with KV cache, int8 / int4 quantization, and the step contract."""
from __future__ import annotations

import collections
import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from contract.quant_spec import QuantSpec
from steps import convert, tied_embedding
from steps.common import StepError, execute_step
from conftest import tiny_config
from french_clip import french_test_clip


def _walk(graph):
    for node in graph.node:
        yield node
        for a in node.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                yield from _walk(a.g)


def _walk_initializers(graph):
    yield from graph.initializer
    for node in graph.node:
        for a in node.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                yield from _walk_initializers(a.g)


def _fake_train(workdir: Path, model_dir: str, cfg) -> None:
    """What the train step leaves behind: train/model (plain transformers model + processor)."""
    shutil.copytree(model_dir, workdir / "train" / "model")
    (workdir / "train" / "result.json").write_text(json.dumps(
        {"step": "train", "status": "ok", "config_hash": "x", "metrics": {}}))


@pytest.fixture(scope="module")
def converted_int8(tmp_path_factory, tiny_model_dir):
    workdir = tmp_path_factory.mktemp("convert-int8")
    cfg = tiny_config()
    _fake_train(workdir, tiny_model_dir, cfg)
    assert execute_step("convert", cfg, workdir, convert.run) == 0
    return workdir


@pytest.fixture(scope="module")
def converted_int4(tmp_path_factory, tiny_model_dir):
    out = tmp_path_factory.mktemp("convert-int4")
    convert.convert_model(Path(tiny_model_dir), out, "qat_fp32", "qat_int4", QuantSpec.of("int4"))
    return out


def test_step_writes_the_four_dirs_and_sizes(converted_int8):
    result = json.loads((converted_int8 / "convert" / "result.json").read_text())
    assert result["status"] == "ok"
    m = result["metrics"]
    for name in ("qat_fp32", "qat_int8", "base_fp32", "base_ptq_int8"):
        d = converted_int8 / "convert" / name
        assert (d / "encoder_model.onnx").is_file() and (d / "decoder_model_merged.onnx").is_file()
        # the unmerged decoders duplicate every weight: they must not be shipped
        assert not (d / "decoder_model.onnx").exists() and not (d / "decoder_with_past_model.onnx").exists()
        for f in ("generation_config.json", "preprocessor_config.json", "tokenizer.json", "config.json"):
            assert (d / f).is_file(), f"{name} lacks {f}"
        assert m["sizes_mb"][name] == pytest.approx(convert.onnx_size_mb(d))
    assert m["sizes_mb"]["qat_int8"] < 0.8 * m["sizes_mb"]["qat_fp32"]
    assert m["ops"]["qat_int8"]["encoder"]["MatMulInteger"] > 0


def test_int8_quantizes_encoder_decoder_and_proj_out_never_conv(converted_int8):
    d = converted_int8 / "convert" / "qat_int8"
    vocab = json.loads((d / "config.json").read_text())["vocab_size"]
    for part in ("encoder_model.onnx", "decoder_model_merged.onnx"):
        model = onnx.load(str(d / part))
        ops = [n.op_type for n in _walk(model.graph)]
        assert ops.count("MatMulInteger") >= 4, part
        assert "ConvInteger" not in ops, part
        assert "Conv" in ops or part != "encoder_model.onnx"  # convs stay float
    merged = onnx.load(str(d / "decoder_model_merged.onnx"))
    if_node = next(n for n in merged.graph.node if n.op_type == "If")
    for branch in if_node.attribute:  # both decoding phases are quantized, not only one
        assert sum(n.op_type == "MatMulInteger" for n in _walk(branch.g)) >= 4, branch.name
    # the output projection (d_model x vocab) is int8, not left as a float MatMul weight
    floats = [i for i in merged.graph.initializer if i.data_type == onnx.TensorProto.FLOAT and vocab in i.dims
              and len(i.dims) == 2 and i.dims[0] != vocab]
    assert not floats, [i.name for i in floats]
    # the tied embedding reads the int8 projection: no fp32 (vocab x d_model) table is left either
    tables = [i.name for i in merged.graph.initializer if i.data_type == onnx.TensorProto.FLOAT and len(i.dims) == 2 and i.dims[0] == vocab]
    assert not tables, tables
    metrics = json.loads((converted_int8 / "convert" / "result.json").read_text())["metrics"]
    assert metrics["tied_embedding"]["qat_int8"] is True


def test_fp32_export_matches_pytorch_and_int8_stays_close(converted_int8, tiny_model_dir, french_manifest):
    import torch
    from optimum.onnxruntime import ORTModelForSpeechSeq2Seq
    from transformers import WhisperForConditionalGeneration, WhisperProcessor

    proc = WhisperProcessor.from_pretrained(tiny_model_dir)
    feats = proc.feature_extractor(french_test_clip(french_manifest), sampling_rate=16000, return_tensors="pt").input_features
    ids = torch.tensor([[50258, 50265, 50359, 50363, 400, 500]])
    with torch.inference_mode():
        ref = WhisperForConditionalGeneration.from_pretrained(tiny_model_dir).eval()(
            input_features=feats, decoder_input_ids=ids).logits
    logits = {}
    for name in ("qat_fp32", "qat_int8"):
        ort_model = ORTModelForSpeechSeq2Seq.from_pretrained(converted_int8 / "convert" / name)
        logits[name] = ort_model(input_features=feats, decoder_input_ids=ids).logits
    assert torch.allclose(logits["qat_fp32"], ref, atol=1e-3, rtol=1e-3)
    cos = torch.nn.functional.cosine_similarity(logits["qat_int8"].flatten(), ref.flatten(), dim=0)
    assert 0.95 < cos < 0.99999  # quantized (not identical) yet close; random tiny weights: ~0.97


def test_int4_has_4bit_weights_in_external_data(converted_int4):
    d = converted_int4 / "qat_int4"
    spec = QuantSpec.of("int4")
    merged = onnx.load(str(d / "decoder_model_merged.onnx"), load_external_data=False)
    nbits = [n for n in _walk(merged.graph) if n.op_type == "MatMulNBits"]
    assert nbits, "the decoder holds no MatMulNBits"
    for n in nbits:  # 4-bit blocks; proj_out (the vocabulary) and the cross-attention k/v are not among them
        attrs = {a.name: helper.get_attribute_value(a) for a in n.attribute}
        assert attrs["bits"] == 4 and "logits" not in n.output and "encoder_attn/k_proj" not in n.name, (n.name, attrs)
        assert attrs["block_size"] == 32 and attrs.get("accuracy_level", 0) == spec.decoder_accuracy_level, (n.name, attrs)
    # the encoder: ONNX INT4 codes (two per byte, opset 21) and an int8 multiple per block, no int8 or float weight
    encoder = onnx.load(str(d / "encoder_model.onnx"), load_external_data=False)
    assert next(o.version for o in encoder.opset_import if o.domain in ("", "ai.onnx")) >= 21
    assert spec.encoder_layout == "int4_int8_kernel" and not any(n.op_type == "MatMulNBits" for n in encoder.graph.node)
    inits = {i.name: i for i in encoder.graph.initializer}
    codes = [i for name, i in inits.items() if name.endswith("_int4_codes")]
    config = json.loads((d / "config.json").read_text())
    assert len(codes) == 6 * config["encoder_layers"], len(codes)  # q, k, v, out, fc1, fc2 per layer
    for c in codes:  # [k / 32, 32, n], two 4-bit codes per byte
        blocks, group, n = c.dims
        length = int({e.key: e.value for e in c.external_data}["length"])
        assert c.data_type == onnx.TensorProto.INT4 and group == 32 and c.data_location == onnx.TensorProto.EXTERNAL
        assert length == blocks * group * n // 2
        assert list(inits[c.name.replace("_codes", "_multiples")].dims) == [blocks, 1, n]
    bases = {c.name[: -len("_int4_codes")] for c in codes}
    assert not (bases | {f"{b}_quantized" for b in bases}) & set(inits)  # neither the float nor the int8 weight
    assert spec.decoder_accuracy_level == 4  # int8-block decoder
    assert list(d.glob("*.onnx_data")) or list(d.glob("*.onnx.data"))
    # the 8-bit vocabulary is the int8 scheme's layout (MatMulInteger, int8 [d, vocab] weights), which the
    # tied embedding reads: no fp32 table of its own
    merged = onnx.load(str(d / "decoder_model_merged.onnx"), load_external_data=False)
    config = json.loads((d / "config.json").read_text())
    tables = [i.name for i in _walk_initializers(merged.graph) if list(i.dims) == [config["vocab_size"], config["d_model"]]]
    assert not tables, tables
    int8 = {i.name for i in _walk_initializers(merged.graph) if i.data_type == onnx.TensorProto.INT8
            and list(i.dims) == [config["d_model"], config["vocab_size"]]}
    assert len(int8) == 1, int8
    readers = collections.Counter(n.op_type for n in _walk(merged.graph) if set(n.input) & int8)
    assert readers == {"MatMulInteger": 2, "Transpose": 2}, readers  # one of each per decoder branch
    # the cross-attention keys and values (computed once per clip from the encoder states) are int8 too
    cross = [n for n in _walk(merged.graph) if n.op_type in ("MatMulInteger", "DynamicQuantizeMatMul")
             and "encoder_attn" in n.name and ("k_proj" in n.name or "v_proj" in n.name)]
    assert len(cross) == 2 * config["decoder_layers"], [n.name for n in cross]
    assert not any(n.op_type == "GatherBlockQuantized" for n in _walk(merged.graph))
    sizes = {n: convert.onnx_size_mb(converted_int4 / n) for n in ("qat_fp32", "qat_int4")}
    assert sizes["qat_int4"] < 0.3 * sizes["qat_fp32"], sizes
    convert.check_quantized(d, QuantSpec.of("int4"))


def test_int4_generates(converted_int4, french_manifest):
    from optimum.onnxruntime import ORTModelForSpeechSeq2Seq
    from transformers import WhisperProcessor

    d = converted_int4 / "qat_int4"
    model = ORTModelForSpeechSeq2Seq.from_pretrained(d)
    feats = WhisperProcessor.from_pretrained(d).feature_extractor(
        french_test_clip(french_manifest), sampling_rate=16000, return_tensors="pt").input_features
    out = model.generate(input_features=feats, language="fr", task="transcribe", max_new_tokens=5)
    assert out.shape[-1] >= 1


def test_every_encoder_runs_fused_attention(converted_int8, converted_int4):
    layers = json.loads((converted_int8 / "convert" / "qat_fp32" / "config.json").read_text())["encoder_layers"]
    dirs = [converted_int8 / "convert" / n for n in ("qat_fp32", "qat_int8", "base_fp32", "base_ptq_int8")]
    for d in dirs + [converted_int4 / "qat_int4"]:
        ops = collections.Counter(n.op_type for n in onnx.load(str(d / "encoder_model.onnx"), load_external_data=False).graph.node)
        assert ops["MultiHeadAttention"] == layers and ops["Softmax"] == 0, (d.name, ops)
    metrics = json.loads((converted_int8 / "convert" / "result.json").read_text())["metrics"]
    assert metrics["fused_attention"] == {n.name: layers for n in dirs}


def test_fused_attention_is_the_same_math(tiny_onnx_dir):
    """Fusing the plain export changes no encoder output beyond float rounding; masked attention
    (the decoder's causal self-attention) is left alone."""
    import onnxruntime as ort

    from steps.fuse_attention import fuse_attention

    plain = onnx.load(str(tiny_onnx_dir / "encoder_model.onnx"))
    fused = onnx.load(str(tiny_onnx_dir / "encoder_model.onnx"))
    heads = json.loads((tiny_onnx_dir / "config.json").read_text())["encoder_attention_heads"]
    assert fuse_attention(fused, heads) == 2
    x = np.random.default_rng(0).standard_normal((2, 80, 3000)).astype(np.float32)
    outs = [ort.InferenceSession(m.SerializeToString()).run(None, {"input_features": x})[0] for m in (plain, fused)]
    np.testing.assert_allclose(outs[1], outs[0], atol=1e-5, rtol=1e-5)
    decoder = onnx.load(str(tiny_onnx_dir / "decoder_model.onnx"))
    self_attention = [n for n in decoder.graph.node if n.op_type == "Softmax" and "self_attn" in n.name]
    assert self_attention
    fuse_attention(decoder, heads)
    assert [n for n in decoder.graph.node if n.op_type == "Softmax" and "self_attn" in n.name] == self_attention


def test_check_quantized_refuses_an_unquantized_dir(converted_int8):
    with pytest.raises(StepError, match="MatMulInteger"):
        convert.check_quantized(converted_int8 / "convert" / "qat_fp32", QuantSpec.of("int8"))


def test_fold_transposed_weights_keeps_the_math():
    import onnxruntime as ort

    rng = np.random.default_rng(0)
    w = rng.standard_normal((6, 4)).astype(np.float32)  # (vocab, d) like an embedding
    graph = helper.make_graph(
        [helper.make_node("Transpose", ["W"], ["Wt"], perm=[1, 0]), helper.make_node("MatMul", ["x", "Wt"], ["y"])],
        "g", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 4])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2, 6])], [numpy_helper.from_array(w, "W")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    assert tied_embedding.fold_transposed_weights(model) == 1
    matmul = next(n for n in model.graph.node if n.op_type == "MatMul")
    assert matmul.input[1] in {i.name for i in model.graph.initializer}
    x = rng.standard_normal((2, 4)).astype(np.float32)
    y = ort.InferenceSession(model.SerializeToString()).run(None, {"x": x})[0]
    np.testing.assert_allclose(y, x @ w.T, rtol=1e-5)


def test_missing_train_output_is_a_clear_error(tmp_path):
    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "result.json").write_text("{}")
    assert execute_step("convert", tiny_config(), tmp_path, convert.run) == 3
    err = json.loads((tmp_path / "convert" / "error.json").read_text())
    assert "rerun the train step" in err["message"]
