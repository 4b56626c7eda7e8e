"""The ONNX files of an upload, checked by content (tasks/upload.py calls it): each graph parses as an
ONNX model (its external data not loaded), each external data location it names is a plain file name
of the same folder, present, with an external data name (`<graph>.onnx_data` or `<graph>.onnx.data`),
and every tensor's bytes lie inside that file; a data file that no graph references is not uploaded.
The folder came from a rented machine: nothing here follows a path out of it."""
from __future__ import annotations

from pathlib import Path
from typing import Iterator

GRAPH_SUFFIX = ".onnx"
DATA_SUFFIXES = (".onnx_data", ".onnx.data")


def is_data_name(name: str) -> bool:
    return name.endswith(DATA_SUFFIXES)


def _tensors(graph) -> Iterator:
    """Every tensor a graph holds: initializers, sparse ones, node attributes, subgraphs (If/Loop)."""
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield from (sparse.values, sparse.indices)
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            if attr.HasField("g"):
                yield from _tensors(attr.g)
            for g in attr.graphs:
                yield from _tensors(g)


def onnx_problems(model_dir: Path, names: list[str]) -> dict[str, str]:
    """{file name: why it must not be uploaded} for the .onnx graphs and external data files among
    `names` (regular files of model_dir, already name-checked); other names are not looked at."""
    import onnx
    from onnx import TensorProto

    model_dir = Path(model_dir)
    present = set(names)
    problems: dict[str, str] = {}
    referenced: set[str] = set()
    for name in sorted(n for n in names if n.endswith(GRAPH_SUFFIX)):
        try:
            model = onnx.load(str(model_dir / name), load_external_data=False)
        except Exception as e:  # noqa: BLE001 - protobuf's DecodeError and friends: not a model
            problems[name] = f"not an ONNX model ({type(e).__name__})"
            continue
        if model.ir_version <= 0 or not model.graph.node:
            problems[name] = "not an ONNX model (no IR version or no nodes)"
            continue
        for tensor in _tensors(model.graph):
            if tensor.data_location != TensorProto.EXTERNAL:
                continue
            info = {e.key: e.value for e in tensor.external_data}
            where = info.get("location", "")
            if where not in present or not is_data_name(where):
                problems[name] = (f"external data of tensor {tensor.name[:80]!r} at {where[:120]!r}: not an external "
                                  f"data file of this folder ({'/'.join(DATA_SUFFIXES)}, no path)")
                break
            try:
                offset, length = int(info.get("offset", 0)), int(info["length"]) if "length" in info else None
            except ValueError:
                offset, length = -1, None
            size = (model_dir / where).stat().st_size
            if offset < 0 or (length is not None and (length < 0 or offset + length > size)):
                problems[name] = f"external data of tensor {tensor.name[:80]!r} lies outside {where!r} ({size} bytes)"
                break
            referenced.add(where)
    for name in sorted(n for n in names if is_data_name(n) and n not in referenced):
        problems[name] = "external data that no ONNX graph of the folder references"
    return problems
