"""Generation metrics for `sftune eval`: a fine-tuned model's outputs on held-out rows, compared with references.

Pure Python on purpose: scoring runs after generation, on strings, and must give the same numbers on any
machine. Each metric is a small function on one (prediction, reference) pair; `score_generations` applies the
requested ones to every row and averages each over the rows where it applies.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from typing import Any

from sftune.config import EXTRACTOR_NAMES, METRIC_NAMES
from sftune.infer.types import Generation

__all__ = [
    "EXTRACTORS",
    "METRICS",
    "check_extractor",
    "check_metrics",
    "extract_answer",
    "is_exact_match",
    "is_valid_json",
    "json_field_accuracy",
    "longest_common_subsequence",
    "normalize_answer",
    "parse_json",
    "rouge_l",
    "score_generations",
]

EXTRACTORS = EXTRACTOR_NAMES  # the config schema's lists: one set of names for the schema, the CLI and scoring
METRICS = METRIC_NAMES

# An integer, optionally grouped in thousands ("1,000,000"), optionally with a decimal part. The lookarounds
# keep it off parts of identifiers and version strings ("v1.2.3", "x86").
_NUMBER = re.compile(r"(?<![\w.])(\d{1,3}(?:,\d{3})+|\d+)(?:\.(\d+))?(?!\w|\.\d)")
# One fenced block and nothing around it: models often wrap JSON in markdown even when asked not to.
_FENCED_BLOCK = re.compile(r"```(?:json)?[ \t]*\n(.*?)\n[ \t]*```", re.DOTALL | re.IGNORECASE)
_WORD = re.compile(r"\w+")
_INVALID = object()  # parse failure; distinct from None, which is the valid JSON value `null`


# ---------------------------------------------------------------------------------------------------------------
# Answer extraction and normalisation


def check_extractor(extractor: str, pattern: str | None = None) -> re.Pattern[str] | None:
    """Fail before any scoring on a bad extractor or regex; return the compiled pattern for `regex`."""
    if extractor not in EXTRACTORS:
        raise ValueError(f"unknown answer extractor {extractor!r}: choose one of {', '.join(EXTRACTORS)}")
    if extractor != "regex":
        return None
    if not pattern:
        raise ValueError(
            "the 'regex' extractor needs a pattern, e.g. r'answer is (\\d+)': group 1 is the answer when the "
            "pattern has a group, else the whole match"
        )
    try:
        return re.compile(pattern)
    except re.error as error:
        raise ValueError(f"invalid answer pattern {pattern!r}: {error}") from error


def extract_answer(text: str, extractor: str = "full", pattern: str | None = None) -> str | None:
    """The part of an output that holds the answer, or None when the output has none."""
    compiled = check_extractor(extractor, pattern)
    if extractor == "full":
        return text.strip()
    if extractor == "last_line":
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        return lines[-1] if lines else None
    if extractor == "after_hashes":
        return _extract_after_hashes(text)
    if extractor == "regex":
        assert compiled is not None  # check_extractor compiles the pattern for this extractor
        return _extract_regex(text, compiled)
    value = _parse_json_value(text)
    return None if value is _INVALID else _dump_canonical_json(value)


def _extract_after_hashes(text: str) -> str | None:
    """GSM8K style: the answer follows the last '####'; an empty remainder counts as no answer."""
    if "####" not in text:
        return None
    remainder = text.rsplit("####", 1)[1].strip()
    return remainder.splitlines()[0].strip() if remainder else None


def _extract_regex(text: str, compiled: re.Pattern[str]) -> str | None:
    match = compiled.search(text)
    if match is None:
        return None
    answer = match.group(1) if compiled.groups else match.group(0)
    return None if answer is None else answer.strip()  # an optional group that did not take part


def _dump_canonical_json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def normalize_answer(text: str) -> str:
    """Make equal answers equal strings: case, spacing, a sentence's final period, "1,000" vs "1000.0"."""
    text = " ".join(text.casefold().split())
    text = text.rstrip(".").rstrip()
    return _NUMBER.sub(_normalize_number, text)


def _normalize_number(match: re.Match[str]) -> str:
    integer = match.group(1).replace(",", "")
    fraction = (match.group(2) or "").rstrip("0")  # "12.50" -> "12.5", "12.0" -> "12"
    return f"{integer}.{fraction}" if fraction else integer


def is_exact_match(prediction: str, reference: str, extractor: str = "full", pattern: str | None = None) -> bool:
    """Whether the prediction's answer equals the reference's, after the same extraction and normalisation.

    References are often the bare answer ("42") while predictions carry reasoning around it, so a reference
    the extractor finds nothing in counts as a whole answer. A prediction with no answer is simply wrong.
    """
    predicted = extract_answer(prediction, extractor, pattern)
    if predicted is None:
        return False
    if extractor == "json":  # compare values, so key order, spacing and 1 vs 1.0 do not matter
        expected = _parse_json_value(reference)
        return expected is not _INVALID and _is_json_equal(json.loads(predicted), expected)
    expected_answer = extract_answer(reference, extractor, pattern)
    if expected_answer is None:
        expected_answer = reference.strip()
    return normalize_answer(predicted) == normalize_answer(expected_answer)


