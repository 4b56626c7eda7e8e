"""ONNX export + ONNX Runtime quantization of the QAT model and of the untrained base model.

Outputs in DIR/convert/: qat_fp32/, qat_<scheme>/, base_fp32/, base_ptq_<scheme>/. Each holds
encoder_model.onnx + decoder_model_merged.onnx (KV cache, one file for both decoding phases), the
processor files and generation_config.json, and loads with ORTModelForSpeechSeq2Seq.from_pretrained.
Every encoder's self-attention runs as one fused MultiHeadAttention node per layer (fuse_attention.py).

The grid is the run's contract.quant_spec.QuantSpec (what QAT trained). int8: steps/int8_export.py
(dynamic quantization of MatMul weights: per channel, int8; activations uint8 per tensor at run time;
never Conv: ConvInteger has no CPU kernel). int4: steps/int4_export.py (the encoder's 4-bit codes folded into int8
weights at load and run by int8's kernel; the decoder's MatMulNBits blocks with int8 activation blocks;
the cross-attention keys/values and the vocabulary int8 as here unless quant.vocab_bits is 4), saved with
external data. Either way the
tied token embedding reads the quantized output projection (steps/tied_embedding.py).
The decoder and decoder-with-past graphs are quantized separately and merged afterwards: the
quantizers do not reach into the merged decoder's If branches.
"""
from __future__ import annotations

import collections
import json
import shutil
import time
from pathlib import Path
from typing import Optional

import numpy as np
import onnx
from onnx.external_data_helper import _get_all_tensors, uses_external_data  # initializers + attributes, subgraphs too

from contract.catalogue import ptq_variant, quantized_variant
from contract.quant_spec import QuantSpec, quant_spec

from .common import StepContext, StepError
from .fuse_attention import fuse_encoder_file
from .int4_export import quantize_int4
from .int8_export import quantize_int8
from .model_size import weights_mb

ENCODER = "encoder_model.onnx"
DECODER = "decoder_model.onnx"
DECODER_WITH_PAST = "decoder_with_past_model.onnx"
MERGED = "decoder_model_merged.onnx"
TASK = "automatic-speech-recognition-with-past"
QUANT_OPS = ("MatMulInteger", "DynamicQuantizeLinear", "MatMulNBits", "GatherBlockQuantized",
             "ConvInteger", "DequantizeLinear", "MatMul", "Gather", "MultiHeadAttention")


def pytorch_size_mb(model_dir: Path) -> float:
    """The weights of a transformers model directory, in MB (steps/model_size.py)."""
    return weights_mb(model_dir, "pytorch")


def onnx_size_mb(path: Path) -> float:
    """Size of the model files only (.onnx and their external data), in MB (steps/model_size.py)."""
    return weights_mb(path, "onnx")


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
    """Counts of the quantization-relevant node types (and fused attention) in one .onnx file, subgraphs included."""
    model = onnx.load(str(path), load_external_data=False)
    counts = collections.Counter(n.op_type for n in _walk_nodes(model.graph))
    return {op: counts[op] for op in QUANT_OPS if counts[op]}


def _initializers(graph: onnx.GraphProto):
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _initializers(attr.g)


def tensor_mb_by_dtype(path: Path) -> dict:
    """MB of weights per data type in a model dir's .onnx files, plus the largest float32 tensors."""
    totals: dict[str, float] = collections.Counter()
    floats = []
    for f in sorted(Path(path).glob("*.onnx")):
        model = onnx.load(str(f), load_external_data=False)
        for t in _initializers(model.graph):
            ext = {e.key: e.value for e in t.external_data}
            itemsize = onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
            n = int(ext["length"]) if "length" in ext else (len(t.raw_data) or int(np.prod(t.dims)) * itemsize)
            dtype = onnx.TensorProto.DataType.Name(t.data_type).lower()
            totals[dtype] += n / 1e6
            if dtype == "float":
                floats.append((f"{f.stem}:{t.name}", n / 1e6))
    out = {("float32" if k == "float" else k): round(v, 3) for k, v in totals.items()}
    out["largest_float"] = [(n, round(mb, 3)) for n, mb in sorted(floats, key=lambda x: -x[1])[:5]]
    return out


def export(model_dir: Path, out_dir: Path, revision: Optional[str] = None) -> None:
    """Export a transformers Whisper (a folder, or a Hub id at `revision`) to ONNX with KV cache
    (encoder, decoder, with-past, merged)."""
    from optimum.exporters.onnx import main_export

    from .models import revision_kwargs

    if out_dir.exists():
        shutil.rmtree(out_dir)
    main_export(str(model_dir), output=str(out_dir), task=TASK, device="cpu", do_validation=False,
                **revision_kwargs(str(model_dir), revision))
    missing = [f for f in (ENCODER, DECODER, DECODER_WITH_PAST, MERGED) if not (out_dir / f).is_file()]
    if missing:
        raise StepError(f"ONNX export of {model_dir} did not write {missing}; check optimum-onnx and transformers < 4.58")


