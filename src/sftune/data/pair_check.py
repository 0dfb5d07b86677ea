"""`sftune data check` for preference pairs: counts, lengths and the mask checks on each branch.

The pairs are built by `data.preference.build_pair_examples`, the call the DPO recipe trains from, and the SFT mask
checks (`data.check.check_mask`) run on the chosen and on the rejected branch separately, as built (before a long
pair's prompt is cut). Rows whose chosen and rejected are identical, or whose prompts differ between branches,
are rejections with their reason, like every other dropped row.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING, Any

from sftune.data.check import MASKING_METHOD, CheckResult, check_mask, percentiles, render_check_line
from sftune.data.preference import BuiltPairs, PairExample, build_pair_examples, read_pairs
from sftune.data.templates import ChatTemplate
from sftune.data.types import Rejection

if TYPE_CHECKING:
    from sftune.config import Config

BRANCHES = ("chosen", "rejected")


@dataclass
class PairReport:
    pairs_in: int
    pairs_kept: int
    rejected_by_reason: dict[str, int]
    prompts_truncated: int  # pairs whose prompt lost its oldest tokens to fit data.max_length
    tokens: dict[str, dict[str, int]]  # chosen / rejected -> total, supervised
    lengths: dict[str, dict[str, int]]  # prompt / chosen / rejected response -> p50, p90, p99, max
    checks: list[CheckResult]  # each mask check once per branch, named 'chosen.<check>' / 'rejected.<check>'
    template: dict[str, Any]
    rejections: list[Rejection] = field(default_factory=list, repr=False)
    pairs: list[PairExample] = field(default_factory=list, repr=False)

    def failed_checks(self, names: tuple[str, ...] | None = None) -> list[CheckResult]:
        """Failed checks (whose name without its branch is one of `names`, or all); warnings are not failures."""
        return [
            c for c in self.checks
            if not c.passed and not c.warning and (names is None or c.name.split(".", 1)[1] in names)
        ]  # fmt: skip

    def to_dict(self) -> dict[str, Any]:
        result = asdict(replace(self, rejections=[], pairs=[]))
        del result["rejections"], result["pairs"]
        return result

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def to_text(self) -> str:
        rejected = ", ".join(f"{k}: {v}" for k, v in self.rejected_by_reason.items()) or "none"
        return "\n".join([
            f"pairs: {self.pairs_in} in = {self.pairs_kept} kept + {len(self.rejections)} rejected ({rejected}); "
            f"{self.prompts_truncated} prompts truncated from the left to fit",
            *(f"tokens ({name}): {t['total']} total, {t['supervised']} supervised" for name, t in self.tokens.items()),
            "lengths (p50 / p90 / p99 / max):",
            *(f"  {name:<9}{' / '.join(str(v) for v in p.values())}" for name, p in self.lengths.items()),
            f"template: {self.template['name']} (mask last_assistant on each branch; masking by "
            f"{self.template['masking']})",
            "checks (each branch):",
            *(render_check_line(c) for c in self.checks),
        ])  # fmt: skip


def check_pair_data(config: Config, tokenizer: Any, template: ChatTemplate) -> PairReport:
    """Read config.data.train as `sftune dpo` reads it, build every pair, report on all of it."""
    pairs, rejected = read_pairs(config.data.train, config.data.system_prompt)
    built = build_pair_examples(pairs, tokenizer, template, config.data.max_length, config.data.truncation)
    return build_pair_report(built, rejected, tokenizer, template)


def build_pair_report(
    built: BuiltPairs, read_rejections: list[Rejection], tokenizer: Any, template: ChatTemplate
) -> PairReport:
    """The report on pairs `build_pair_examples` made, and on rows dropped on reading; it keeps the pairs."""
    rejections = read_rejections + built.rejections
    checks = []
    for branch in BRANCHES:
        for check in check_mask(getattr(built, branch), tokenizer, template, "last_assistant"):
            checks.append(replace(check, name=f"{branch}.{check.name}"))
    pairs = built.pairs
    return PairReport(
        pairs_in=len(pairs) + len(rejections),
        pairs_kept=len(pairs),
        rejected_by_reason=dict(Counter(r.reason for r in rejections)),
        prompts_truncated=built.prompts_truncated,
        tokens={
            branch: {
                "total": sum(len(getattr(p, branch).input_ids) for p in pairs),
                "supervised": sum(getattr(p, branch).num_supervised for p in pairs),
            }
            for branch in BRANCHES
        },  # fmt: skip
        lengths={
            "prompt": percentiles([len(p.chosen.input_ids) - p.chosen.num_supervised for p in pairs]),
            "chosen": percentiles([p.chosen.num_supervised for p in pairs]),
            "rejected": percentiles([p.rejected.num_supervised for p in pairs]),
        },
        checks=checks,
        template={"name": template.describe(), "masking": MASKING_METHOD},
        rejections=rejections,
        pairs=pairs,
    )
