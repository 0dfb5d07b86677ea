"""Generation metrics on hand-written outputs whose scores are worked out by hand in the comments."""

from __future__ import annotations

import pytest

from sftune.eval.metrics import (
    EXTRACTORS,
    METRICS,
    extract_answer,
    is_exact_match,
    is_valid_json,
    json_field_accuracy,
    longest_common_subsequence,
    normalize_answer,
    parse_json,
    rouge_l,
    score_generations,
)
from sftune.infer.types import Generation

GSM8K_REFERENCE = (
    "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n"
    "Natalia sold 48+24 = <<48+24=72>>72 clips altogether in April and May.\n"
    "#### 72"
)


# --- extract_answer ---------------------------------------------------------------------------------------------


def test_full_extractor_strips_the_whole_text() -> None:
    assert extract_answer("  The answer is 42.\n") == "The answer is 42."


def test_last_line_extractor_skips_trailing_blank_lines() -> None:
    assert extract_answer("Let me think.\nThe answer is 7.\n\n   \n", "last_line") == "The answer is 7."
    assert extract_answer(" \n\n", "last_line") is None


def test_after_hashes_takes_the_first_line_after_the_last_marker() -> None:
    assert extract_answer(GSM8K_REFERENCE, "after_hashes") == "72"
    assert extract_answer("#### 1\nretry: #### 2\nthat is all", "after_hashes") == "2"


def test_after_hashes_without_an_answer_is_none() -> None:
    assert extract_answer("Natalia sold 72 clips.", "after_hashes") is None  # no '####'
    assert extract_answer("The answer is ####   \n", "after_hashes") is None  # marker, nothing after it


def test_regex_extractor_takes_group_one_or_the_whole_match() -> None:
    assert extract_answer("so the answer is 12.", "regex", r"answer is (\d+)") == "12"
    assert extract_answer("x 34 y 56", "regex", r"\d+") == "34"  # no group: the first whole match
    assert extract_answer("no digits here", "regex", r"answer is (\d+)") is None


def test_regex_extractor_rejects_a_missing_or_invalid_pattern() -> None:
    with pytest.raises(ValueError, match="needs a pattern"):
        extract_answer("42", "regex")
    with pytest.raises(ValueError, match="invalid answer pattern"):
        extract_answer("42", "regex", r"answer is (\d+")


def test_json_extractor_serialises_canonically() -> None:
    # key order and spacing vanish; the same value always gives the same string
    assert extract_answer('{"b": 1,  "a": [1, 2]}', "json") == '{"a":[1,2],"b":1}'
    assert extract_answer('```json\n{"a": [1, 2], "b": 1}\n```', "json") == '{"a":[1,2],"b":1}'
    assert extract_answer('{"a": 1', "json") is None
    assert extract_answer("null", "json") == "null"  # valid JSON, not a missing answer


def test_unknown_extractor_names_the_valid_ones() -> None:
    with pytest.raises(ValueError, match="after_hashes") as error:
        extract_answer("42", "last_word")
    assert all(name in str(error.value) for name in EXTRACTORS)


# --- normalize_answer and is_exact_match -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("left", "right"),
    [
        ("1,000", "1000"),
        ("12.0", "12"),
        ("12.", "12"),
        ("1,234,567.50", "1234567.5"),
        ("  The  Answer\tis PARIS. ", "the answer is paris"),
    ],
)
def test_equal_answers_normalise_to_the_same_string(left: str, right: str) -> None:
    assert normalize_answer(left) == normalize_answer(right)


def test_normalisation_keeps_different_answers_apart() -> None:
    assert normalize_answer("12.5") != normalize_answer("12")
    assert normalize_answer("1,2") == "1,2"  # a list, not a thousands group
    assert normalize_answer("v1.2.3") == "v1.2.3"  # a version string, not a number
    assert normalize_answer("100") == "100"  # zeros of the integer part stay


def test_exact_match_through_after_hashes_on_gsm8k_text() -> None:
    prediction = "She sold 24 clips in May, so 48 + 24 = 72 in total.\n#### 72"
    assert is_exact_match(prediction, GSM8K_REFERENCE, "after_hashes")
    assert not is_exact_match(prediction.replace("#### 72", "#### 71"), GSM8K_REFERENCE, "after_hashes")


def test_exact_match_after_hashes_normalises_and_falls_back_to_a_bare_reference() -> None:
    assert is_exact_match("1000 - 0 = 1000\n#### 1,000.", "1000", "after_hashes")