# ---------------------------------------------------------------------------------------------------------------
# JSON outputs


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _parse_json_value(text: str) -> Any:
    """The JSON value of a whole output (bare or in one fenced block), or _INVALID."""
    stripped = text.strip()
    fenced = _FENCED_BLOCK.fullmatch(stripped)
    if fenced is not None:
        stripped = fenced.group(1)
    try:
        # parse_constant: Python's json accepts NaN and Infinity, which strict JSON parsers reject
        return json.loads(stripped, parse_constant=_reject_constant)
    except ValueError:  # json.JSONDecodeError is a ValueError
        return _INVALID


def parse_json(text: str) -> Any | None:
    """The JSON value of the output, or None when it is not JSON (an output of `null` also gives None).

    Strict on purpose: a structured-output task is only done when a parser can take the output as it is, so
    trailing prose or a truncated object is invalid. One fenced block is the only wrapper accepted.
    """
    value = _parse_json_value(text)
    return None if value is _INVALID else value


def is_valid_json(text: str) -> bool:
    return _parse_json_value(text) is not _INVALID


def _is_json_equal(left: Any, right: Any) -> bool:
    """JSON equality: 1 equals 1.0, but true is not 1 (Python's == says it is) and "1" is not 1."""
    if isinstance(left, bool) or isinstance(right, bool):
        return isinstance(left, bool) and isinstance(right, bool) and left == right
    if isinstance(left, (int, float)) and isinstance(right, (int, float)):
        return left == right
    if isinstance(left, dict) and isinstance(right, dict):
        return left.keys() == right.keys() and all(_is_json_equal(left[key], right[key]) for key in left)
    if isinstance(left, list) and isinstance(right, list):
        return len(left) == len(right) and all(map(_is_json_equal, left, right))
    return type(left) is type(right) and left == right


def json_field_accuracy(prediction: str, reference: str) -> float | None:
    """Share of the reference object's top-level fields that the prediction reproduces exactly.

    None when the metric does not apply (the reference is not a non-empty JSON object); 0.0 when it applies
    and the prediction is not a JSON object, since then no field can be read from it.
    """
    expected = _parse_json_value(reference)
    if not isinstance(expected, dict) or not expected:
        return None
    predicted = _parse_json_value(prediction)
    if not isinstance(predicted, dict):
        return 0.0
    correct = sum(key in predicted and _is_json_equal(predicted[key], value) for key, value in expected.items())
    return correct / len(expected)


# ---------------------------------------------------------------------------------------------------------------
# Overlap


def _tokenize_words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def longest_common_subsequence(left: Sequence[str], right: Sequence[str]) -> int:
    """Length of the LCS by the standard dynamic programme, keeping two rows: O(len(right)) memory."""
    previous = [0] * (len(right) + 1)
    for left_token in left:
        current = [0] * (len(right) + 1)
        for j, right_token in enumerate(right, start=1):
            if left_token == right_token:
                current[j] = previous[j - 1] + 1
            else:
                current[j] = max(previous[j], current[j - 1])
        previous = current
    return previous[-1]


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F1 on lowercased word tokens: 2 * LCS / (prediction words + reference words)."""
    predicted, expected = _tokenize_words(prediction), _tokenize_words(reference)
    if not predicted and not expected:
        return 1.0
    if not predicted or not expected:
        return 0.0
    # F1 = 2PR / (P + R) with P = lcs / len(predicted), R = lcs / len(expected), simplified
    return 2 * longest_common_subsequence(predicted, expected) / (len(predicted) + len(expected))


# ---------------------------------------------------------------------------------------------------------------
# Scoring a run


def check_metrics(metrics: Sequence[str]) -> None:
    unknown = [name for name in metrics if name not in METRICS]
    if unknown:
        raise ValueError(f"unknown eval metric(s) {', '.join(map(repr, unknown))}: choose from {', '.join(METRICS)}")


def _score_metric(metric: str, generation: Generation, extractor: str, pattern: str | None) -> bool | float | None:
    """One metric on one generation; None where it does not apply (no reference, or not a JSON object)."""
    reference = generation.reference
    if metric == "json_valid":
        return is_valid_json(generation.output)
    if metric == "stop_rate":
        return generation.finished
    if metric == "mean_length":
        return generation.num_tokens
    if reference is None:
        return None
    if metric == "exact_match":
        return is_exact_match(generation.output, reference, extractor, pattern)
    if metric == "json_fields":
        return json_field_accuracy(generation.output, reference)
    return rouge_l(generation.output, reference)


def score_generations(
    generations: Sequence[Generation],
    metrics: Sequence[str] = METRICS,
    extractor: str = "full",
    pattern: str | None = None,
) -> tuple[dict[str, float | None], list[dict[str, Any]]]:
    """Per-row metric values and their means; a metric's mean is None when it applies to no row.

    Each metric is averaged over the rows where it applies, so rows without a reference lower neither exact
    match nor ROUGE-L. Arguments are checked first: a typo fails before any row is scored.
    """
    check_metrics(metrics)
    if "exact_match" in metrics:
        check_extractor(extractor, pattern)
    per_row: list[dict[str, Any]] = []
    for generation in generations:
        row: dict[str, Any] = {"id": generation.id}
        for metric in metrics:
            value = _score_metric(metric, generation, extractor, pattern)
            if value is not None:
                row[metric] = value
        per_row.append(row)
    aggregate: dict[str, float | None] = {}
    for metric in metrics:
        values = [row[metric] for row in per_row if metric in row]
        aggregate[metric] = sum(values) / len(values) if values else None
    aggregate["rows"] = len(generations)
    return aggregate, per_row
