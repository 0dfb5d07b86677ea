"""Pre-flight memory estimate for full, LoRA and QLoRA fine-tuning, from the model config alone.

Model knowledge lives here: the projections of a Llama/Qwen-style decoder block and their shapes, which of
them `lora.target_modules` adapts (PEFT's rule: a module matches when its name ends with a listed name), what
the optimizer keeps per trainable weight, and what backward keeps per token.
"""

from __future__ import annotations

from typing import Any

from sftune.config import Config
from sftune.model.lean_activations import is_used as is_lean

# Python + torch + transformers + peft after import, before any model (CPU, measured by bench/methods.py).
RUNTIME_BYTES = int(0.35 * 1024**3)
GIB = 1024**3
CHUNK_LOGITS_BYTES = 8 * 1024 * 1024 * 4  # training/loss.py CHUNK_LOGITS fp32 values (a test keeps them equal)
MOMENT_SLICE_BYTES = 64 * 1024 * 1024  # host/offload.py's slice of AdamW moments (a test keeps them equal)
# What the estimate leaves out (allocator pages, autograd's bookkeeping): the measured peak of full fine-tuning sits
# above it (bench/results/memory_limit.md); deciding to offload is cheaper than being killed for memory.
ESTIMATE_MARGIN = 1.25


def block_linears(model_config: Any) -> dict[str, tuple[int, int]]:
    """(in_features, out_features) of each linear in one decoder block, by module name."""
    hidden, inter = model_config.hidden_size, model_config.intermediate_size
    heads = model_config.num_attention_heads
    head_dim = getattr(model_config, "head_dim", None) or hidden // heads
    kv_dim = (getattr(model_config, "num_key_value_heads", None) or heads) * head_dim
    return {
        "q_proj": (hidden, heads * head_dim),
        "k_proj": (hidden, kv_dim),
        "v_proj": (hidden, kv_dim),
        "o_proj": (heads * head_dim, hidden),
        "gate_proj": (hidden, inter),
        "up_proj": (hidden, inter),
        "down_proj": (inter, hidden),
    }


def lora_targets(model_config: Any, target_modules: list[str] | str) -> tuple[list[str], list[str]]:
    """(block linears that get adapters, listed names that match none of them). all-linear = every block linear."""
    names = list(block_linears(model_config))
    if target_modules == "all-linear":
        return names, []
    wanted = [target_modules] if isinstance(target_modules, str) else list(target_modules)
    matched = [name for name in names if any(_matches(t, name) for t in wanted)]
    unknown = [t for t in wanted if not any(_matches(t, name) for name in names)]
    return matched, unknown


def _matches(target: str, name: str) -> bool:
    """A listed target names this block linear: 'q_proj', or a longer path ending in it ('self_attn.q_proj')."""
    return target == name or target.endswith(f".{name}")


def count_model_parameters(model_config: Any) -> dict[str, int]:
    """Parameters of a Llama/Qwen-style decoder from its config: embeddings, attention, gated MLP, norms."""
    layers, hidden, vocab = model_config.num_hidden_layers, model_config.hidden_size, model_config.vocab_size
    linear = layers * sum(i * o for i, o in block_linears(model_config).values())
    embeddings = vocab * hidden * (1 if getattr(model_config, "tie_word_embeddings", False) else 2)
    norms = layers * 2 * hidden + hidden
    return {"total": embeddings + linear + norms, "linear": linear, "embeddings": embeddings, "norms": norms}


def count_lora_parameters(model_config: Any, rank: int, target_modules: list[str] | str = "all-linear") -> int:
    """Adapter parameters: r x (in + out) for each targeted linear of every block."""
    shapes = block_linears(model_config)
    targets, _ = lora_targets(model_config, target_modules)
    return int(model_config.num_hidden_layers * rank * sum(sum(shapes[name]) for name in targets))


