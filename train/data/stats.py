"""What preprocessing did to the rows of a split: the counts (DatasetStats) and the label mask audit (MaskAudit),
reported in the training log and in summary.json."""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass

logger = logging.getLogger(__name__)


@dataclass
class DatasetStats:
    """What preprocessing did to the rows of one split, reported at the end of preprocessing and in summary.json."""

    rows: int = 0
    examples: int = 0
    truncated: int = 0
    dropped_no_supervised_token: int = 0
    dropped_too_long: int = 0
    skipped_bad_rows: int = 0
    mask_audit: dict = dataclasses.field(default_factory=dict)  # MaskAudit's fields, summed over the rows
    # file -> format -> rows read in it (detected under data.format=auto), malformed rows included once they parse as
    # a JSON object: a file read in a format it was not meant for shows here
    formats: dict[str, dict[str, int]] = dataclasses.field(default_factory=dict)

    def describe(self, split: str, max_length: int, unit: str = "examples") -> str:
        text = f"{split}: {self.examples} {unit} from {self.rows} rows"
        if self.truncated:
            text += f"; {self.truncated} truncated to fit model.max_length={max_length}"
        if self.dropped_no_supervised_token:
            text += (
                f"; {self.dropped_no_supervised_token} dropped because truncation left no response token "
                f"(raise model.max_length or shorten the prompts)"
            )
        if self.dropped_too_long:
            text += f"; {self.dropped_too_long} dropped as longer than model.max_length (data.truncation=drop)"
        if self.skipped_bad_rows:
            text += f"; {self.skipped_bad_rows} malformed rows skipped (data.on_bad_row=skip)"
        return text

    def describe_formats(self, split: str) -> list[str]:
        """One line per file: "format of data/x.jsonl (train): messages (120 rows)"; a mixed file lists each."""
        lines = []
        for source, counts in self.formats.items():
            found = ", ".join(f"{name} ({n} rows)" for name, n in sorted(counts.items(), key=lambda item: -item[1]))
            lines.append(f"format of {source} ({split}): {found or 'none (no row is a JSON object)'}")
        return lines


AUDIT_ROLES = ("system", "user", "assistant", "end_of_turn", "template")  # template: headers and other added text


@dataclass
class MaskAudit:
    """Which tokens the label masks supervise, by role, over the conversations of a split (measured on each rendered
    conversation before truncation). Under data.train_on=assistant, system, user and template tokens should be 0%
    supervised, assistant content and end-of-turn tokens 100%."""

    tokens: dict[str, int] = dataclasses.field(default_factory=lambda: dict.fromkeys(AUDIT_ROLES, 0))
    supervised: dict[str, int] = dataclasses.field(default_factory=lambda: dict.fromkeys(AUDIT_ROLES, 0))
    conversations: int = 0
    all_supervised: int = 0  # conversations with every token supervised
    unattributed: int = 0  # conversations whose prompt the template rewrites: its tokens are counted as template
    assistant_turns: int = 0  # supervised assistant turns
    turns_ending_supervised: int = 0  # of those, the ones whose end-of-turn token is supervised

    @classmethod
    def merged(cls, audits: list[dict]) -> MaskAudit:
        total = cls()
        for audit in audits:
            if not audit:
                continue
            for role in AUDIT_ROLES:
                total.tokens[role] += audit["tokens"][role]
                total.supervised[role] += audit["supervised"][role]
            for name in (
                "conversations",
                "all_supervised",
                "unattributed",
                "assistant_turns",
                "turns_ending_supervised",
            ):
                setattr(total, name, getattr(total, name) + audit[name])
        return total

    def describe(self, split: str, stats: DatasetStats) -> str:
        shares = ", ".join(
            f"{role} {self.supervised[role] / self.tokens[role]:.1%} of {self.tokens[role]:,}"
            for role in AUDIT_ROLES
            if self.tokens[role]
        )
        ending = self.turns_ending_supervised / max(self.assistant_turns, 1)
        text = (
            f"label mask audit ({split}, {self.conversations} conversations): supervised share of tokens by role: "
            f"{shares}; assistant turns whose end-of-turn token is supervised: {self.turns_ending_supervised} of "
            f"{self.assistant_turns} ({ending:.1%}); conversations with every token supervised: {self.all_supervised}; "
            f"with no supervised token left: {stats.dropped_no_supervised_token}"
        )
        if self.unattributed:
            text += f"; {self.unattributed} with prompt tokens counted as template (the template rewrites prompts)"
        return text

    def problems(self, train_on: str) -> list[str]:
        """What a careful user would want to know: end-of-turn tokens not learned, conversations trained whole."""
        found = []
        if self.turns_ending_supervised < self.assistant_turns:
            found.append(
                f"{self.assistant_turns - self.turns_ending_supervised} assistant turns end without a supervised "
                f"end-of-turn token (the chat template closes them with no special token): the model may not learn "
                f"to stop there"
            )
        if train_on != "all" and self.all_supervised:
            found.append(f"{self.all_supervised} conversations have every token supervised under train_on={train_on}")
        return found


def log_mask_audit(stats: DatasetStats, split: str, train_on: str) -> MaskAudit:
    """Log the label mask audit of a split (and warn about what looks wrong); return it."""
    audit = MaskAudit.merged([stats.mask_audit])
    if audit.conversations:
        logger.info(audit.describe(split, stats))
        for problem in audit.problems(train_on):
            logger.warning(f"label mask audit ({split}): {problem}")
    return audit
