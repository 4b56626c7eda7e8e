"""ONNX export + ONNX Runtime quantization of the QAT model and of the untrained base model.

Outputs in DIR/convert/: qat_fp32/, qat_<scheme>/, base_fp32/, base_ptq_<scheme>/. Each holds
encoder_model.onnx + decoder_model_merged.onnx (KV cache, one file for both decoding phases), the
processor files and generation_config.json, and loads with ORTModelForSpeechSeq2Seq.from_pretrained.

int8: dynamic quantization of MatMul weights (per channel, int8; activations uint8 per tensor at
run time), never Conv (ConvInteger has no CPU kernel). int4: MatMulNBits (block 32, symmetric,
accuracy_level 4) plus the token embedding as GatherBlockQuantized, saved with external data.
The decoder and decoder-with-past graphs are quantized separately and merged afterwards: the
quantizers do not reach into the merged decoder's If branches.
"""
from __future__ import annotations

import collections
import json
import logging
import shutil
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from .common import StepContext, StepError

ENCODER = "encoder_model.onnx"
DECODER = "decoder_model.onnx"
DECODER_WITH_PAST = "decoder_with_past_model.onnx"
MERGED = "decoder_model_merged.onnx"
TASK = "automatic-speech-recognition-with-past"
QUANT_OPS = ("MatMulInteger", "DynamicQuantizeLinear", "MatMulNBits", "GatherBlockQuantized",
             "ConvInteger", "DequantizeLinear", "MatMul", "Gather")


def dir_size_mb(path: Path) -> float:
    """Size of every file under path (ONNX external data included), in MB (1e6 bytes)."""
    return round(sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file()) / 1e6, 3)


def onnx_size_mb(path: Path) -> float:
    """Size of the model files only (.onnx and their external data), in MB."""
    files = [f for f in Path(path).iterdir() if f.suffix == ".onnx" or f.name.endswith(".onnx_data") or f.suffix == ".data"]
    return round(sum(f.stat().st_size for f in files) / 1e6, 3)


def _walk_nodes(graph: onnx.GraphProto):
    """Every node of a graph, including those inside If/Loop subgraphs."""
    for node in graph.node:
        yield node
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _walk_nodes(attr.g)
            for g in attr.graphs:
                yield from _walk_nodes(g)


def op_counts(path: Path) -> dict[str, int]:
    """Counts of the quantization-relevant node types in one .onnx file (subgraphs included)."""
    model = onnx.load(str(path), load_external_data=False)
    counts = collections.Counter(n.op_type for n in _walk_nodes(model.graph))
    return {op: counts[op] for op in QUANT_OPS if counts[op]}


def fold_transposed_weights(model: onnx.ModelProto) -> int:
    """Replace MatMul(x, Transpose(W)) by MatMul(x, W.T) with W.T a constant; returns how many.

    The tied proj_out is exported as a runtime Transpose of the embedding on some exporter
    versions; quantizers only see constant MatMul weights, so the biggest MatMul would stay fp32.
    """
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    producer = {o: n for n in graph.node for o in n.output}
    folded = 0
    for node in graph.node:
        if node.op_type != "MatMul" or node.input[1] in inits:
            continue
        t = producer.get(node.input[1])
        if t is None or t.op_type != "Transpose" or t.input[0] not in inits:
            continue
        w = numpy_helper.to_array(inits[t.input[0]])
        perm = next((list(a.ints) for a in t.attribute if a.name == "perm"), None)
        name = t.input[0] + "_transposed"
        if name not in inits:
            inits[name] = numpy_helper.from_array(np.ascontiguousarray(np.transpose(w, perm)), name)
            graph.initializer.append(inits[name])
        node.input[1] = name
        folded += 1
    return folded


