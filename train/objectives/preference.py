"""Preference trainers: the paired family (DPO, cDPO, IPO, SimPO) and KTO, which hold a frozen reference model.

`PairedPreferenceTrainer` runs chosen and rejected responses through the policy in one concatenated forward and
averages the loss over every pair of the global batch. A subclass only implements `loss` (see `DPOTrainer`).

The reference model is frozen (eval mode, no gradients, no optimizer state) and placed like the policy (sharded
under FSDP). With LoRA there is no second copy: the reference is the policy with its adapters disabled. With
`reference.precompute=true` the reference log-probs are computed once, cached in safetensors under a hash of the
data and the model, and training then runs with no reference model in memory.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from train.app.config import LossConfig, setting
from train.batching.collate import collate, collate_sequences, collate_shared_prompt, prompt_length
from train.batching.sequences import forward_sequence_logps, n_sequences
from train.data.store import (
    IGNORE_INDEX,
    Example,
    PackedItems,
    PackedStore,
    PairExample,
    TokenStore,
    TokenTable,
    UnpairedExample,
)
from train.errors import HalyardError
from train.files import partial_of, publish
from train.loop.throughput import Work, pass_counts
from train.loop.trainer import BasicTrainer
from train.objectives.losses import (
    LossSum,
    PreferenceLoss,
    apo_loss,
    cpo_loss,
    dpo_loss,
    hinge_loss,
    ipo_loss,
    kto_loss,
    orpo_loss,
    robust_dpo_loss,
    rpo_loss,
    simpo_loss,
)

logger = logging.getLogger(__name__)


@dataclass
class PairLogps:
    """Summed log-probs of each pair's responses (pairs,), and their token counts (for length normalization)."""

    policy_chosen: torch.Tensor
    policy_rejected: torch.Tensor
    reference_chosen: torch.Tensor | None
    reference_rejected: torch.Tensor | None
    chosen_tokens: torch.Tensor
    rejected_tokens: torch.Tensor


@dataclass
class BetaSettings(LossConfig):
    beta: float = setting(0.1, "Scale of the implicit reward beta * log(policy / reference).")

    def problems(self) -> list[str]:
        return [] if self.beta > 0 else [f"loss.beta={self.beta}: must be > 0"]


@dataclass
class DPOSettings(BetaSettings):
    label_smoothing: float = setting(
        0.0, "Assumed fraction of flipped preference labels, in [0, 0.5); above 0 it is conservative DPO (cDPO)."
    )

    def problems(self) -> list[str]:
        bad = not 0 <= self.label_smoothing < 0.5
        return super().problems() + (
            [f"loss.label_smoothing={self.label_smoothing}: must be in [0, 0.5)"] if bad else []
        )


@dataclass
class IPOSettings(LossConfig):
    tau: float = setting(0.1, "Regularization; the log-ratio margin is regressed to 1 / (2 tau).")
    length_normalized: bool = setting(
        False,
        "Log-ratios of mean token log-probs (the form TRL uses) instead of summed log-probs (the paper's formula).",
    )

    def problems(self) -> list[str]:
        return [] if self.tau > 0 else [f"loss.tau={self.tau}: must be > 0"]


@dataclass
class RobustDPOSettings(BetaSettings):
    label_flip_rate: float = setting(0.1, "Assumed rate of flipped preference labels, in [0, 0.5).")

    def problems(self) -> list[str]:
        bad = not 0 <= self.label_flip_rate < 0.5
        return super().problems() + (
            [f"loss.label_flip_rate={self.label_flip_rate}: must be in [0, 0.5)"] if bad else []
        )


APO_ANCHORS = ("zero", "down")


@dataclass
class APOSettings(BetaSettings):
    anchor: str = setting(
        "zero",
        "zero: raise the chosen and lower the rejected likelihood (chosen answers better than the model's); down: "
        "lower both, keeping them apart (chosen answers worse than the model's).",
    )

    def problems(self) -> list[str]:
        bad = self.anchor not in APO_ANCHORS
        return super().problems() + (
            [f"loss.anchor={self.anchor!r}: must be one of {list(APO_ANCHORS)}"] if bad else []
        )


