"""The train step's data: the micro-batch order (a pure function of seed and epoch), the prepared rows
collated with their log-mel computed in the loader's workers, and a frozen encoder's cached outputs."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from .audio_store import log_mel
from .errors import StepError


class MicroBatches:
    """Micro-batch m of the run: epoch m // per_epoch, a seed-determined permutation per epoch."""

    def __init__(self, n: int, batch_size: int, seed: int):
        self.n, self.bs, self.seed = n, batch_size, seed
        self.per_epoch = math.ceil(n / batch_size)
        self._epoch, self._perm = -1, None

    def indices(self, m: int) -> list[int]:
        epoch, j = divmod(m, self.per_epoch)
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._epoch, self._perm = epoch, torch.randperm(self.n, generator=g).tolist()
        return self._perm[j * self.bs:(j + 1) * self.bs]


class Rows(torch.utils.data.Dataset):
    """dataset[list of row indices] -> one collated batch (rows fetched in a single Arrow take; their
    log-mel features computed here, in the loader's workers, from the stored audio: steps/audio_store.py)."""

    def __init__(self, ds, feature_extractor, pad_id: int = -100, label_len: int | None = None):
        self.ds = ds.select_columns(["audio", "labels"]).with_format("numpy")
        self.fe = feature_extractor
        self.pad_id, self.label_len = pad_id, label_len  # None: the batch's longest label

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, idx: list[int]) -> dict:
        rows = self.ds[idx]
        feats = torch.from_numpy(log_mel(self.fe, rows["audio"]))
        labels = [np.asarray(l, dtype=np.int64) for l in rows["labels"]]
        out = torch.full((len(labels), self.label_len or max(len(l) for l in labels)), self.pad_id, dtype=torch.long)
        for i, l in enumerate(labels):
            out[i, :len(l)] = torch.tensor(l)
        return {"input_features": feats, "labels": out, "rows": idx}


class EncoderCache:
    """Outputs of a frozen encoder, computed once per training clip and reused every epoch.

    Exact: a frozen encoder (fake quantization included) is a fixed function when it has no
    dropout, so only the decoder's forward and backward run after the first epoch.
    """

    def __init__(self, encoder: torch.nn.Module):
        self.encoder, self.outputs = encoder, {}

    @classmethod
    def for_run(cls, model, tc, n_clips: int, dtype: torch.dtype, log) -> "EncoderCache | None":
        """A cache when the encoder is frozen, has no dropout/SpecAugment, and its outputs fit in
        train.encoder_cache_mb; None (the encoder runs every step) otherwise."""
        c = model.config
        random_parts = [k for k in ("dropout", "attention_dropout", "activation_dropout", "encoder_layerdrop")
                        if getattr(c, k, 0)] + (["apply_spec_augment"] if getattr(c, "apply_spec_augment", False) else [])
        if not tc.freeze_encoder or random_parts:
            return None
        need = n_clips * c.max_source_positions * c.d_model * torch.finfo(dtype).bits / 8 / 2**20
        if need > tc.encoder_cache_mb:
            log(f"frozen encoder: caching its outputs would take {need:.0f} MB > train.encoder_cache_mb "
                f"{tc.encoder_cache_mb}; it runs every step")
            return None
        log(f"frozen encoder: its outputs are computed once per clip and cached ({need:.0f} MB)")
        return cls(model.model.encoder)

    @torch.no_grad()
    def __call__(self, rows: list[int], feats: torch.Tensor) -> torch.Tensor:
        todo = [i for i, r in enumerate(rows) if r not in self.outputs]
        if todo:
            hidden = self.encoder(feats[todo]).last_hidden_state
            for i, h in zip(todo, hidden):
                self.outputs[rows[i]] = h.clone()
        return torch.stack([self.outputs[r] for r in rows])


def loader(rows: Rows, batches, num_workers: int, pin: bool):
    return torch.utils.data.DataLoader(rows, batch_size=None, sampler=batches, num_workers=num_workers,
                                       pin_memory=pin)


def load_split(prep: Path, split: str):
    from datasets import load_from_disk

    path = prep / split
    if not path.is_dir():
        raise StepError(f"prepared split {path} is missing; rerun the prepare step")
    ds = load_from_disk(str(path))
    missing = {"audio", "labels"} - set(ds.column_names)
    if missing:
        raise StepError(f"prepared split {path} lacks columns {sorted(missing)}; rerun prepare with --force")
    return ds
