"""Each fact has one owner, and the map names every room: the step list and the schemes live in
contract/catalogue.py and everything else derives from them; a model's size on disk has one rule and
one owner in the report; docs/DESIGN.md and the README's layout name every module. Fast: no server."""
from __future__ import annotations

import ast
import re
from pathlib import Path
from typing import get_args

import pytest

from contract.catalogue import SCHEMES, STEPS
from contract.config import QuantConfig
from contract.machine_config import MachineConfig

REPO = Path(__file__).resolve().parent.parent
PRODUCT = ("flows", "tasks", "infra", "steps", "contract")
# Where the step names may be written out: their owner. Anything else listing three or more of them
# would silently miss a new step.
STEP_LIST_OWNERS = {"contract/catalogue.py"}
# Known to re-list them still, with the reason it is not derived yet (remove the entry once it is).
STEP_LIST_PENDING = {"infra/run_estimate.py": "one hand-written cost row per step"}


def modules(packages=PRODUCT) -> list[Path]:
    return sorted(p.relative_to(REPO) for pkg in packages for p in (REPO / pkg).rglob("*.py")
                  if not p.name.startswith("__") and "__pycache__" not in p.parts)


def names_module(text: str, module: Path) -> bool:
    """`text` names the module by its path under its package (`machines/ssh.py`), or by its file name
    with each folder between the package and it named as a folder (`machines/` ... `ssh.py`)."""
    rel = Path(*module.parts[1:]).as_posix()
    if re.search(rf"(?<![\w/])({re.escape(module.parts[0])}/)?{re.escape(rel)}(?![\w])", text):
        return True
    folders = module.parts[1:-1]
    return bool(folders) and re.search(rf"(?<![\w/]){re.escape(module.name)}(?![\w])", text) is not None \
        and all(re.search(rf"(?<![\w]){re.escape(f)}/", text) for f in folders)


@pytest.mark.parametrize("doc", ["docs/DESIGN.md", "README.md layout"])
def test_the_docs_name_every_module(doc):
    text = (REPO / doc.split()[0]).read_text()
    if doc.endswith("layout"):
        text = text.split("\n## Layout\n", 1)[1].split("```")[1]
    missing = [str(m) for m in modules() if not names_module(text, m)]
    assert missing == [], f"{doc} does not name: {missing}"


def test_only_the_catalogue_lists_the_steps():
    listed = {}
    for path in modules((*PRODUCT, "benchmarks", "devtools")):
        for node in ast.walk(ast.parse((REPO / path).read_text())):
            elts = node.keys if isinstance(node, ast.Dict) else getattr(node, "elts", None) \
                if isinstance(node, (ast.Tuple, ast.List, ast.Set)) else None
            names = {e.value for e in elts or () if isinstance(e, ast.Constant) and e.value in STEPS}
            if len(names) >= 3:
                listed.setdefault(path.as_posix(), node.lineno)
    assert set(listed) - STEP_LIST_OWNERS - set(STEP_LIST_PENDING) == set(), listed


def test_every_steps_metrics_reach_the_report():
    from tasks.scorecard import step_metrics

    results = {step: {"metrics": {"figure": i}} for i, step in enumerate(STEPS)}
    assert step_metrics(results) == {step: {"figure": i} for i, step in enumerate(STEPS)}


def test_the_flow_takes_exactly_the_schemes_and_backends_the_config_takes():
    from prefect.utilities.callables import parameter_schema

    from flows.qat import qat

    props = parameter_schema(qat.fn).model_dump()["properties"]

    def choices(prop: dict) -> set:
        return {v for alt in prop["anyOf"] for v in alt.get("enum", ())}
    assert choices(props["quantization"]) == set(get_args(QuantConfig.model_fields["scheme"].annotation)) == set(SCHEMES)
    assert choices(props["backend"]) == set(get_args(MachineConfig.model_fields["backend"].annotation))


def test_size_on_disk_has_one_rule_and_convert_owns_it(tmp_path):
    from steps import bench, convert
    from tasks.scorecard import results_table

    onnx_dir = tmp_path / "qat_int8"
    onnx_dir.mkdir()
    for name, size in (("encoder_model.onnx", 1000), ("decoder_model.onnx_data", 3000), ("w.onnx.data", 500),
                       ("config.json", 7000), ("tokenizer.json", 9000)):  # kB: weight files and others
        (onnx_dir / name).write_bytes(b"\0" * size * 1000)
    assert convert.onnx_size_mb(onnx_dir) == bench.size_mb(bench.Variant("qat_int8", "onnx", str(onnx_dir))) == 4.5
    # the report: convert's record of the files it wrote, bench's figure only for what convert did not write
    metrics = {"convert": {"sizes_mb": {"qat_int8": 110.2, "pytorch_fp32": 290.4}},
               "bench": {"devices": {"cpu": {"size_mb": {"qat_int8": 95.0, "faster_whisper_int8": 80.0}}}}}
    rows = {r["variant"]: r["size_mb"] for r in results_table("int8", metrics)}
    assert rows["qat_int8"] == 110.2 and rows["qat_fp32"] == 290.4 and rows["faster_whisper_int8"] == 80.0


def test_one_redaction_rule():
    """contract/redaction.py masks; every other `redact` in the product only says which secrets it holds."""
    from contract.redaction import redact

    assert redact("key abcd1234 in GET /x?api_key=other&q=1 with Bearer tok.en then abc", ["abcd1234", "abc", None]) == \
        "key *** in GET /x?api_key=***&q=1 with Bearer *** then abc"  # a 3-character value is no secret
    own_rules = []
    for path in modules():
        source = (REPO / path).read_text()
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.FunctionDef) and "redact" in node.name and path.as_posix() != "contract/redaction.py":
                body = ast.get_source_segment(source, node)
                if ".replace(" in body or "re.sub(" in body or "redact(" not in body.split(":", 1)[1]:
                    own_rules.append(f"{path}:{node.lineno} {node.name}")
    assert own_rules == [], own_rules


def test_no_issue_numbers_in_the_product():
    """Comments and help texts say why, not which ticket: issue numbers go stale (git log keeps them)."""
    found = [f"{path}:{i}" for path in modules() for i, line in enumerate((REPO / path).read_text().splitlines(), 1)
             if re.search(r"(?i)\b(issue|finding) \d+", line)]
    assert found == [], found


def test_the_configs_backend_names_are_the_registrys():
    """A cloud's name is written twice on purpose: its registry line routes the verbs, and the config's
    vocabulary (contract's `Backend`, the flow parameter's choices) refuses a typo before any cost. They
    must not drift: a registered backend no config could name, or a name nothing routes."""
    from contract.machine_config import Backend
    from infra.backends.registry import BACKENDS

    assert set(get_args(Backend)) == set(BACKENDS)