def _copy_side_files(src: Path, dst: Path) -> None:
    """Config, generation config and processor files (everything that is not an ONNX graph)."""
    for f in src.iterdir():
        if f.is_file() and f.suffix != ".onnx" and not f.name.endswith("onnx_data"):
            shutil.copy2(f, dst / f.name)


def quantize_dir(fp32_dir: Path, dst: Path, spec: QuantSpec) -> dict:
    """Quantize an exported fp32 dir (encoder + both decoders) into dst with a merged decoder."""
    from optimum.onnx.graph_transformations import merge_decoders

    if dst.exists():
        shutil.rmtree(dst)
    dst.mkdir(parents=True)
    tmp = dst / ".parts"
    tmp.mkdir()

    def q(src: Path, out: Path, part: str) -> bool:
        if spec.scheme == "int8":
            return quantize_int8(src, out)
        return quantize_int4(src, out, spec, part)

    q(fp32_dir / ENCODER, dst / ENCODER, "encoder")
    tied = [q(fp32_dir / DECODER, tmp / DECODER, "decoder"), q(fp32_dir / DECODER_WITH_PAST, tmp / DECODER_WITH_PAST, "decoder")]
    merge_decoders(onnx.load(str(tmp / DECODER)), onnx.load(str(tmp / DECODER_WITH_PAST)),
                   save_path=str(tmp / MERGED), strict=False)
    # read back what merge_decoders saved: when it wrote external data (FORCE_ONNX_EXTERNAL_DATA) the
    # proto it returns points at a file in tmp and holds no weights
    merged = onnx.load(str(tmp / MERGED))
    onnx.save(merged, str(dst / MERGED), save_as_external_data=(spec.scheme == "int4"),
              all_tensors_to_one_file=True, location=MERGED + "_data", size_threshold=1024)
    shutil.rmtree(tmp)
    _copy_side_files(fp32_dir, dst)
    return {"tied_embedding": all(tied)}


def finish_fp32_dir(fp32_dir: Path) -> None:
    """Keep only encoder + merged decoder (the unmerged decoders duplicate every weight)."""
    for name in (DECODER, DECODER_WITH_PAST):
        for f in fp32_dir.glob(name + "*"):
            f.unlink()


def name_external_data(model_dir: Path) -> dict[str, str]:
    """Give each graph's external data the name optimum's Hub loader downloads: `<file>_data`.

    ORT's quantizers write `encoder_model.onnx.data`; `ORTModelForSpeechSeq2Seq.from_pretrained(<repo id>)`
    fetches only `encoder_model.onnx_data` (optimum/onnxruntime/modeling.py `_cached_file`), so a model
    uploaded with the other name loads from a folder but not from the Hub. The data file is renamed
    and the graph's location fields rewritten (graph only: the weights are not read). Returns
    {graph: new data file name} for the graphs that changed."""
    renamed = {}
    graphs = sorted(Path(model_dir).glob("*.onnx"))
    models = {g: onnx.load(str(g), load_external_data=False) for g in graphs}
    for g, model in models.items():
        tensors = [t for t in _get_all_tensors(model) if uses_external_data(t)]
        wanted = g.name + "_data"
        locations = {e.value for t in tensors for e in t.external_data if e.key == "location"}
        if not locations or locations == {wanted}:
            continue
        shared = any(e.value in locations for other, m in models.items() if other != g
                     for t in _get_all_tensors(m) for e in t.external_data if e.key == "location")
        if len(locations) > 1 or shared or (g.parent / wanted).exists():
            raise StepError(f"{g}: external data in {sorted(locations)}; expected one file of its own, renamed to "
                            f"{wanted} (the name optimum downloads from the Hub)")
        (g.parent / locations.pop()).rename(g.parent / wanted)
        for t in tensors:
            for e in t.external_data:
                if e.key == "location":
                    e.value = wanted
        onnx.save(model, str(g))
        renamed[g.name] = wanted
    return renamed


def check_loads(path: Path) -> None:
    """Fail loudly if ORTModelForSpeechSeq2Seq cannot load the directory."""
    from optimum.onnxruntime import ORTModelForSpeechSeq2Seq

    try:
        ORTModelForSpeechSeq2Seq.from_pretrained(str(path))
    except Exception as e:  # noqa: BLE001 - re-raised with the directory named
        raise StepError(f"{path} does not load with ORTModelForSpeechSeq2Seq: {type(e).__name__}: {e}") from e


