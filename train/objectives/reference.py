"""The frozen reference model of the preference losses: a separate model, the policy with its LoRA adapters disabled,
or log-probs computed once before training (`reference.precompute=true`) and cached on disk.

The reference model is frozen (eval mode, no gradients, no optimizer state) and placed like the policy (sharded
under FSDP). With LoRA there is no second copy: the reference is the policy with its adapters disabled. With
`reference.precompute=true` the reference log-probs of every pair are computed once and cached under a hash of the
data and the model (`ReferenceCache`), and training then runs with no reference model in memory.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from pathlib import Path

import numpy as np
import torch

from train.app.models import build_model, numerics_id
from train.batching.collate import Batch, collate
from train.batching.sequences import forward_sequence_logps
from train.data.store import PackedStore, TokenStore, TokenTable
from train.errors import HalyardError
from train.files import partial_of, publish
from train.loop.distributed import shard_model
from train.loop.profile import phase
from train.loop.throughput import Work, pass_counts

logger = logging.getLogger(__name__)

DRIFT_CHECK_PAIRS = 4  # cached pairs recomputed whenever the reference model is loaded anyway


class ReferenceMixin:
    """The frozen reference of a BasicTrainer subclass: a separate model, the policy without its LoRA adapters, or
    precomputed log-probs (paired data: `precompute_reference`)."""

    uses_reference = True

    def setup_reference(self, reference_model) -> None:
        self.reference_model = reference_model
        if reference_model is not None:
            reference_model.eval()
            reference_model.requires_grad_(False)

    def batch_work(self, batch: Batch) -> Work:
        """The policy's passes (see BasicTrainer), and the reference's forward over every sequence of the batch when
        it runs: not when reference-free, nor when the batch holds precomputed log-probs."""
        work = super().batch_work(batch)
        if self.uses_reference and "reference_logps" not in batch:
            work = dataclasses.replace(work, reference=pass_counts(batch))
        return work

    @torch.no_grad()
    def reference_logps(self, batch: Batch) -> torch.Tensor:
        """(sequences,) summed log-probs of the batch's responses under the reference model."""
        if "reference_logps" in batch:
            return batch["reference_logps"]
        if self.reference_model is not None:
            with self.accelerator.autocast(), phase("reference", whole=True):
                return forward_sequence_logps(self.reference_model, batch)[0]
        policy = self.accelerator.unwrap_model(self.model)  # LoRA: the policy with its adapters switched off
        if not hasattr(policy, "disable_adapter"):
            raise HalyardError(
                "no reference model: this loss needs one (or ++model.use_peft=true, or reference.precompute)"
            )
        with policy.disable_adapter(), self.accelerator.autocast(), phase("reference", whole=True):
            return forward_sequence_logps(policy, batch)[0]

    @torch.no_grad()
    def precompute_reference(self, cache: ReferenceCache) -> None:
        """Reference log-probs of the train and eval pairs that `cache` lacks, computed once and saved; a few pairs it
        has are recomputed first, to catch a cache that no longer matches the reference. Then free the model."""
        stores = [store.examples for store in (self.train_data, self.eval_data) if store]
        tables = {store.table.key: store.table for store in stores}
        needed = {key: np.unique(np.concatenate([s.rows for s in stores if s.table.key == key])) for key in tables}
        values = {key: cache.load(table) for key, table in tables.items()}
        missing = {key: rows[np.isnan(values[key][rows, 0])] for key, rows in needed.items()}
        n_missing = sum(len(rows) for rows in missing.values())
        n_cached = sum(len(rows) for rows in needed.values()) - n_missing
        logger.info(f"precomputing reference log-probs for {n_missing} pairs ({n_cached} cached in {cache.folder})")
        for key, table in tables.items():
            cached = needed[key][~np.isnan(values[key][needed[key], 0])][:DRIFT_CHECK_PAIRS]
            recomputed = self._reference_of(table, cached)
            if not np.allclose(recomputed, values[key][cached], rtol=1e-3, atol=1e-3):
                raise HalyardError(
                    f"cached reference log-probs in {cache.path(table)} differ from the reference model's (e.g. "
                    f"{values[key][cached][0].tolist()} cached, {recomputed[0].tolist()} now): the model or its dtype "
                    f"changed under the same files. Delete {cache.folder} to recompute them."
                )
            values[key][missing[key]] = self._reference_of(table, missing[key])
            if self.accelerator.is_main_process and len(missing[key]):
                cache.save(table, values[key])
        for store in stores:
            store.reference = values[store.table.key][store.rows]
        self.reference_model = None  # training needs no reference model from here on
        self.accelerator.wait_for_everyone()

    def _reference_of(self, table: TokenTable, rows: np.ndarray) -> np.ndarray:
        """(len(rows), 2) float32 reference log-probs (chosen, rejected) of the pairs at `rows` of `table`."""
        pairs = TokenStore(table, rows)
        values = [np.zeros((0, 2), dtype=np.float32)]
        size = self.loop.eval_batch_size
        for start in range(0, len(pairs), size):
            chunk = pairs[start : start + size]
            batch = self.to_device(collate([p.chosen for p in chunk] + [p.rejected for p in chunk], self.pad_token_id))
            values.append(self.reference_logps(batch).float().cpu().view(2, -1).T.numpy())
        return np.concatenate(values)


