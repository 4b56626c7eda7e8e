"""ONNX export + ONNX Runtime quantization of the QAT model and of the untrained base model.

Outputs in DIR/convert/: qat_fp32/, qat_<scheme>/, base_fp32/, base_ptq_<scheme>/. Each holds
encoder_model.onnx + decoder_model_merged.onnx (KV cache, one file for both decoding phases), the
processor files and generation_config.json, and loads with ORTModelForSpeechSeq2Seq.from_pretrained.
Every encoder's self-attention runs as one fused MultiHeadAttention node per layer (fuse_attention.py).

int8: dynamic quantization of MatMul weights (per channel, int8; activations uint8 per tensor at
run time), never Conv (ConvInteger has no CPU kernel). int4: MatMulNBits (block 32, symmetric,
accuracy_level 0: float activations, bit-true to QAT; proj_out at quant.vocab_bits, 8 by default)
plus the tied token embedding as GatherBlockQuantized reading proj_out's blocks, saved with external data.
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
from onnx.external_data_helper import _get_all_tensors, uses_external_data  # initializers + attributes, subgraphs too

from contract.catalogue import ptq_variant, quantized_variant

from .common import StepContext, StepError
from .fuse_attention import fuse_encoder_file
from .model_size import weights_mb

ENCODER = "encoder_model.onnx"
DECODER = "decoder_model.onnx"
DECODER_WITH_PAST = "decoder_with_past_model.onnx"
MERGED = "decoder_model_merged.onnx"
TASK = "automatic-speech-recognition-with-past"
# MatMulNBits accuracy_level 0: activations stay float, so the ONNX int4 model computes what QAT's
# weight-only fake quantization trained (level 4 quantizes activations to int8 per block at run time,
# which QAT never saw; measured in benchmarks/INT4_RECIPE.md). The CUDA kernel ignores it.
INT4_ACCURACY_LEVEL = 0
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


def share_tied_embedding_int8(model: onnx.ModelProto) -> bool:
    """Let the token embedding read the int8 output projection instead of its own fp32 copy.

    Whisper ties proj_out to embed_tokens; after quantization the graph holds both the fp32
    table (V x D, the biggest tensor) and the int8 proj_out weight (D x V) with per-token scales.
    When the int8 weight dequantizes back to the table (within half a step), the Gather is
    rewired to Transpose(int8 weight) rows times their scales and the fp32 table is dropped.
    """
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    gathers = [n for n in graph.node if n.op_type == "Gather" and n.input[0] in inits
               and len(inits[n.input[0]].dims) == 2 and inits[n.input[0]].data_type == onnx.TensorProto.FLOAT]
    matmuls = [n for n in graph.node if n.op_type == "MatMulInteger" and n.input[1] in inits
               and inits[n.input[1]].data_type == onnx.TensorProto.INT8]
    for g in gathers:
        table = numpy_helper.to_array(inits[g.input[0]])
        vocab, d = table.shape
        for mm in matmuls:
            if list(inits[mm.input[1]].dims) != [d, vocab]:
                continue
            zp = numpy_helper.to_array(inits[mm.input[3]]) if len(mm.input) > 3 and mm.input[3] in inits else 0
            scale_name = _scale_init_name(graph, mm, inits, vocab)
            if scale_name is None or np.any(zp != 0):
                continue  # only symmetric weights with a known per-channel scale
            scale = numpy_helper.to_array(inits[scale_name]).astype(np.float32)
            wq = numpy_helper.to_array(inits[mm.input[1]])
            err = np.abs(wq.T.astype(np.float32) * scale[:, None] - table)
            if not np.all(err <= 0.5 * scale[:, None] * (1 + 1e-4) + 1e-7):
                continue  # not the same matrix: the embedding is not tied
            _rewire_gather(graph, g, mm.input[1], scale_name)
            return True
    return False


def _scale_init_name(graph, mm, inits, vocab) -> str | None:
    """The per-channel weight-scale initializer (length vocab) that multiplies mm's output."""
    consumers = {}
    for n in graph.node:
        for x in n.input:
            consumers.setdefault(x, []).append(n)
    producer = {o: n for n in graph.node for o in n.output}
    cast = next((n for n in consumers.get(mm.output[0], []) if n.op_type == "Cast"), None)
    mul = next((n for n in consumers.get(cast.output[0], []) if n.op_type == "Mul"), None) if cast else None
    if mul is None:
        return None
    for x in mul.input:
        p = producer.get(x)
        for y in (p.input if p is not None and p.op_type == "Mul" else [x]):
            if y in inits and list(inits[y].dims) == [vocab]:
                return y
    return None