def convert_model(model_dir: Path, out_root: Path, fp32_name: str, q_name: str, spec: QuantSpec,
                  log=print, revision: Optional[str] = None) -> dict:
    """Export model_dir to out_root/fp32_name and quantize it into out_root/q_name; returns metrics."""
    fp32_dir, q_dir = out_root / fp32_name, out_root / q_name
    t0 = time.time()
    export(Path(model_dir), fp32_dir, revision)
    t1 = time.time()
    log(f"exported {model_dir} -> {fp32_dir} in {t1 - t0:.1f}s")
    info = quantize_dir(fp32_dir, q_dir, spec)
    t2 = time.time()
    log(f"quantized ({spec.describe()}) -> {q_dir} in {t2 - t1:.1f}s")
    finish_fp32_dir(fp32_dir)
    heads = json.loads((fp32_dir / "config.json").read_text())["encoder_attention_heads"]
    fused = {d.name: fuse_encoder_file(d / ENCODER, heads) for d in (fp32_dir, q_dir)}
    log(f"encoder self-attention fused into MultiHeadAttention: {fused}")
    for d in (fp32_dir, q_dir):
        renamed = name_external_data(d)
        if renamed:
            log(f"{d.name}: external data renamed for the Hub loader: {renamed}")
        check_loads(d)
    return {
        "export_s": round(t1 - t0, 2),
        "quantize_s": round(t2 - t1, 2),
        "ops": {q_name: {"encoder": op_counts(q_dir / ENCODER), "decoder": op_counts(q_dir / MERGED)}},
        "tensor_mb": {q_name: tensor_mb_by_dtype(q_dir)},
        "fused_attention": fused,
        **info,
    }


def check_quantized(q_dir: Path, spec: QuantSpec) -> None:
    """The invariants a quantized directory must satisfy (raises StepError naming what is wrong)."""
    int4_encoder = "MatMulNBits" if spec.encoder_layout == "nbits" else "MatMulInteger"
    wanted = ({ENCODER: "MatMulInteger", MERGED: "MatMulInteger"} if spec.scheme == "int8"
              else {ENCODER: int4_encoder, MERGED: "MatMulNBits"})
    for part in (ENCODER, MERGED):
        ops = op_counts(q_dir / part)
        if ops.get("ConvInteger"):
            raise StepError(f"{q_dir / part} holds ConvInteger nodes, which ONNX Runtime's CPU EP cannot run")
        if not ops.get(wanted[part]):
            raise StepError(f"{q_dir / part} holds no {wanted[part]} node: the {spec.scheme} quantization did nothing")


def run(ctx: StepContext) -> dict:
    from .models import resolve_model

    cfg = ctx.cfg
    scheme = cfg.quant.scheme
    qat_model = ctx.dir_of("train") / "model"
    if not (qat_model / "config.json").is_file():
        raise StepError(f"{qat_model} holds no trained model (config.json missing); rerun the train step")
    jobs = [(qat_model, "qat_fp32", quantized_variant(scheme), None),
            (Path(resolve_model(cfg.model.name_or_path)), "base_fp32", ptq_variant(scheme), cfg.model.revision)]
    metrics: dict = {"scheme": scheme, "seconds": {}, "ops": {}, "sizes_mb": {}}
    spec = quant_spec(cfg.quant)
    for i, (src, fp32_name, q_name, revision) in enumerate(jobs):
        ctx.progress(i, len(jobs), model=fp32_name)
        m = convert_model(src, ctx.out, fp32_name, q_name, spec, log=ctx.log, revision=revision)
        check_quantized(ctx.out / q_name, spec)
        metrics["seconds"][fp32_name] = m["export_s"]
        metrics["seconds"][q_name] = m["quantize_s"]
        metrics["ops"].update(m["ops"])
        metrics.setdefault("tensor_mb", {}).update(m["tensor_mb"])
        metrics.setdefault("tied_embedding", {})[q_name] = m["tied_embedding"]
        metrics.setdefault("fused_attention", {}).update(m["fused_attention"])
        for name in (fp32_name, q_name):
            metrics["sizes_mb"][name] = onnx_size_mb(ctx.out / name)
            ctx.add_output(ctx.out / name)
    metrics["sizes_mb"]["pytorch_fp32"] = pytorch_size_mb(qat_model)
    ctx.progress(len(jobs), len(jobs))
    (ctx.out / "sizes.json").write_text(json.dumps(metrics["sizes_mb"], indent=2))
    return metrics