def test_exact_match_without_an_answer_in_the_prediction_is_false() -> None:
    assert not is_exact_match("She sold 72 clips.", GSM8K_REFERENCE, "after_hashes")
    assert not is_exact_match("I am not sure.", "42", "regex", r"answer is (\d+)")
    assert not is_exact_match('{"a": 1', '{"a": 1}', "json")


def test_exact_match_with_regex_against_a_bare_reference() -> None:
    assert is_exact_match("So the answer is 42.", "42", "regex", r"answer is (\d+)")


def test_exact_match_with_json_compares_values() -> None:
    # 1 == 1.0 and key order does not matter; true is not 1
    assert is_exact_match('{"a": 1, "b": [true]}', '```json\n{"b": [true], "a": 1.0}\n```', "json")
    assert not is_exact_match('{"a": true}', '{"a": 1}', "json")


def test_exact_match_with_full_text_is_case_and_space_insensitive() -> None:
    assert is_exact_match("  Paris.\n", "paris")
    assert not is_exact_match("The capital is Paris.", "Paris")


# --- JSON ---------------------------------------------------------------------------------------------------------


def test_parse_json_accepts_bare_and_fenced_values() -> None:
    assert parse_json(' {"a": 1} \n') == {"a": 1}
    assert parse_json('```json\n{"a": 1}\n```') == {"a": 1}
    assert parse_json("```\n[1, 2]\n```") == [1, 2]


@pytest.mark.parametrize(
    "text",
    [
        '{"a": 1} Hope this helps!',  # trailing prose
        'Here it is:\n```json\n{"a": 1}\n```',  # prose around the fenced block
        '```json\n{"a": 1}\n```\n```json\n{"b": 2}\n```',  # two blocks
        '{"a": 1',  # truncated at max_new_tokens
        '{"a": NaN}',  # Python's json accepts NaN; JSON does not
        "",
    ],
)
def test_parse_json_rejects_anything_but_one_json_value(text: str) -> None:
    assert parse_json(text) is None
    assert not is_valid_json(text)


def test_null_is_valid_json() -> None:
    assert is_valid_json("null")


REFERENCE_RECORD = '{"name": "Ada", "age": 36, "lang": "en"}'


def test_json_field_accuracy_counts_matching_top_level_fields() -> None:
    # name matches, age matches (36 == 36.0), lang differs: 2 of 3
    assert json_field_accuracy('{"name": "Ada", "age": 36.0, "lang": "fr"}', REFERENCE_RECORD) == pytest.approx(2 / 3)
    # a missing key counts as wrong, an extra key does not
    assert json_field_accuracy('{"name": "Ada", "age": 36}', REFERENCE_RECORD) == pytest.approx(2 / 3)
    assert json_field_accuracy('{"name": "Ada", "age": 36, "lang": "en", "x": 0}', REFERENCE_RECORD) == 1.0


def test_json_field_accuracy_compares_types() -> None:
    assert json_field_accuracy('{"age": "36"}', '{"age": 36}') == 0.0
    assert json_field_accuracy('{"ok": true}', '{"ok": 1}') == 0.0
    assert json_field_accuracy('{"tags": ["a", "b"]}', '{"tags": ["b", "a"]}') == 0.0  # list order matters


def test_json_field_accuracy_of_an_invalid_or_non_object_prediction_is_zero() -> None:
    assert json_field_accuracy("Ada, 36, en", REFERENCE_RECORD) == 0.0
    assert json_field_accuracy('{"name": "Ada"', REFERENCE_RECORD) == 0.0
    assert json_field_accuracy('["Ada", 36, "en"]', REFERENCE_RECORD) == 0.0


def test_json_field_accuracy_without_an_object_reference_does_not_apply() -> None:
    assert json_field_accuracy('{"a": 1}', "[1, 2]") is None
    assert json_field_accuracy('{"a": 1}', "Paris") is None
    assert json_field_accuracy('{"a": 1}', "{}") is None


# --- ROUGE-L ------------------------------------------------------------------------------------------------------


def test_longest_common_subsequence_on_the_textbook_example() -> None:
    assert longest_common_subsequence(list("ABCBDAB"), list("BDCABA")) == 4  # e.g. BCBA
    assert longest_common_subsequence([], list("ABC")) == 0