def estimate_activation_bytes(
    model_config: Any,
    tokens: int,
    gradient_checkpointing: bool,
    sequence_length: int,
    padding_free: bool = True,
    lean: bool = False,
) -> int:
    """fp32 tensors kept for backward, per token: ~(10 hidden + 4 intermediate) per layer; with lean activations
    (model/lean_activations.py) the block's input, its attention output and the output of each of its linears (LoRA's
    rank-r products aside); with padded batches also the attention scores and probabilities (heads x sequence
    length; padding-free rows use the fused kernel, which keeps neither). Logits: one chunk of the chunked head +
    loss (training/loss.py; its softmax and gradient are written over it)."""
    hidden, inter, layers = model_config.hidden_size, model_config.intermediate_size, model_config.num_hidden_layers
    scores = 0 if padding_free else 2 * model_config.num_attention_heads * sequence_length
    linears = block_linears(model_config)  # lean: input + attention output (o_proj's input) + every linear's output
    kept = hidden + linears["o_proj"][0] + sum(out for _, out in linears.values()) if lean else 10 * hidden + 4 * inter
    per_layer = kept * 4 + scores * 4
    kept_layers = 1 if gradient_checkpointing else layers
    checkpoints = layers * hidden * 4 if gradient_checkpointing else 0
    return int(tokens * (kept_layers * per_layer + checkpoints) + CHUNK_LOGITS_BYTES)


def estimate_dropout_bytes(model_config: Any, tokens: int, config: Config) -> int:
    """LoRA dropout keeps its own copy of each adapted linear's input, and its mask: in_features values per
    targeted linear, layer and token, 4 bytes each plus a 1-byte mask."""
    if not config.lora.dropout:
        return 0
    shapes = block_linears(model_config)
    targets, _ = lora_targets(model_config, config.lora.target_modules)
    layers = 1 if config.train.gradient_checkpointing is True else model_config.num_hidden_layers
    return int(tokens * layers * sum(shapes[name][0] for name in targets) * 5)


