"""The run configuration: one typed schema for the YAML files in configs/.

Both sides use it: the flow validates a config before anything is rented, and every on-machine
step reads the same file. A wrong value is refused with a message that names the field and the
allowed values. The machine section lives in contract/machine_config.py (the only part infra/ reads).
"""
from __future__ import annotations

import hashlib
import json
import math
import warnings
from pathlib import Path
from typing import Annotated, Any, Literal, Optional

import yaml
from pydantic import AfterValidator, Field, ValidationError, field_validator, model_validator

from .catalogue import Scheme
from .fingerprint import FIXTURE_PREFIX, check_revision, hub_model_id
from .layout import CONFIG_DIR, PUSHED_CODE, REPO_ROOT
from .finite_numbers import float_fields, raw_non_finite
from .hub_config import HUB_NAME, HubConfig
from .machine_config import MachineConfig, Strict
from .quant_spec import QuantSpec
from .whisper_languages import CODES as WHISPER_LANGUAGE_CODES, NAMES as WHISPER_LANGUAGE_NAMES

Revision = Annotated[Optional[str], AfterValidator(check_revision)]  # a Hub commit, branch or tag


class ModelConfig(Strict):
    # A Hub id ("bofenghuang/whisper-large-v3-distil-fr-v0.2"), a local directory, or an
    # offline fixture: "fixture:whisper-base" (real multilingual base, converted from the
    # CTranslate2 files on PyPI) or "fixture:tiny-random" (for unit tests).
    name_or_path: str = Field(min_length=1)
    revision: Revision = Field(default=None, description=(
        "Hub id only: the commit (40 hex) or branch/tag to start from; unset: main. Resolved to its commit "
        "at home before renting, and that commit is what the machine downloads"))
    language: str = "fr"
    task: Literal["transcribe", "translate"] = "transcribe"

    @model_validator(mode="after")
    def _revision_of_a_hub_id(self) -> "ModelConfig":
        if self.revision is not None and not hub_model_id(self.name_or_path):
            raise ValueError(f"model.revision applies to a Hub id only; {self.name_or_path!r} is a fixture or a "
                             "local folder (its content is what the step hash records): remove model.revision")
        return self

    @field_validator("name_or_path")
    @classmethod
    def _name_or_path(cls, v: str) -> str:
        """A relative name is read as a Hub id on the machine (local folders are not pushed): one that is
        also a folder here, or that no Hub id looks like, is refused rather than loaded from the Hub."""
        if v.startswith(FIXTURE_PREFIX) or Path(v).is_absolute():
            return v  # an absolute folder: RunConfig checks that the machine can see it
        if Path(v).is_dir() or (REPO_ROOT / v).is_dir():
            raise ValueError(f"{v!r} is a folder here, but a relative name is read on the machine as the Hub repo "
                             "of that name (local folders are not pushed): give the folder's absolute path "
                             "(machine.backend local or ssh: a folder on that machine) or a Hub id that is not "
                             "also a folder here")
        if v.count("/") > 1 or not all(HUB_NAME.fullmatch(part) for part in v.split("/")):
            raise ValueError("is neither a Hub id ('owner/name'), an absolute folder nor 'fixture:<name>'")
        return v

    @field_validator("language")
    @classmethod
    def _language(cls, v: str) -> str:
        if v not in WHISPER_LANGUAGE_CODES and v not in WHISPER_LANGUAGE_NAMES:
            raise ValueError("is not a language Whisper knows: give its code (fr, en, de, ...) or its name in "
                             "lower case (french, english, ...), as listed in contract/whisper_languages.py")
        return v