@dataclass
class NLLSettings(BetaSettings):
    nll_weight: float = setting(1.0, "Weight of the chosen response's per-token negative log-likelihood term.")

    def problems(self) -> list[str]:
        bad = self.nll_weight < 0
        return super().problems() + ([f"loss.nll_weight={self.nll_weight}: must be >= 0"] if bad else [])


@dataclass
class ORPOSettings(LossConfig):
    odds_ratio_weight: float = setting(0.1, "lambda: weight of the log odds-ratio term beside the chosen NLL.")

    def problems(self) -> list[str]:
        bad = self.odds_ratio_weight <= 0
        return [f"loss.odds_ratio_weight={self.odds_ratio_weight}: must be > 0"] if bad else []


@dataclass
class SimPOSettings(LossConfig):
    beta: float = setting(2.0, "Scale of the reward beta * mean token log-prob.")
    gamma_beta_ratio: float = setting(0.5, "Target reward margin gamma, as a ratio of beta.")

    def problems(self) -> list[str]:
        return [] if self.beta > 0 else [f"loss.beta={self.beta}: must be > 0"]


@dataclass
class KTOSettings(BetaSettings):
    desirable_weight: float = setting(1.0, "Weight of desirable examples' losses.")
    undesirable_weight: float = setting(1.0, "Weight of undesirable examples' losses.")

    def problems(self) -> list[str]:
        bad = self.desirable_weight <= 0 or self.undesirable_weight <= 0
        return super().problems() + (["loss.desirable_weight and loss.undesirable_weight must be > 0"] if bad else [])


