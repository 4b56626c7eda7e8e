"""The machine section of the run configuration: where the work runs and what it may cost.

This is the only part of the configuration that infra/ reads: a backend gets a MachineConfig,
never the whole run config.
"""
from __future__ import annotations

from typing import Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .catalogue import Scheme
from .remote_env import PINNED_TORCH, PINNED_TORCH_CUDA

# The reap deployment's age limit (prefect.yaml, max_age_hours): a labelled machine older than this
# whose run is not known to be live is destroyed (infra/reaper.py).
REAPER_MAX_AGE_HOURS = 24.0
# How many times one step may run on one machine (tasks/remote_step.py: retries = STEP_ATTEMPTS - 1).
STEP_ATTEMPTS = 4


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# Parameters of the models whose size is known before anything is downloaded: bytes of the weights,
# checkpoints and exports follow from them (infra/run_estimate.py). Source: benchmarks/checkpoint.json
# (`python -m benchmarks.checkpoint_size`, the model built at the real shapes).
MODEL_PARAMS = {"bofenghuang/whisper-large-v3-distil-fr-v0.2": 756_405_760}


class TrainWorkload(Strict):
    """What the run will do, so offers are ranked by what the whole run would cost on them
    (infra/gpu_speed.py, infra/run_estimate.py). Derived from the model, data, train, quant, bench and
    machine sections (contract/workload.py), never written into the config."""

    scheme: Literal[Scheme, "plain"] = "int8"
    micro_batch: int = Field(default=8, gt=0)
    compile: bool = True
    gradient_checkpointing: bool = True
    samples: Optional[int] = Field(default=None, gt=0, description="training samples of the run; None: unknown")
    # What the pre-rent estimate prices besides training (infra/run_estimate.py): bytes and the other steps.
    params: Optional[int] = Field(default=None, gt=0, description="model parameters (known models only; None: unknown)")
    optimizer: Literal["adamw", "adamw8bit"] = "adamw"
    samples_per_step: int = Field(default=32, gt=0, description="micro-batch x gradient accumulation")
    save_every: int = Field(default=500, gt=0, description="train.save_every (optimizer steps)")
    download_rows: int = Field(default=0, ge=0, description="rows the machine downloads (a Hub dataset; 0: pushed)")
    prepare_rows: int = Field(default=0, ge=0, description="rows prepare writes (train + dev + test)")
    eval_clips: int = Field(default=0, ge=0, description="test clips evaluate transcribes, per variant")
    bench_clips: int = Field(default=0, ge=0, description="clips bench times, per variant")
    sync_every_s: float = Field(default=600, gt=0, description="machine.checkpoint_sync_every_s")

    @property
    def grad_accum(self) -> int:
        """train.grad_accum: micro-batches per optimizer step."""
        return max(1, self.samples_per_step // self.micro_batch)


class GpuCount(Strict):
    """A range of GPU counts per machine: offers with min..max GPUs are compared by their whole run's cost."""

    min: int = Field(default=1, gt=0)
    max: Optional[int] = Field(default=None, gt=0, description="most GPUs per machine; None: no upper bound")

    @model_validator(mode="after")
    def _order(self) -> "GpuCount":
        if self.max is not None and self.max < self.min:
            raise ValueError(f"max {self.max} is below min {self.min}; write "
                             "{min: 1, max: 8} for a range or a plain number for exactly that many GPUs")
        return self


class VastConfig(Strict):
    gpu_names: list[str] = Field(default_factory=lambda: ["RTX 4090", "RTX 5090", "RTX A6000", "RTX 6000Ada", "L40S",
                                                          "A100 PCIE", "A100 SXM4", "H100 PCIE", "H100 SXM", "H200"])
    min_gpu_ram_gb: float = Field(default=24, gt=0)
    num_gpus: Union[int, GpuCount] = Field(default=1, description=(
        "GPUs per machine: a number means exactly that many; {min: 1, max: 8} (max optional) rents any count in "
        "the range, the offers ranked by their whole run's cost with N GPUs (min_gpu_ram_gb is per GPU)"))
    min_disk_gb: float = Field(default=80, gt=0)
    min_reliability: float = Field(default=0.95, ge=0, le=1)
    min_cuda: float = Field(default=PINNED_TORCH_CUDA, ge=0, description=(
        "offers need cuda_max_good (the CUDA the host's driver supports) >= this; default: the CUDA the "
        "pinned torch build needs, the least allowed when machine.gpu is required"))
    min_inet_down_mbps: float = Field(default=200, ge=0)
    max_inet_cost_per_gb: float = Field(default=0.05, ge=0, description=(
        "offers need inet_up_cost and inet_down_cost (the host's $/GB for bytes leaving / reaching the machine) "
        "<= this; the estimate and the copies home price the run's bytes at the rented offer's rates"))
    verified: bool = True
    interruptible: bool = False
    bid_dph: Optional[float] = Field(default=None, gt=0, description="bid price in $/h for interruptible instances")
    max_dph: float = Field(default=1.5, gt=0, description="most $/h a rented machine may cost")
    image: str = "pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime"
    create_attempts: int = Field(default=3, gt=0, le=20)

    @field_validator("num_gpus", mode="before")
    @classmethod
    def _gpu_count(cls, v: object) -> object:
        if isinstance(v, dict):
            try:
                return GpuCount(**v)
            except ValidationError as e:
                raise ValueError("; ".join(("{}: ".format(".".join(map(str, x["loc"]))) if x["loc"] else "")
                                           + x["msg"].removeprefix("Value error, ") for x in e.errors())) from None
        if isinstance(v, GpuCount):
            return v
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError("machine.vast.num_gpus must be a number of GPUs (at least 1) or a range like "
                             "{min: 1, max: 8}")
        return v

    def gpu_range(self) -> tuple[int, Optional[int]]:
        """(least, most) GPUs per machine; most None: no upper bound."""
        n = self.num_gpus
        return (n, n) if isinstance(n, int) else (n.min, n.max)

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


Backend = Literal["vast", "local", "ssh"]  # infra/backends/registry.py routes each; flows/qat.py takes these values too


class MachineConfig(Strict):
    backend: Backend = "vast"
    vast: VastConfig = Field(default_factory=VastConfig)
    ssh: Optional[SSHHostConfig] = None
    planned_hours: float = Field(default=6.0, gt=0, description="the cost estimate's hours when the training "
                                 "size or the GPU's speed is unknown (infra/run_estimate.py)")
    setup_hours: float = Field(default=0.5, ge=0, description="hours of set-up (boot, push, the venv) added to the "
                               "estimate; prepare, convert, bench and evaluate are estimated per step")
    max_cost_usd: float = Field(default=25.0, gt=0, description="budget cap: the machine is torn down when crossed")
    provision_timeout_s: float = Field(default=900, gt=0, le=86400)
    ssh_timeout_s: float = Field(default=300, gt=0, le=3600)
    step_timeout_s: float = Field(default=6 * 3600, gt=0)  # bounded by the reaper rule below
    # Whether the run needs a GPU: `required` (setup refuses a machine where CUDA is not usable from
    # torch) or `none` (a CPU run is intended: the emulator, the demo; onnxruntime's CPU wheel).
    gpu: Literal["required", "none"] = "required"
    # The machine's own python (an image's), run only to build the steps' venv (steps/bootstrap.py).
    python: str = "python3"
    checkpoint_sync_every_s: float = Field(default=600, gt=0, le=86400)
    budget_check_every_s: float = Field(default=30, gt=0, le=3600, description="how often the budget is checked while a "
                                        "command prints nothing (it is also checked on every output line)")

    @model_validator(mode="after")
    def _ssh(self) -> "MachineConfig":
        if self.backend == "ssh" and self.ssh is None:
            raise ValueError("machine.ssh (host, port, user, key_path) is required when machine.backend is 'ssh'")
        if self.gpu == "required" and self.vast.min_cuda < PINNED_TORCH_CUDA:
            raise ValueError(f"machine.vast.min_cuda {self.vast.min_cuda:g} is below {PINNED_TORCH_CUDA:g}, the CUDA "
                             f"the pinned torch {PINNED_TORCH} build needs: on an older driver CUDA is not usable "
                             f"and setup refuses the machine; raise it to {PINNED_TORCH_CUDA:g} or more (or set "
                             "machine.gpu: none for a CPU run)")
        limit_s = REAPER_MAX_AGE_HOURS * 3600
        if self.step_timeout_s * STEP_ATTEMPTS > limit_s:
            raise ValueError(f"machine.step_timeout_s {self.step_timeout_s:g} s x {STEP_ATTEMPTS} attempts of a step = "
                             f"{self.step_timeout_s * STEP_ATTEMPTS / 3600:g} h, more than the reaper's age limit of "
                             f"{REAPER_MAX_AGE_HOURS:g} h (max_age_hours of the reap deployment): the machine of a "
                             f"step still retrying would outlive it. Set machine.step_timeout_s to at most "
                             f"{limit_s / STEP_ATTEMPTS:g} s")
        return self