def estimate_memory(
    model_config: Any,
    config: Config,
    micro_batch_tokens: int,
    sequence_length: int | None = None,
    world_size: int = 1,
) -> dict[str, Any]:
    """Pre-flight peak memory (GiB) for full, LoRA and QLoRA fine-tuning.

    Peak = runtime + the larger of loading (on CPU the checkpoint's mapped pages and the materialised weights
    are resident together) and training: weights, AdamW state, the larger of the activations of the longest
    micro-batch and the gradients (gradients are freed between steps and fill in as backward frees the
    activations), and for LoRA/QLoRA the adapters of the targeted modules and their dropout copies. QLoRA
    loads the base in full precision first.

    Per process of a `world_size` run (train.strategy): ddp keeps everything above on every rank, plus its
    gradient buckets (one more copy of the trainable gradients); fsdp2 divides weights, gradients and optimizer
    state by the world size and adds the layers it gathers whole (one in use, one prefetched). Activations are per
    rank already (micro_batch_size is per rank); every rank loads the whole checkpoint before sharding.
    """
    length = sequence_length or micro_batch_tokens // config.train.micro_batch_size
    params = count_model_parameters(model_config)
    targets, unknown = lora_targets(model_config, config.lora.target_modules)
    adapter = count_lora_parameters(model_config, config.lora.r, config.lora.target_modules)
    gc_on = config.train.gradient_checkpointing is True  # resolved by training/settings.py ("auto" counts as off)
    lean = is_lean(config.train)
    activations = estimate_activation_bytes(
        model_config, micro_batch_tokens, gc_on, length, config.train.padding_free, lean
    )
    # a lean block recomputes LoRA dropout's copies in backward (model/lean_activations.py): it keeps none
    dropout = 0 if lean else estimate_dropout_bytes(model_config, micro_batch_tokens, config)
    adapter_activations = activations + dropout
    base_bytes = 2 if config.train.precision == "bf16-true" else 4  # the weights as trained (model/setup.py)
    frozen_linear_bytes = 2 if config.lora.base_dtype == "bf16" else base_bytes  # lora: model/frozen_base.py
    loading = params["total"] * (checkpoint_bytes_per_parameter(model_config) + base_bytes)
    offloaded = config.train.offload_optimizer_state is True  # AdamW moments in a file (host/offload.py)
    moment_bytes = 0 if offloaded else 8  # per trainable weight, resident through forward and backward
    # the update of an offloaded optimizer holds one slice of moments: MOMENT_SLICE_BYTES, or the largest tensor's
    update_slice = max(MOMENT_SLICE_BYTES, model_config.vocab_size * model_config.hidden_size * 8) if offloaded else 0
    adapter_state = adapter * (8 + moment_bytes)  # fp32 weights + grads (+ 2 AdamW states)
    nf4 = params["linear"] * (0.5 + 1 / 64 + 4 / (64 * 256))  # 4-bit + double-quantized blockwise scales
    strategy = strategy_for(config, world_size)
    shards = world_size if strategy == "fsdp2" else 1
    layer = params["linear"] // model_config.num_hidden_layers
    gathered = {"full": 2 * layer * 4, "lora": 2 * layer * frozen_linear_bytes, "qlora": 2 * layer * 0.5}
    gathered = gathered if strategy == "fsdp2" else dict.fromkeys(gathered, 0)
    buckets = {"full": params["total"] * 4, "lora": adapter * 4, "qlora": adapter * 4}
    buckets = buckets if strategy == "ddp" else dict.fromkeys(buckets, 0)
    training = {
        # fp32 weights (+ 2 AdamW states), then activations (forward) or gradients (end of backward, and the update
        # with its slice of offloaded moments), whichever is larger
        "full": params["total"] * (4 + moment_bytes) / shards
        + max(activations, params["total"] * 4 / shards + update_slice),
        "lora": (
            (params["total"] - params["linear"]) * base_bytes + params["linear"] * frozen_linear_bytes + adapter_state
        )
        / shards
        + adapter_activations,
        "qlora": (nf4 + (params["embeddings"] + params["norms"]) * base_bytes + adapter_state) / shards
        + adapter_activations,
    }
    training = {method: value + gathered[method] + buckets[method] for method, value in training.items()}
    return {
        "strategy": strategy,
        "world_size": world_size,
        "parameters": params["total"],
        "lora_rank": config.lora.r,
        "lora_target_modules": targets,
        **({"lora_targets_not_counted": unknown} if unknown else {}),
        "lora_parameters": adapter,
        "micro_batch_tokens": micro_batch_tokens,
        "runtime_gib": round(RUNTIME_BYTES / GIB, 3),
        "loading_gib": round(loading / GIB, 3),
        "activations_gib": round(activations / GIB, 3),
        **{f"{method}_gib": round((RUNTIME_BYTES + max(loading, t)) / GIB, 3) for method, t in training.items()},
        "optimizer_state_offloaded": offloaded,
        "assumptions": "peak per process = runtime + max(loading, training); full: fp32 weights + 2 AdamW states + "
        "activations (offloaded states: one slice of them in the update); LoRA: frozen base linears at "
        "lora.base_dtype, other weights as trained (bf16 under bf16-true, else fp32) + adapter state of the "
        "targeted modules + activations + dropout copies; QLoRA: NF4 block linears, other weights as trained, "
        "loaded in full precision first; ddp: + gradient buckets; fsdp2: weights and states / world size + 2 "
        "gathered layers",
    }


def strategy_for(config: Config, world_size: int) -> str:
    """single (one process), or the strategy a run of `world_size` processes uses (train.strategy; auto = ddp)."""
    if world_size <= 1:
        return "single"
    return "ddp" if config.train.strategy == "auto" else config.train.strategy


def checkpoint_bytes_per_parameter(model_config: Any) -> int:
    """Bytes per weight in the checkpoint file (its config's dtype; bf16 when it does not say)."""
    dtype = str(getattr(model_config, "dtype", None) or getattr(model_config, "torch_dtype", None) or "bfloat16")
    return 4 if "float32" in dtype else 2


def load_model_config(path: str) -> Any | None:
    """The model's config.json as a transformers config, or None where it cannot be read (e.g. a .gguf file)."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(path)
    except (OSError, ValueError):
        return None