def _rewire_gather(graph, gather, wq_name: str, scale_name: str) -> None:
    """table[ids] -> float(Transpose(wq)[ids]) * scale[ids][..., None]; drops the fp32 table."""
    ids = gather.input[1]
    p = gather.name or "tied_embedding"
    axes = p + "_axes"
    graph.initializer.append(numpy_helper.from_array(np.array([-1], dtype=np.int64), axes))
    nodes = [
        onnx.helper.make_node("Transpose", [wq_name], [p + "_table_int8"], perm=[1, 0], name=p + "_T"),
        onnx.helper.make_node("Gather", [p + "_table_int8", ids], [p + "_rows_int8"], axis=0, name=p + "_rows"),
        onnx.helper.make_node("Cast", [p + "_rows_int8"], [p + "_rows_f"], to=onnx.TensorProto.FLOAT, name=p + "_cast"),
        onnx.helper.make_node("Gather", [scale_name, ids], [p + "_row_scale"], axis=0, name=p + "_scales"),
        onnx.helper.make_node("Unsqueeze", [p + "_row_scale", axes], [p + "_row_scale_u"], name=p + "_unsq"),
        onnx.helper.make_node("Mul", [p + "_rows_f", p + "_row_scale_u"], [gather.output[0]], name=p + "_dequant"),
    ]
    _replace_gather(graph, gather, nodes)


def _replace_gather(graph, gather, nodes: list) -> None:
    """Put `nodes` where the tied embedding's Gather was; drop its fp32 table once nothing reads it."""
    table_name = gather.input[0]
    index = list(graph.node).index(gather)
    graph.node.remove(gather)
    for k, n in enumerate(nodes):
        graph.node.insert(index + k, n)
    if not any(table_name in n.input for n in graph.node):
        graph.initializer.remove(next(i for i in graph.initializer if i.name == table_name))


def _nbits_values(packed: np.ndarray, bits: int, vocab: int, d: int) -> np.ndarray:
    """MatMulNBits' packed uint8 blocks -> signed integer values [vocab, d] (zero point 2^(bits-1))."""
    packed = packed.reshape(vocab, -1)
    if bits == 4:  # two values per byte, low nibble first
        packed = np.stack([packed & 0xF, packed >> 4], axis=-1).reshape(vocab, -1)
    return packed[:, :d].astype(np.int16) - 2 ** (bits - 1)