class DataConfig(Strict):
    source: Literal["hf", "manifest"]
    # Hugging Face datasets source (MLS French by default; Common Voice style via the same fields).
    dataset: Optional[str] = None
    config: Optional[str] = None
    revision: Revision = Field(default=None, description=(
        "source hf only: the dataset's commit (40 hex) or branch/tag; unset: main. Resolved to its commit at "
        "home before renting, and that commit is what the machine streams"))
    train_split: str = "train"
    dev_split: str = "dev"
    test_split: str = "test"
    text_column: str = "transcript"
    audio_column: str = "audio"
    streaming: bool = True
    # Local source: JSONL lines {"audio": path, "text": str, "speaker": str, "split": train|dev|test}.
    # A relative path is resolved against the repository root.
    manifest: Optional[str] = None
    max_samples: int = Field(default=60000, gt=0, le=10_000_000, description="training examples taken from train")
    max_eval_samples: int = Field(default=500, gt=0, le=1_000_000, description="examples taken from dev and from test")
    min_seconds: float = Field(default=1.0, ge=0)
    max_seconds: float = Field(default=30.0, gt=0, le=30)
    sampling_rate: Literal[16000] = 16000

    @model_validator(mode="after")
    def _source_fields(self) -> "DataConfig":
        if self.source == "manifest" and self.revision is not None:
            raise ValueError("data.revision applies to data.source 'hf' only; a manifest's revision is the content "
                             "of it and its audio files (the step hash records it): remove data.revision")
        if self.source == "hf" and not self.dataset:
            raise ValueError("data.dataset is required when data.source is 'hf' (e.g. facebook/multilingual_librispeech)")
        if self.source == "manifest":
            if not self.manifest:
                raise ValueError("data.manifest is required when data.source is 'manifest'")
            if not self.manifest_path().is_file():
                raise ValueError(f"data.manifest: file {self.manifest_path()} does not exist")
            problem = _manifest_problem(self.manifest or "", self.manifest_path())
            if problem:
                raise ValueError(f"data.manifest {self.manifest!r}: {problem}")
        if self.test_split == self.train_split:
            raise ValueError(f"data.test_split {self.test_split!r} is the train split: the model would be scored "
                             "on what it trained on; name a held-out split (e.g. 'test')")
        if self.min_seconds >= self.max_seconds:
            raise ValueError("data.min_seconds must be below data.max_seconds")
        if not self.text_column.strip():
            raise ValueError("data.text_column must name a column (MLS French uses 'transcript')")
        return self

    def manifest_path(self) -> Path:
        p = Path(self.manifest or "")
        return p if p.is_absolute() else REPO_ROOT / p


def _manifest_problem(given: str, path: Path) -> Optional[str]:
    """Why `path` cannot be the data manifest: a relative one leaving the repository, or a first line
    that is not a JSON object with "audio" and "text" (a JSONL manifest)."""
    if not Path(given).is_absolute() and not path.resolve().is_relative_to(REPO_ROOT):
        return "a relative path must stay inside the repository"
    try:
        with open(path, "rb") as f:
            first = next((line for line in f.read(1 << 20).splitlines() if line.strip()), b"")
        row = json.loads(first.decode("utf-8"))
    except (OSError, ValueError, RecursionError):
        row = None
    if not isinstance(row, dict) or not {"audio", "text"} <= row.keys():
        return ('not a manifest: its first line must be a JSON object with "audio" and "text" (JSONL, one '
                'utterance per line; fixtures/french/manifest.jsonl is one)')
    return None


class QuantConfig(Strict):
    # int8: 8-bit per-channel weights + 8-bit dynamic activations; int4: 4-bit weights, groups of 32.
    scheme: Scheme
    group_size: int = Field(default=32, gt=0)
    vocab_bits: Literal[4, 8] = Field(default=8, description=(
        "int4 only: bits of the vocabulary matrix (proj_out and the tied token embedding). 8 stores it as "
        "the int8 scheme does (per-channel weights, activations per token) and holds the WER; 4 (4-bit blocks "
        "like the other weights) is the smaller file and costs WER (benchmarks/INT4_RECIPE.md)"))
    encoder_layout: Literal["int4_int8_kernel", "nbits"] = Field(default="int4_int8_kernel", description=(
        "int4 only: how the encoder's 4-bit weights run. int4_int8_kernel (CPU serving): 4-bit codes ONNX "
        "Runtime folds into int8 weights at load, int8's kernel and uint8 activations, as fast as int8 on the "
        "CPU. nbits (GPU serving): MatMulNBits with float activations, which has a CUDA kernel but is slower "
        "than int8 on the CPU. QAT trains whichever is set"))

    @model_validator(mode="after")
    def _a_valid_spec(self):
        QuantSpec.of(self.scheme, self.group_size, self.vocab_bits, self.encoder_layout)  # quant_spec.py owns the rules
        return self