class ReferenceMixin:
    """The frozen reference: a separate model, the policy without its LoRA adapters, or precomputed log-probs."""

    uses_reference = True

    def setup_reference(self, reference_model) -> None:
        self.reference_model = reference_model
        if reference_model is not None:
            reference_model.eval()
            reference_model.requires_grad_(False)

    def batch_work(self, batch: dict[str, torch.Tensor]) -> Work:
        """The policy's passes (see BasicTrainer), and the reference's forward over every sequence of the batch when
        it runs: not when reference-free, nor when the batch holds precomputed log-probs."""
        work = super().batch_work(batch)
        if self.uses_reference and "reference_logps" not in batch:
            work = dataclasses.replace(work, reference=pass_counts(batch))
        return work

    @torch.no_grad()
    def reference_logps(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """(rows,) summed log-probs of the batch's responses under the reference model."""
        if "reference_logps" in batch:
            return batch["reference_logps"]
        if self.reference_model is not None:
            with self.accelerator.autocast():
                return forward_sequence_logps(self.reference_model, batch)[0]
        policy = self.accelerator.unwrap_model(self.model)  # LoRA: the policy with its adapters switched off
        if not hasattr(policy, "disable_adapter"):
            raise HalyardError(
                "no reference model: this loss needs one (or ++model.use_peft=true, or reference.precompute)"
            )
        with policy.disable_adapter(), self.accelerator.autocast():
            return forward_sequence_logps(policy, batch)[0]


class PairedPreferenceTrainer(ReferenceMixin, BasicTrainer):
    """Chosen and rejected through the policy in one forward; the loss is the mean over all pairs of the step."""

    example_unit = "pairs"
    rows_per_example = 2

    data_kind = "paired"
    supports_reference_precompute = True  # a pair's reference log-probs do not change during training
    supports_packing = True  # whole pairs per packed row
    supports_shared_prompt = True
    shared_prompt = False  # set per run in __init__ (data.shared_prompt)

    def __init__(self, cfg, *args, reference_model=None, **kwargs):
        super().__init__(cfg, *args, **kwargs)
        self.setup_reference(reference_model if self.uses_reference else None)
        self.shared_prompt = cfg.data.shared_prompt
        if self.shared_prompt is None:  # on wherever it applies: the same log-probs, the prompt computed once
            applies = not cfg.data.packing and cfg.model.attn_implementation == "sdpa"
            # a subclass with its own batch_loss may expect two rows per pair: it opts in with data.shared_prompt=true
            own_loop = type(self).batch_loss is not PairedPreferenceTrainer.batch_loss
            self.shared_prompt = self.supports_shared_prompt and applies and not own_loop
        if self.shared_prompt:
            logger.info("pairs: each prompt runs once, in one row with both responses (data.shared_prompt)")

    def loss(self, logps: PairLogps) -> PreferenceLoss:
        """The per-pair loss and implicit rewards: the one method a paired loss implements."""
        raise NotImplementedError

    def collate(self, pairs: list[PairExample] | list[PackedItems]) -> dict[str, torch.Tensor]:
        """Sequences 0..n-1 are the chosen responses, n..2n-1 the rejected ones, in the same order: one per row, or,
        for packed rows, each pair's chosen and rejected side by side in a row, numbered so by `example_ids`."""
        if isinstance(pairs[0], PackedItems):
            rows = [[s for p in row.items for s in (p.chosen, p.rejected)] for row in pairs]
            pairs = [p for row in pairs for p in row.items]
            n = len(pairs)
            batch = collate_sequences(rows, [j + side * n for j in range(n) for side in (0, 1)], self.pad_token_id)
        elif self.shared_prompt:
            batch = collate_shared_prompt(pairs, self.pad_token_id)
        else:
            batch = collate([p.chosen for p in pairs] + [p.rejected for p in pairs], self.pad_token_id)
        if pairs[0].reference_chosen is not None:
            values = [p.reference_chosen for p in pairs] + [p.reference_rejected for p in pairs]
            batch["reference_logps"] = torch.tensor(values, dtype=torch.float32)
        if any(p.margin is not None for p in pairs):  # (pairs,) float32, 0 for a row without a margin
            batch["margin"] = torch.tensor([p.margin or 0.0 for p in pairs], dtype=torch.float32)
        return batch

    def loss_units(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.tensor(n_sequences(batch) // 2)

    def batch_loss(self, model, batch: dict[str, torch.Tensor]) -> LossSum:
        policy, tokens = forward_sequence_logps(model, batch)  # its logits are freed before the reference forward
        reference = self.reference_logps(batch) if self.uses_reference else None
        n = policy.shape[0] // 2
        result = self.loss(
            PairLogps(
                policy_chosen=policy[:n],
                policy_rejected=policy[n:],
                reference_chosen=reference[:n] if reference is not None else None,
                reference_rejected=reference[n:] if reference is not None else None,
                chosen_tokens=tokens[:n],
                rejected_tokens=tokens[n:],
            )
        )
        count = torch.tensor(n, device=policy.device)
        metrics = {
            "rewards/chosen": (result.chosen_rewards, count),
            "rewards/rejected": (result.rejected_rewards, count),
            "rewards/accuracies": ((result.chosen_rewards > result.rejected_rewards).float(), count),
            "rewards/margins": (result.chosen_rewards - result.rejected_rewards, count),
            "logps/chosen": (policy[:n].detach(), count),
            "logps/rejected": (policy[n:].detach(), count),
        }
        return LossSum(result.losses.sum(), count, metrics)

    @torch.no_grad()
    def precompute_reference(self, cache: ReferenceCache) -> None:
        """Reference log-probs of the train and eval pairs that `cache` lacks, computed once and saved; a few pairs it
        has are recomputed first, to catch a cache that no longer matches the reference. Then free the model."""
        stores = [_examples_of(store) for store in (self.train_data, self.eval_data) if store]
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
        for start in range(0, len(pairs), self.eval_batch_size):
            chunk = pairs[start : start + self.eval_batch_size]
            batch = self.to_device(collate([p.chosen for p in chunk] + [p.rejected for p in chunk], self.pad_token_id))
            values.append(self.reference_logps(batch).float().cpu().view(2, -1).T.numpy())
        return np.concatenate(values)


DRIFT_CHECK_PAIRS = 4  # cached pairs recomputed whenever the reference model is loaded anyway


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
        stores = [_examples_of(store) for store in (train, evaluation) if store]
        values = [self.load(store.table)[store.rows] for store in stores]
        if any(np.isnan(v).any() for v in values):
            return False
        for store, value in zip(stores, values, strict=True):
            store.reference = value
        logger.info(f"reusing reference log-probs cached in {self.folder}: no reference model is loaded")
        return True


class DPOTrainer(PairedPreferenceTrainer):
    """DPO; with loss.label_smoothing > 0 (loss=cdpo), conservative DPO."""

    settings_class = DPOSettings
    settings: DPOSettings

    def loss(self, logps: PairLogps) -> PreferenceLoss:
        return dpo_loss(
            logps.policy_chosen, logps.policy_rejected, logps.reference_chosen, logps.reference_rejected,
            beta=self.settings.beta, label_smoothing=self.settings.label_smoothing,
        )  # fmt: skip


class IPOTrainer(PairedPreferenceTrainer):
    settings_class = IPOSettings
    settings: IPOSettings

    def loss(self, logps: PairLogps) -> PreferenceLoss:
        chosen, rejected = logps.chosen_tokens, logps.rejected_tokens
        if not self.settings.length_normalized:
            chosen = rejected = torch.ones_like(chosen)
        return ipo_loss(
            logps.policy_chosen / chosen, logps.policy_rejected / rejected,
            logps.reference_chosen / chosen, logps.reference_rejected / rejected,
            tau=self.settings.tau,
        )  # fmt: skip


class RobustDPOTrainer(PairedPreferenceTrainer):
    settings_class = RobustDPOSettings
    settings: RobustDPOSettings

    def loss(self, logps: PairLogps) -> PreferenceLoss:
        return robust_dpo_loss(
            logps.policy_chosen, logps.policy_rejected, logps.reference_chosen, logps.reference_rejected,
            beta=self.settings.beta, label_flip_rate=self.settings.label_flip_rate,
        )  # fmt: skip


class HingeTrainer(PairedPreferenceTrainer):
    settings_class = BetaSettings
    settings: BetaSettings

    def loss(self, logps: PairLogps) -> PreferenceLoss:
        return hinge_loss(
            logps.policy_chosen, logps.policy_rejected, logps.reference_chosen, logps.reference_rejected,
            beta=self.settings.beta,
        )  # fmt: skip


class APOTrainer(PairedPreferenceTrainer):
    settings_class = APOSettings
    settings: APOSettings

    def loss(self, logps: PairLogps) -> PreferenceLoss:
        return apo_loss(
            logps.policy_chosen, logps.policy_rejected, logps.reference_chosen, logps.reference_rejected,
            beta=self.settings.beta, variant=self.settings.anchor,
        )  # fmt: skip


class RPOTrainer(PairedPreferenceTrainer):
    settings_class = NLLSettings
    settings: NLLSettings

    def loss(self, logps: PairLogps) -> PreferenceLoss:
        return rpo_loss(
            logps.policy_chosen, logps.policy_rejected, logps.reference_chosen, logps.reference_rejected,
            logps.chosen_tokens, beta=self.settings.beta, nll_weight=self.settings.nll_weight,
        )  # fmt: skip


class CPOTrainer(PairedPreferenceTrainer):
    settings_class = NLLSettings
    settings: NLLSettings
    uses_reference = False  # reference-free
    supports_reference_precompute = False

    def loss(self, logps: PairLogps) -> PreferenceLoss:
        return cpo_loss(
            logps.policy_chosen, logps.policy_rejected, logps.chosen_tokens,
            beta=self.settings.beta, nll_weight=self.settings.nll_weight,
        )  # fmt: skip


class ORPOTrainer(PairedPreferenceTrainer):
    settings_class = ORPOSettings
    settings: ORPOSettings
    uses_reference = False  # reference-free
    supports_reference_precompute = False

    def loss(self, logps: PairLogps) -> PreferenceLoss:
        return orpo_loss(
            logps.policy_chosen, logps.policy_rejected, logps.chosen_tokens, logps.rejected_tokens,
            odds_ratio_weight=self.settings.odds_ratio_weight,
        )  # fmt: skip


class SimPOTrainer(PairedPreferenceTrainer):
    settings_class = SimPOSettings
    settings: SimPOSettings
    uses_reference = False  # reference-free: no reference model is loaded at all
    supports_reference_precompute = False

    def loss(self, logps: PairLogps) -> PreferenceLoss:
        return simpo_loss(
            logps.policy_chosen, logps.policy_rejected, logps.chosen_tokens, logps.rejected_tokens,
            beta=self.settings.beta, gamma_beta_ratio=self.settings.gamma_beta_ratio,
        )  # fmt: skip


class KTOTrainer(ReferenceMixin, BasicTrainer):
    """KTO on unpaired examples. The KL reference point is estimated on mismatched pairs, each prompt with the
    completion of the next example of the global batch, over the whole step (every micro-batch of every process)
    before any loss, detached and clamped at 0: so it, and the loss, do not depend on how the step is split.
    Evaluation estimates it per global evaluation batch, pairing within each process's share."""

    settings_class = KTOSettings
    settings: KTOSettings
    data_kind = "unpaired"
    pairs_across_step = True
    supports_packing = True  # matched sequences packed; each packed row's mismatched sequences in a row of their own
    rows_per_example = 2  # each example, and its prompt with its successor's completion (for the KL estimate)

    def __init__(self, cfg, *args, reference_model=None, **kwargs):
        super().__init__(cfg, *args, **kwargs)
        self.setup_reference(reference_model)

    def collate(
        self,
        items: list[UnpairedExample] | list[PackedItems],
        successors: list[UnpairedExample] | list[PackedItems] | None = None,
    ) -> dict[str, torch.Tensor]:
        """Sequences 0..n-1: each prompt with its completion; n..2n-1: each prompt with its successor's completion
        (the next example of the global batch when training; of this list when evaluating). The first half of the
        rows holds the matched sequences, the second the mismatched ones: one per row, or packed rows of the same
        examples (`example_ids` numbering them). Adds desirable (n,)."""
        if isinstance(items[0], PackedItems):
            return self._collate_packed(items, successors)
        matched = [item.example for item in items]
        partners = [s.example for s in successors] if successors is not None else matched[1:] + matched[:1]
        mismatched = [_join(example, partner) for example, partner in zip(matched, partners, strict=True)]
        batch = collate(matched + mismatched, self.pad_token_id)
        batch["desirable"] = torch.tensor([item.desirable for item in items])
        return batch

    def _collate_packed(self, rows: list[PackedItems], successor_rows: list[PackedItems]) -> dict[str, torch.Tensor]:
        # An item's successor is the next item of its row, or the first item of the next row of the global batch:
        # the same pairing of the step's examples however its rows are split.
        matched, mismatched, desirable = [], [], []
        for row, after in zip(rows, successor_rows, strict=True):
            examples = [item.example for item in row.items]
            partners = examples[1:] + [after.items[0].example]
            matched.append(examples)
            mismatched.append([_join(e, p) for e, p in zip(examples, partners, strict=True)])
            desirable += [item.desirable for item in row.items]
        batch = collate_sequences(matched + mismatched, list(range(2 * len(desirable))), self.pad_token_id)
        batch["desirable"] = torch.tensor(desirable)
        return batch

    def loss_units(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.tensor(batch["desirable"].shape[0])

    def batch_work(self, batch: dict[str, torch.Tensor]) -> Work:
        """Only the matched sequences train; the mismatched ones get forwards alone (policy and reference, in
        `before_step`) for the KL estimate."""
        work = super().batch_work(batch)  # the reference's forward over every sequence
        trained, forward_only = (pass_counts(_half(batch, mismatched=side)) for side in (False, True))
        return dataclasses.replace(work, trained=trained, forward_only=forward_only)

    @torch.no_grad()
    def before_step(self, batches: list[dict[str, torch.Tensor]]) -> None:
        """The step's KL estimate, from the mismatched rows of all its micro-batches on all processes, stored in
        each batch as `kl` (a () tensor) for `batch_loss`."""
        sums = torch.zeros(2, device=self.accelerator.device)
        for batch in batches:
            mismatched = _half(batch, mismatched=True)
            policy = forward_sequence_logps(self.model, mismatched)[0]
            sums += torch.stack(
                [
                    (policy - self.reference_logps(mismatched)).sum(),
                    torch.tensor(float(len(policy)), device=policy.device),
                ]
            )
        sums = self.accelerator.reduce(sums, reduction="sum")
        kl = (sums[0] / sums[1]).clamp(min=0)
        for batch in batches:
            batch["kl"] = kl

    def batch_loss(self, model, batch: dict[str, torch.Tensor]) -> LossSum:
        n = batch["desirable"].shape[0]
        if "kl" in batch:  # training: the step's estimate; only the matched rows need a forward with gradients
            kl, batch = batch["kl"], _half(batch, mismatched=False)
        policy = forward_sequence_logps(model, batch)[0]
        reference = self.reference_logps(batch)
        if policy.shape[0] > n:  # evaluation: estimate on this batch's mismatched rows, over every process
            kl_sums = torch.stack(
                [(policy[n:] - reference[n:]).detach().sum(), torch.tensor(float(n), device=policy.device)]
            )
            kl_sums = self.accelerator.reduce(kl_sums, reduction="sum")
            kl = (kl_sums[0] / kl_sums[1]).clamp(min=0)
        desirable = batch["desirable"]
        losses, rewards = kto_loss(
            policy[:n], reference[:n], desirable, kl, beta=self.settings.beta,
            desirable_weight=self.settings.desirable_weight, undesirable_weight=self.settings.undesirable_weight,
        )  # fmt: skip
        count = torch.tensor(n, device=policy.device)
        metrics = {
            "rewards/chosen": (rewards * desirable, desirable.sum()),
            "rewards/rejected": (rewards * ~desirable, (~desirable).sum()),
            "logps/chosen": (policy[:n].detach() * desirable, desirable.sum()),
            "logps/rejected": (policy[:n].detach() * ~desirable, (~desirable).sum()),
            "kl": (kl * n, count),
        }
        return LossSum(losses.sum(), count, metrics)


def _examples_of(store: TokenStore | PackedStore) -> TokenStore:
    """The examples behind a store (a packed store gathers its rows' pairs from them, reference log-probs too)."""
    return store.examples if isinstance(store, PackedStore) else store


ROW_KEYS = ("input_ids", "attention_mask", "labels", "position_ids", "example_ids")  # (rows, seq) batch tensors


def _half(batch: dict[str, torch.Tensor], mismatched: bool) -> dict[str, torch.Tensor]:
    """KTO's matched (first half of the rows) or mismatched (second half) sequences of a batch, numbered from 0;
    its other keys as they are."""
    n_rows = batch["input_ids"].shape[0] // 2
    rows = slice(n_rows, None) if mismatched else slice(0, n_rows)
    half = {key: value[rows] if key in ROW_KEYS else value for key, value in batch.items()}
    if mismatched and "example_ids" in half:
        n = batch["desirable"].shape[0]
        half["example_ids"] = torch.where(half["example_ids"] >= 0, half["example_ids"] - n, -1)
    return half


def _join(prompt_from: Example, completion_from: Example) -> Example:
    """The prompt of one example followed by the completion of another (prompt tokens unsupervised)."""
    split_a = prompt_length(prompt_from)
    split_b = prompt_length(completion_from)
    ids = prompt_from.input_ids[:split_a] + completion_from.input_ids[split_b:]
    return Example(ids, [IGNORE_INDEX] * split_a + completion_from.labels[split_b:])


def build_reference(cfg, accelerator, fsdp, train: TokenStore, evaluation: TokenStore | None, trainer_class):
    """The reference model for `trainer_class`, or None (reference-free, LoRA, or cached log-probs)."""
    from train.app.models import build_model
    from train.loop.distributed import shard_model

    if not trainer_class.uses_reference:
        return None, None
    cache = None
    if cfg.reference.precompute:  # validation checked that the loss supports it
        cache = ReferenceCache(cfg.cache_dir, cfg.model.name_or_path, cfg.model.dtype)
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