def test_rouge_l_on_hand_computed_cases() -> None:
    # LCS "the cat on the mat" = 5; P = 5/6, R = 5/5; F1 = 2PR / (P + R) = 10/11
    assert rouge_l("the cat sat on the mat", "the cat on the mat") == pytest.approx(10 / 11)
    # a subsequence need not be contiguous: LCS "a b c" = 3; F1 = 2*3 / (5 + 3)
    assert rouge_l("a x b y c", "a b c") == pytest.approx(0.75)
    # but order matters: reversed, only one word can be in a common subsequence; F1 = 2*1 / (4 + 4)
    assert rouge_l("a b c d", "d c b a") == pytest.approx(0.25)


def test_rouge_l_bounds() -> None:
    assert rouge_l("The Cat, sat!", "the cat sat") == 1.0  # lowercased word tokens, punctuation dropped
    assert rouge_l("red green", "blue yellow") == 0.0
    assert rouge_l("", "!!!") == 1.0  # no words on either side
    assert rouge_l("", "the cat") == 0.0
    assert rouge_l("the cat", "") == 0.0


@pytest.mark.parametrize(
    ("left", "right"),
    [("the cat sat on the mat", "the cat on the mat"), ("a b c d", "b d a c"), ("x y x y", "y x"), ("a", "")],
)
def test_rouge_l_is_symmetric(left: str, right: str) -> None:
    assert rouge_l(left, right) == rouge_l(right, left)


# --- score_generations --------------------------------------------------------------------------------------------


def make_generation(id: str, reference: str | None, output: str, finished: bool, num_tokens: int) -> Generation:
    return Generation(id=id, prompt="q", reference=reference, output=output, finished=finished, num_tokens=num_tokens)


GENERATIONS = [
    make_generation("g1", "Paris", "paris.", finished=True, num_tokens=3),
    make_generation("g2", '{"a": 1, "b": 2}', '{"a": 1, "b": 3}', finished=True, num_tokens=10),
    make_generation("g3", None, '{"a": 1', finished=False, num_tokens=20),  # truncated, no reference
]


def test_score_generations_averages_each_metric_over_the_rows_it_applies_to() -> None:
    aggregate, per_row = score_generations(GENERATIONS)
    assert aggregate == pytest.approx(
        {
            "exact_match": 1 / 2,  # g1 right, g2 wrong; g3 has no reference
            "json_valid": 1 / 3,  # only g2 parses
            "json_fields": 1 / 2,  # only g2's reference is an object: a matches, b does not
            "rouge_l": (1.0 + 0.75) / 2,  # g2: words a 1 b 3 vs a 1 b 2, LCS 3, F1 = 6/8
            "stop_rate": 2 / 3,
            "mean_length": 11.0,
            "rows": 3,
        }
    )
    assert [row["id"] for row in per_row] == ["g1", "g2", "g3"]
    assert per_row[0] == {
        "id": "g1",
        "exact_match": True,
        "json_valid": False,
        "rouge_l": 1.0,
        "stop_rate": True,
        "mean_length": 3,
    }
    assert per_row[2] == {"id": "g3", "json_valid": False, "stop_rate": False, "mean_length": 20}


def test_score_generations_reports_none_for_metrics_that_apply_to_no_row() -> None:
    rows = [make_generation("g1", None, "x", True, 1), make_generation("g2", None, "y", False, 2)]
    aggregate, per_row = score_generations(rows, metrics=("exact_match", "stop_rate"))
    assert aggregate == {"exact_match": None, "stop_rate": 0.5, "rows": 2}
    assert per_row == [{"id": "g1", "stop_rate": True}, {"id": "g2", "stop_rate": False}]
    assert score_generations([])[0] == {**dict.fromkeys(METRICS), "rows": 0}


def test_score_generations_passes_the_extractor_on() -> None:
    rows = [make_generation("g1", GSM8K_REFERENCE, "24 + 48 = 72\n#### 72", True, 9)]
    aggregate, _ = score_generations(rows, metrics=("exact_match",), extractor="after_hashes")
    assert aggregate["exact_match"] == 1.0


def test_score_generations_rejects_unknown_names_before_scoring() -> None:
    with pytest.raises(ValueError, match="'bleu'") as error:
        score_generations(GENERATIONS, metrics=("exact_match", "bleu"))
    assert all(name in str(error.value) for name in METRICS)
    with pytest.raises(ValueError, match="needs a pattern"):
        score_generations([], metrics=("exact_match",), extractor="regex")