class TrainConfig(Strict):
    epochs: float = Field(default=5, gt=0, le=1000)
    max_steps: Optional[int] = Field(default=None, gt=0, le=10_000_000, description="overrides epochs when set")
    learning_rate: float = Field(default=5e-6, gt=0, lt=1)
    per_device_batch_size: int = Field(default=8, gt=0)
    grad_accum: int = Field(default=4, gt=0, description="micro-batches per optimizer step, over all training "
                            "processes together: the global batch is per_device_batch_size x grad_accum whatever the "
                            "number N of GPUs (or train.nproc), each process accumulating grad_accum / N of them, so "
                            "learning_rate is per that global batch and never rescaled; N must divide grad_accum")
    warmup_steps: int = Field(default=50, ge=0)
    weight_decay: float = Field(default=0.01, ge=0)
    max_grad_norm: float = Field(default=1.0, gt=0)
    eval_every: int = Field(default=500, gt=0)
    save_every: int = Field(default=500, gt=0)
    gradient_checkpointing: bool = True
    freeze_encoder: bool = False
    encoder_cache_mb: float = Field(default=2048, ge=0, description="memory a frozen encoder's cached outputs "
                                    "may take (computed once per clip instead of every step); 0: no cache")
    seed: int = 42
    # "auto": bf16 on CUDA, fp32 on CPU.
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    num_workers: int = Field(default=2, ge=0)
    nproc: int = Field(default=1, ge=1, le=64, description="training processes when machine.gpu is none (CPU, gloo; "
                       "with a GPU: one per GPU); like the GPU count it changes how, not what, is trained: not hashed")
    compile: Optional[bool] = Field(default=None, description="torch.compile each encoder/decoder block; "
                                    "unset: on with CUDA, off on CPU (compiling costs more than it saves there)")
    optimizer: Literal["adamw", "adamw8bit"] = Field(
        default="adamw", description="adamw8bit: torchao's AdamW8bit, moments in 8 bits (smaller checkpoints, "
        "contract/disk.py CHECKPOINT_RATIO; needs torchao on the machine)")

    @property
    def length(self) -> str:
        """How long training runs, in words: "27 optimizer steps" or "5 epochs"."""
        return f"{self.max_steps} optimizer steps" if self.max_steps else f"{self.epochs:g} epochs"


WHISPER_MAX_TOKENS = 448  # Whisper's decoder positions (max_target_positions): generation stops there


class BenchConfig(Strict):
    max_new_tokens: int = Field(default=128, gt=0, le=WHISPER_MAX_TOKENS)
    forced_tokens: int = Field(default=32, gt=0, le=WHISPER_MAX_TOKENS,
                               description="decoder length forced when timing per token")
    threads: int = Field(default=2, gt=0, le=256)
    max_clips: int = Field(default=40, gt=0)
    warmup: int = Field(default=2, ge=0)
    faster_whisper: bool = True


class EvalConfig(Strict):
    max_wer_degradation: float = Field(default=0.5, ge=0, description=(
        "points of WER the QAT model may lose to each of gate_references: the upper bound of the paired "
        "interval of the difference must be within it"))
    gate_references: list[Literal["qat_fp32", "base_fp32"]] = Field(
        default=["qat_fp32", "base_fp32"], min_length=1,
        description="what the quantized QAT model is compared with: its own fp32 weights, the baseline model")
    confidence: float = Field(default=0.95, ge=0.5, lt=1, description="of the paired bootstrap intervals")
    bootstrap_samples: int = Field(default=2000, gt=0, le=1_000_000)
    max_new_tokens: int = Field(default=128, gt=0, le=WHISPER_MAX_TOKENS)
    # Where the quantized ONNX variants are scored: "fake_quant" = their PyTorch twin (the fake-quantized
    # model the export is bit-true to) on the machine's device, the export itself confirmed token for token
    # on onnx_check_clips clips; "onnx" = the exports on ONNX Runtime's CPU EP; "auto" = fake_quant on CUDA.
    quantized_on: Literal["auto", "onnx", "fake_quant"] = "auto"
    onnx_check_clips: int = Field(default=8, gt=0, le=500)


# Fields that change how a section's work is done, not its outputs: left out of the config hash.
UNHASHED = {"train": {"nproc"}}