def export(model_dir: Path, out_dir: Path) -> None:
    """Export a transformers Whisper to ONNX with KV cache (encoder, decoder, with-past, merged)."""
    from optimum.exporters.onnx import main_export

    if out_dir.exists():
        shutil.rmtree(out_dir)
    main_export(str(model_dir), output=str(out_dir), task=TASK, device="cpu", do_validation=False)
    missing = [f for f in (ENCODER, DECODER, DECODER_WITH_PAST, MERGED) if not (out_dir / f).is_file()]
    if missing:
        raise StepError(f"ONNX export of {model_dir} did not write {missing}; check optimum-onnx and transformers < 4.58")


def _load_folded(path: Path) -> onnx.ModelProto:
    model = onnx.load(str(path))
    fold_transposed_weights(model)
    return model


def quantize_int8(src: Path, dst: Path) -> None:
    """Dynamic int8: MatMul weights per channel QInt8, activations uint8 per tensor at run time."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(_load_folded(src), str(dst), op_types_to_quantize=["MatMul"], per_channel=True,
                     reduce_range=False, weight_type=QuantType.QInt8,
                     extra_options={"MatMulConstBOnly": True})


def quantize_int4(src: Path, dst: Path, block_size: int) -> None:
    """Weight-only int4: MatMulNBits (blocks along K) and GatherBlockQuantized for embeddings."""
    from onnxruntime.quantization.matmul_nbits_quantizer import (DefaultWeightOnlyQuantConfig,
                                                                 MatMulNBitsQuantizer)
    from onnxruntime.quantization.quant_utils import QuantFormat

    config = DefaultWeightOnlyQuantConfig(block_size=block_size, is_symmetric=True, accuracy_level=4,
                                          quant_format=QuantFormat.QOperator,
                                          op_types_to_quantize=("MatMul", "Gather"),
                                          quant_axes=(("MatMul", 0), ("Gather", 1)), bits=4)
    logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").setLevel(logging.WARNING)
    quantizer = MatMulNBitsQuantizer(_load_folded(src), algo_config=config)
    quantizer.process()
    quantizer.model.save_model_to_file(str(dst), use_external_data_format=True)


def _copy_side_files(src: Path, dst: Path) -> None:
    """Config, generation config and processor files (everything that is not an ONNX graph)."""
    for f in src.iterdir():
        if f.is_file() and f.suffix != ".onnx" and not f.name.endswith("onnx_data"):
            shutil.copy2(f, dst / f.name)


def quantize_dir(fp32_dir: Path, dst: Path, scheme: str, group_size: int) -> None:
    """Quantize an exported fp32 dir (encoder + both decoders) into dst with a merged decoder."""
    from optimum.onnx.graph_transformations import merge_decoders

    if dst.exists():
        shutil.rmtree(dst)
    dst.mkdir(parents=True)
    tmp = dst / ".parts"
    tmp.mkdir()

    def q(src: Path, out: Path) -> None:
        if scheme == "int8":
            quantize_int8(src, out)
        elif scheme == "int4":
            quantize_int4(src, out, group_size)
        else:
            raise StepError(f"quant.scheme {scheme!r} is not supported: use int8 or int4")

    q(fp32_dir / ENCODER, dst / ENCODER)
    q(fp32_dir / DECODER, tmp / DECODER)
    q(fp32_dir / DECODER_WITH_PAST, tmp / DECODER_WITH_PAST)
    merged = merge_decoders(onnx.load(str(tmp / DECODER)), onnx.load(str(tmp / DECODER_WITH_PAST)),
                            save_path=str(tmp / MERGED), strict=False)
    onnx.save(merged, str(dst / MERGED), save_as_external_data=(scheme == "int4"),
              all_tensors_to_one_file=True, location=MERGED + "_data", size_threshold=1024)
    shutil.rmtree(tmp)
    _copy_side_files(fp32_dir, dst)


def finish_fp32_dir(fp32_dir: Path) -> None:
    """Keep only encoder + merged decoder (the unmerged decoders duplicate every weight)."""
    for name in (DECODER, DECODER_WITH_PAST):
        for f in fp32_dir.glob(name + "*"):
            f.unlink()


def check_loads(path: Path) -> None:
    """Fail loudly if ORTModelForSpeechSeq2Seq cannot load the directory."""
    from optimum.onnxruntime import ORTModelForSpeechSeq2Seq

    try:
        ORTModelForSpeechSeq2Seq.from_pretrained(str(path))
    except Exception as e:  # noqa: BLE001 - re-raised with the directory named
        raise StepError(f"{path} does not load with ORTModelForSpeechSeq2Seq: {type(e).__name__}: {e}") from e


def convert_model(model_dir: Path, out_root: Path, fp32_name: str, q_name: str, scheme: str,
                  group_size: int, log=print) -> dict:
    """Export model_dir to out_root/fp32_name and quantize it into out_root/q_name; returns metrics."""
    fp32_dir, q_dir = out_root / fp32_name, out_root / q_name
    t0 = time.time()
    export(Path(model_dir), fp32_dir)
    t1 = time.time()
    log(f"exported {model_dir} -> {fp32_dir} in {t1 - t0:.1f}s")
    quantize_dir(fp32_dir, q_dir, scheme, group_size)
    t2 = time.time()
    log(f"quantized ({scheme}) -> {q_dir} in {t2 - t1:.1f}s")
    finish_fp32_dir(fp32_dir)
    for d in (fp32_dir, q_dir):
        check_loads(d)
    return {
        "export_s": round(t1 - t0, 2),
        "quantize_s": round(t2 - t1, 2),
        "ops": {q_name: {"encoder": op_counts(q_dir / ENCODER), "decoder": op_counts(q_dir / MERGED)}},
    }


def check_quantized(q_dir: Path, scheme: str) -> None:
    """The invariants a quantized directory must satisfy (raises StepError naming what is wrong)."""
    for part in (ENCODER, MERGED):
        ops = op_counts(q_dir / part)
        if ops.get("ConvInteger"):
            raise StepError(f"{q_dir / part} holds ConvInteger nodes, which ONNX Runtime's CPU EP cannot run")
        wanted = "MatMulInteger" if scheme == "int8" else "MatMulNBits"
        if not ops.get(wanted):
            raise StepError(f"{q_dir / part} holds no {wanted} node: the {scheme} quantization did nothing")


def run(ctx: StepContext) -> dict:
    from .models import resolve_model

    cfg = ctx.cfg
    scheme, group = cfg.quant.scheme, cfg.quant.group_size
    qat_model = ctx.dir_of("train") / "model"
    if not (qat_model / "config.json").is_file():
        raise StepError(f"{qat_model} holds no trained model (config.json missing); rerun the train step")
    jobs = [(qat_model, "qat_fp32", f"qat_{scheme}"),
            (Path(resolve_model(cfg.model.name_or_path)), "base_fp32", f"base_ptq_{scheme}")]
    metrics: dict = {"scheme": scheme, "seconds": {}, "ops": {}, "sizes_mb": {}}
    for i, (src, fp32_name, q_name) in enumerate(jobs):
        ctx.progress(i, len(jobs), model=fp32_name)
        m = convert_model(src, ctx.out, fp32_name, q_name, scheme, group, log=ctx.log)
        check_quantized(ctx.out / q_name, scheme)
        metrics["seconds"][fp32_name] = m["export_s"]
        metrics["seconds"][q_name] = m["quantize_s"]
        metrics["ops"].update(m["ops"])
        for name in (fp32_name, q_name):
            metrics["sizes_mb"][name] = onnx_size_mb(ctx.out / name)
            ctx.add_output(ctx.out / name)
    pt = sum(f.stat().st_size for f in qat_model.glob("*.safetensors")) / 1e6
    metrics["sizes_mb"]["pytorch_fp32"] = round(pt, 3)
    ctx.progress(len(jobs), len(jobs))
    (ctx.out / "sizes.json").write_text(json.dumps(metrics["sizes_mb"], indent=2))
    return metrics