class ReferenceCache:
    """Reference log-probs per tokenized pair, for reference.precompute=true:
    ${cache_dir}/reference_logps/<reference id>/<preprocessing cache key>.npy holds a (table rows, 2) float32 array
    (chosen, rejected), NaN where not computed yet. The preprocessing cache key fixes the tokens of every row and the
    reference id hashes the reference model's files and dtype, so a run on a subset, another mix or split, or more
    epochs of the same tokenized data reuses every pair computed before."""

    def __init__(self, cache_dir: str, model_path: str, dtype: str) -> None:
        digest = hashlib.sha256(dtype.encode())
        for file in sorted(Path(model_path).glob("*")):
            if file.suffix in (".safetensors", ".json", ".bin"):
                status = file.stat()
                digest.update(f"{file.name}|{status.st_size}|{status.st_mtime_ns}".encode())
        self.folder = Path(cache_dir) / "reference_logps" / digest.hexdigest()[:20]

    def path(self, table: TokenTable) -> Path:
        return self.folder / f"{table.key}.npy"

    def load(self, table: TokenTable) -> np.ndarray:
        path = self.path(table)
        if path.exists():
            values = np.load(path)
            if values.shape == (table.table.num_rows, 2):
                return values
            logger.warning(f"{path} does not match its data ({values.shape[0]} rows); recomputing it")
        return np.full((table.table.num_rows, 2), np.nan, dtype=np.float32)

    def save(self, table: TokenTable, values: np.ndarray) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        partial = partial_of(self.path(table))
        with partial.open("wb") as f:
            np.save(f, values)
        publish(partial, self.path(table))

    def attach_if_complete(self, train: TokenStore | PackedStore, evaluation: TokenStore | None) -> bool:
        """Give the stores their cached reference log-probs if every pair has them; return whether it did."""
        stores = [store.examples for store in (train, evaluation) if store]
        values = [self.load(store.table)[store.rows] for store in stores]
        if any(np.isnan(v).any() for v in values):
            return False
        for store, value in zip(stores, values, strict=True):
            store.reference = value
        logger.info(f"reusing reference log-probs cached in {self.folder}: no reference model is loaded")
        return True


def build_reference(cfg, accelerator, fsdp, train: TokenStore, evaluation: TokenStore | None, trainer_class):
    """The reference model for `trainer_class`, or None (reference-free, LoRA, or cached log-probs)."""
    if not trainer_class.uses_reference:
        return None, None
    cache = None
    if cfg.reference.precompute:  # validation checked that the loss supports it
        cache = ReferenceCache(cfg.cache_dir, cfg.model.name_or_path, numerics_id(cfg.model))
        if cache.attach_if_complete(train, evaluation):
            return None, None
    if cfg.model.use_peft:
        return None, cache  # the policy with its adapters disabled
    settings = dataclasses.replace(cfg.model, use_peft=False, gradient_checkpointing=False)
    reference = build_model(settings, cfg.seed, sharded=fsdp is not None, role="frozen reference")
    if fsdp is not None:
        reference = shard_model(reference, fsdp, accelerator.device, bf16=cfg.model.dtype == "bfloat16")
    else:
        reference = reference.to(accelerator.device)
    return reference, cache