class RunConfig(Strict):
    name: str = Field(pattern=r"^[a-z0-9][a-z0-9-]{0,40}$")
    model: ModelConfig
    data: DataConfig
    quant: QuantConfig
    train: TrainConfig = Field(default_factory=TrainConfig)
    bench: BenchConfig = Field(default_factory=BenchConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    machine: MachineConfig = Field(default_factory=MachineConfig)
    hub: HubConfig = Field(default_factory=HubConfig)

    @model_validator(mode="before")
    @classmethod
    def _no_derived_fields(cls, raw: Any) -> Any:
        """machine.vast.workload is derived (contract/workload.py), never read from a file: a value
        there is ignored, with a warning that says so."""
        vast = ((raw.get("machine") if isinstance(raw, dict) else None) or {})
        vast = vast.get("vast") if isinstance(vast, dict) else None
        if isinstance(vast, dict) and "workload" in vast:
            warnings.warn("machine.vast.workload is ignored: it is derived from the model, data, train, quant, "
                          "bench and machine sections; delete it from the config", stacklevel=2)
            machine = {**raw["machine"], "vast": {k: v for k, v in vast.items() if k != "workload"}}
            return {**raw, "machine": machine}
        return raw

    @model_validator(mode="after")
    def _reaches_the_machine(self) -> "RunConfig":
        """Local files a rented or remote machine cannot see: only the repository's pushed folders travel."""
        backend = self.machine.backend
        if backend == "vast" and Path(self.model.name_or_path).is_absolute():
            raise ValueError(f"model.name_or_path {self.model.name_or_path!r} is a folder of this computer, and "
                             "local folders are not pushed to a rented machine: upload it to the Hub and name its id, "
                             "or use machine.backend local")
        if backend != "local" and self.data.source == "manifest":
            path = self.data.manifest_path().resolve()
            if not any(path.is_relative_to(REPO_ROOT / d) for d in PUSHED_CODE):
                raise ValueError(f"data.manifest {self.data.manifest!r} is outside the folders pushed to the machine "
                                 f"({', '.join(PUSHED_CODE)}): commit it and its audio under fixtures/, or use "
                                 "machine.backend local")
        return self

    @model_validator(mode="after")
    def _processes_divide_the_batch(self) -> "RunConfig":
        """Each of the N training processes accumulates train.grad_accum / N micro-batches (steps/distributed.py)."""
        accum = self.train.grad_accum
        if self.machine.gpu == "none" and accum % self.train.nproc:
            raise ValueError(f"train.grad_accum {accum} is not a multiple of train.nproc {self.train.nproc}: each "
                             f"process accumulates grad_accum / nproc micro-batches of the global batch; set grad_accum "
                             f"to a multiple of {self.train.nproc} or change nproc")
        gpus, most = self.machine.vast.gpu_range()  # a range: each machine trains on the GPUs that divide grad_accum
        if self.machine.gpu == "required" and self.machine.backend == "vast" and gpus == most and accum % gpus:
            raise ValueError(f"train.grad_accum {accum} is not a multiple of machine.vast.num_gpus {gpus}: each GPU "
                             f"accumulates grad_accum / num_gpus micro-batches of the global batch; set grad_accum to a "
                             f"multiple of {gpus} (per_device_batch_size x grad_accum is the global batch)")
        return self

    @model_validator(mode="after")
    def _finite(self) -> "RunConfig":
        """No float field may be inf or nan (a budget of inf is no budget); see also `parse_config`."""
        bad = [f"{path} must be a finite number (got {value!r})" for path, value in float_fields(self) if not math.isfinite(value)]
        if bad:
            raise ValueError("; ".join(bad))
        return self

    def section_hash(self, *sections: str) -> str:
        """A short stable hash of the named sections (what a step's outputs depend on)."""
        payload = {s: getattr(self, s).model_dump(mode="json", exclude=UNHASHED.get(s)) for s in sections}
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


class ConfigError(ValueError):
    """A configuration that cannot run; the message names the fields and allowed values."""


def _format(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        field = ".".join(str(p) for p in e["loc"]) or "(config)"
        msg = e["msg"].removeprefix("Value error, ")
        lines.append(f"  {field}: {msg} (got {e.get('input')!r})" if e["type"] != "missing" else f"  {field}: required field is missing")
    return "invalid configuration:\n" + "\n".join(lines)


def _merge(base: dict, overrides: dict) -> dict:
    out = dict(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def dotted_to_nested(overrides: dict[str, Any]) -> dict:
    """{"quant.scheme": "int4"} -> {"quant": {"scheme": "int4"}}."""
    nested: dict = {}
    for key, value in overrides.items():
        node = nested
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return nested


def resolve_config_path(name_or_path: str) -> Path:
    p = Path(name_or_path)
    candidates = [p, CONFIG_DIR / p, CONFIG_DIR / f"{name_or_path}.yaml"]
    for c in candidates:
        if c.is_file():
            return c
    known = sorted(x.stem for x in CONFIG_DIR.glob("*.yaml"))
    raise ConfigError(f"config {name_or_path!r} not found: give a path or one of {known}")


def load_config(name_or_path: str | Path, overrides: Optional[dict[str, Any]] = None) -> RunConfig:
    """Load a YAML config by name (configs/<name>.yaml) or path, apply dotted overrides, validate."""
    path = resolve_config_path(str(name_or_path))
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return parse_config(_merge(raw, dotted_to_nested(overrides or {})))


def parse_config(raw: dict) -> RunConfig:
    bad = raw_non_finite(RunConfig, raw)
    if bad:
        values = {path: _dig(raw, path) for path in bad}
        raise ConfigError("invalid configuration:\n" + "\n".join(
            f"  {path}: must be a finite number, not infinite or nan (got {repr(values[path])[:40]})" for path in bad))
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(_format(e)) from None


def _dig(raw: dict, dotted: str) -> Any:
    for key in dotted.split("."):
        raw = raw[key]
    return raw
