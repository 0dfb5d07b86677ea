"""Shared fixtures: offline, single-threaded, tiny models built from configs, real tokenizers from ../shared; and
each test's tier (pytest_collection_modifyitems below)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"

# ------------------------------------------------------------------------------------------------------ test tiers
# Every test gets exactly one tier, by this rule:
#   slow         marked @pytest.mark.slow at the test (or `pytestmark` of its file): it loads the real default
#                model, kills and resumes a run for minutes, builds and installs a wheel, ...;
#   integration  marked @pytest.mark.integration at the test, or in a folder of INTEGRATION_FOLDERS: it trains a
#                tiny model end to end (train(), train_dpo()) or runs the CLI, in process or in a subprocess;
#   unit         everything else.
# tests/test_tiers.py checks that a file outside those folders which trains or runs the CLI marks those tests.
# `make test` runs unit + integration (-m "not slow"), `make test-slow` the slow tier; `pytest -m unit` is the quick
# loop while editing a component.
TIERS = ("unit", "integration", "slow")
INTEGRATION_FOLDERS = {
    "tests/e2e/": "the command line, end to end",
    "tests/recipes/": "the recipes: training runs on a tiny model",
}


def tier_of(item: pytest.Item) -> str:
    marked = [tier for tier in TIERS if item.get_closest_marker(tier)]
    if len(marked) > 1:
        raise pytest.UsageError(f"{item.nodeid} is marked {' and '.join(marked)}: a test has one tier, keep one mark")
    if marked:
        return marked[0]
    path = item.path.resolve().relative_to(REPO).as_posix()
    return "integration" if path.startswith(tuple(INTEGRATION_FOLDERS)) else "unit"


@pytest.hookimpl(tryfirst=True)  # before -m deselects by these marks
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        item.add_marker(tier_of(item))


def shared_path(*parts: str) -> Path:
    """A file in ../shared, or a skip with the reason when this checkout has none beside it."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} not present (../shared is only beside CI and developer checkouts)")
    return path


CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello! How are you? I am fine, thank you.",
    'Extract the JSON: name, city, quantity. {"item": "lamp", "quantity": 3}',
    "### Instruction: ### Input: ### Response: system user assistant",
    "0 1 2 3 4 5 6 7 8 9 10 42 100",
]


def build_tiny_tokenizer(out_dir: Path) -> Path:
    """A byte-level BPE tokenizer with ChatML special tokens and pad == eos (the classic EOS-masking trap)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from sftune.data.templates import read_builtin

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(CORPUS * 5, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|im_end|>", unk_token="<|endoftext|>"
    )
    fast.add_special_tokens({"additional_special_tokens": ["<|im_start|>"]})
    fast.chat_template = read_builtin("chatml")
    fast.save_pretrained(out_dir)
    return out_dir


def build_tiny_model(out_dir: Path, tokenizer_dir: Path, seed: int = 0, **sizes: int) -> Path:
    """A 2-layer Llama with random weights, saved with its tokenizer: a real HF folder in a few KB (`sizes`
    overrides hidden_size, intermediate_size, ...)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
    )
    config.update(sizes)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("tiny")
    return build_tiny_model(root / "model", build_tiny_tokenizer(root / "tokenizer"))


@pytest.fixture(scope="session")
def smollm2_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(shared_path("tokenizers", "smollm2"))