def share_tied_embedding_nbits(model: onnx.ModelProto) -> bool:
    """Let the token embedding read the weight-only output projection's blocks (GatherBlockQuantized).

    MatMulNBits stores proj_out (the MatMul producing the logits) as uint8 [vocab, K/block, block*bits/8]
    (symmetric, zero point 2^(bits-1), low nibble first at 4 bits) with scales [vocab, K/block]: exactly
    GatherBlockQuantized's packed uint8 layout with the same bits and block size. When those blocks
    dequantize back to the fp32 token table within one step (the weights are tied: rounding moves a
    weight by half a step, the clamp of +2^(bits-1) to 2^(bits-1) - 1 by one), the Gather reads them
    and the fp32 table is dropped.
    """
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    attrs = lambda n: {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}  # noqa: E731
    mm = next((n for n in graph.node if n.op_type == "MatMulNBits" and "logits" in n.output), None)
    if mm is None or mm.input[1] not in inits or mm.input[2] not in inits or (len(mm.input) > 3 and mm.input[3]):
        return False
    ma = attrs(mm)
    vocab, d, bits, block = ma["N"], ma["K"], ma.get("bits", 4), ma["block_size"]
    if d % block:
        return False  # padded blocks: GatherBlockQuantized would return rows longer than the table's
    packed = numpy_helper.to_array(inits[mm.input[1]])
    scale = np.repeat(numpy_helper.to_array(inits[mm.input[2]]).reshape(vocab, -1), block, axis=1)[:, :d]
    dequantized = _nbits_values(packed, bits, vocab, d) * scale
    for g in graph.node:
        if g.op_type != "Gather" or g.input[0] not in inits or list(inits[g.input[0]].dims) != [vocab, d]:
            continue
        table = numpy_helper.to_array(inits[g.input[0]])
        if not np.all(np.abs(dequantized - table) <= np.abs(scale) * (1 + 1e-4) + 1e-7):
            continue  # not the same matrix: the embedding is not tied
        p = g.name or "tied_embedding"
        shape = numpy_helper.from_array(np.array([vocab, packed.size // vocab], dtype=np.int64), p + "_shape")
        graph.initializer.append(shape)
        _replace_gather(graph, g, [
            onnx.helper.make_node("Reshape", [mm.input[1], shape.name], [p + "_packed"], name=p + "_reshape"),
            onnx.helper.make_node("GatherBlockQuantized", [p + "_packed", g.input[1], mm.input[2]], list(g.output),
                                  name=p + "_q", domain="com.microsoft", gather_axis=0, quantize_axis=1,
                                  block_size=block, bits=bits)])
        return True
    return False


def export(model_dir: Path, out_dir: Path) -> None:
    """Export a transformers Whisper to ONNX with KV cache (encoder, decoder, with-past, merged)."""
    from optimum.exporters.onnx import main_export

    if out_dir.exists():
        shutil.rmtree(out_dir)
    main_export(str(model_dir), output=str(out_dir), task=TASK, device="cpu", do_validation=False)
    missing = [f for f in (ENCODER, DECODER, DECODER_WITH_PAST, MERGED) if not (out_dir / f).is_file()]
    if missing:
        raise StepError(f"ONNX export of {model_dir} did not write {missing}; check optimum-onnx and transformers < 4.58")


def _has_external_data(path: Path) -> bool:
    model = onnx.load(str(path), load_external_data=False)
    return any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer)


def _load_folded(path: Path) -> onnx.ModelProto:
    model = onnx.load(str(path))
    fold_transposed_weights(model)
    return model


def quantize_int8(src: Path, dst: Path) -> bool:
    """Dynamic int8: MatMul weights per channel QInt8, activations uint8 per tensor at run time.

    Returns whether the tied token embedding now reads the int8 output projection.
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic

    # a graph with external data (large encoders) may exceed protobuf's 2 GB: let ORT load it by path
    big = _has_external_data(src)
    quantize_dynamic(str(src) if big else _load_folded(src), str(dst), op_types_to_quantize=["MatMul"],
                     per_channel=True, reduce_range=False, weight_type=QuantType.QInt8,
                     use_external_data_format=big, extra_options={"MatMulConstBOnly": True})
    if big:
        return False
    model = onnx.load(str(dst))
    shared = share_tied_embedding_int8(model)
    if shared:
        onnx.save(model, str(dst))
    return shared


def quantize_int4(src: Path, dst: Path, block_size: int, vocab_bits: int = 8,
                  accuracy_level: int = INT4_ACCURACY_LEVEL) -> bool:
    """Weight-only MatMulNBits: 4-bit blocks, proj_out (the vocabulary) at vocab_bits; the tied token
    embedding then reads proj_out's blocks. Returns whether it does."""
    from onnxruntime.quantization.matmul_nbits_quantizer import (DefaultWeightOnlyQuantConfig,
                                                                 MatMulNBitsQuantizer)
    from onnxruntime.quantization.onnx_model import ONNXModel
    from onnxruntime.quantization.quant_utils import QuantFormat

    def nbits(model: onnx.ModelProto, bits: int, **nodes) -> onnx.ModelProto:
        config = DefaultWeightOnlyQuantConfig(block_size=block_size, is_symmetric=True, accuracy_level=accuracy_level,
                                              quant_format=QuantFormat.QOperator, op_types_to_quantize=("MatMul",),
                                              quant_axes=(("MatMul", 0),), bits=bits)
        quantizer = MatMulNBitsQuantizer(model, algo_config=config, **nodes)
        quantizer.process()
        return quantizer.model.model

    logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").setLevel(logging.WARNING)
    model = _load_folded(src)
    vocab = [n.name for n in model.graph.node if n.op_type == "MatMul" and "logits" in n.output]
    if vocab and not vocab[0]:
        raise StepError(f"{src}: the MatMul producing the logits has no name; the int4 export cannot select it")
    model = nbits(model, 4, nodes_to_exclude=vocab)
    if vocab:
        model = nbits(model, vocab_bits, nodes_to_include=vocab)
    shared = share_tied_embedding_nbits(model)
    ONNXModel(model).save_model_to_file(str(dst), use_external_data_format=True)
    return shared


def _copy_side_files(src: Path, dst: Path) -> None:
    """Config, generation config and processor files (everything that is not an ONNX graph)."""
    for f in src.iterdir():
        if f.is_file() and f.suffix != ".onnx" and not f.name.endswith("onnx_data"):
            shutil.copy2(f, dst / f.name)


def quantize_dir(fp32_dir: Path, dst: Path, scheme: str, group_size: int, vocab_bits: int = 8,
                 int4_accuracy_level: int = INT4_ACCURACY_LEVEL) -> dict:
    """Quantize an exported fp32 dir (encoder + both decoders) into dst with a merged decoder."""
    from optimum.onnx.graph_transformations import merge_decoders

    if dst.exists():
        shutil.rmtree(dst)
    dst.mkdir(parents=True)
    tmp = dst / ".parts"
    tmp.mkdir()

    def q(src: Path, out: Path) -> bool:
        if scheme == "int8":
            return quantize_int8(src, out)
        if scheme == "int4":
            return quantize_int4(src, out, group_size, vocab_bits, int4_accuracy_level)
        raise StepError(f"quant.scheme {scheme!r} is not supported: use int8 or int4")

    q(fp32_dir / ENCODER, dst / ENCODER)
    tied = [q(fp32_dir / DECODER, tmp / DECODER), q(fp32_dir / DECODER_WITH_PAST, tmp / DECODER_WITH_PAST)]
    merge_decoders(onnx.load(str(tmp / DECODER)), onnx.load(str(tmp / DECODER_WITH_PAST)),
                   save_path=str(tmp / MERGED), strict=False)
    # read back what merge_decoders saved: when it wrote external data (FORCE_ONNX_EXTERNAL_DATA) the
    # proto it returns points at a file in tmp and holds no weights
    merged = onnx.load(str(tmp / MERGED))
    onnx.save(merged, str(dst / MERGED), save_as_external_data=(scheme == "int4"),
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


def convert_model(model_dir: Path, out_root: Path, fp32_name: str, q_name: str, scheme: str,
                  group_size: int, vocab_bits: int = 8, log=print) -> dict:
    """Export model_dir to out_root/fp32_name and quantize it into out_root/q_name; returns metrics."""
    fp32_dir, q_dir = out_root / fp32_name, out_root / q_name
    t0 = time.time()
    export(Path(model_dir), fp32_dir)
    t1 = time.time()
    log(f"exported {model_dir} -> {fp32_dir} in {t1 - t0:.1f}s")
    info = quantize_dir(fp32_dir, q_dir, scheme, group_size, vocab_bits)
    t2 = time.time()
    log(f"quantized ({scheme}) -> {q_dir} in {t2 - t1:.1f}s")
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
    jobs = [(qat_model, "qat_fp32", quantized_variant(scheme)),
            (Path(resolve_model(cfg.model.name_or_path)), "base_fp32", ptq_variant(scheme))]
    metrics: dict = {"scheme": scheme, "seconds": {}, "ops": {}, "sizes_mb": {}}
    for i, (src, fp32_name, q_name) in enumerate(jobs):
        ctx.progress(i, len(jobs), model=fp32_name)
        m = convert_model(src, ctx.out, fp32_name, q_name, scheme, group, cfg.quant.vocab_bits, log=ctx.log)
        check_quantized(ctx.out / q_name, scheme)
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
