"""Lean activations (train.lean_activations): the same loss and gradients bit for bit as the plain model, under
full fine-tuning, LoRA (with dropout too) and QLoRA, packed rows and bf16 autocast included, and in other model
families (their dropout too); less memory held between forward and backward; what the selective checkpointing policy
keeps, and the attention kernels it names."""

from __future__ import annotations

import copy
import ctypes
import gc

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.checkpoint import CheckpointPolicy

from sftune.config import TrainConfig
from sftune.host.allocator import active_allocator
from sftune.host.memory import glibc
from sftune.model.attention import ATTENTION
from sftune.model.lean_activations import KEPT_OPS, is_used, keeping_policy, make_activations_lean
from sftune.model.load import load_model
from tests.conftest import build_tiny_model, build_tiny_tokenizer
from tests.model.helpers import adapter_pair, adapters, batch


def gradients(model, run) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.train()
    loss = run(model)
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def assert_identical(model, run, lean=None) -> None:
    """`lean`: the same model built again (a 4-bit base cannot be deep-copied), made lean here."""
    lean = copy.deepcopy(model) if lean is None else lean
    assert make_activations_lean(lean) == 2  # both blocks
    loss, grads = gradients(model, run)
    lean_loss, lean_grads = gradients(lean, run)
    assert torch.equal(loss, lean_loss)
    assert grads.keys() == lean_grads.keys() and grads
    for name, grad in grads.items():
        assert torch.equal(grad, lean_grads[name]), name


def plain_loss(ids: torch.Tensor):
    return lambda model: model(input_ids=ids, labels=ids).loss


def test_full_fine_tuning_gradients_are_unchanged(tiny_model_dir):
    model = load_model(str(tiny_model_dir), torch.float32, "cpu")
    assert_identical(model, plain_loss(batch(model.config.vocab_size)))


@pytest.mark.parametrize(("method", "dropout"), [("lora", 0.0), ("lora", 0.1), ("qlora", 0.0)])
def test_lora_gradients_are_unchanged(tiny_model_dir, method, dropout):
    model, lean = adapter_pair(tiny_model_dir, method, dropout=dropout)
    ids = batch(model.config.vocab_size)

    def run(model):
        torch.manual_seed(1)  # the same dropout masks in both
        return model(input_ids=ids, labels=ids).loss

    assert_identical(model, run, lean)
    assert adapters(model)


def test_packed_rows_and_bf16_autocast_are_unchanged(tiny_model_dir):
    model = load_model(str(tiny_model_dir), torch.float32, "cpu")
    model.config.use_cache = False  # as model/setup.py sets it: in training, a cache turns the packed rows' mask off
    ids = batch(model.config.vocab_size)[:1]
    positions = torch.tensor([list(range(5)) + list(range(7))])  # two examples in one row

    def run(model):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return model(input_ids=ids, labels=ids, position_ids=positions).loss

    assert_identical(model, run)


def bytes_in_use() -> int:
    class Mallinfo2(ctypes.Structure):
        _fields_ = [(name, ctypes.c_size_t) for name in
                    ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                     "keepcost")]  # fmt: skip

    libc = glibc()
    libc.mallinfo2.restype = Mallinfo2
    info = libc.mallinfo2()
    return info.uordblks + info.hblkhd


def held_for_backward(model, ids: torch.Tensor) -> int:
    """Bytes malloc holds after the blocks' forward, while the loss (and with it what backward needs) is alive."""
    model.train()  # checkpointing (lean or not) acts in training mode only
    gc.collect()
    before = bytes_in_use()
    loss = model.model(input_ids=ids).last_hidden_state.square().sum()  # the blocks, without the vocabulary logits
    held = bytes_in_use() - before
    loss.backward()
    return held


@pytest.mark.skipif(glibc() is None or active_allocator() != "system", reason="measures glibc's malloc")
def test_less_memory_is_held_between_forward_and_backward(tmp_path):
    model_dir = build_tiny_model(tmp_path / "model", build_tiny_tokenizer(tmp_path / "tokenizer"),
                                 hidden_size=64, intermediate_size=256)  # fmt: skip
    model = load_model(str(model_dir), torch.float32, "cpu")
    lean = copy.deepcopy(model)
    make_activations_lean(lean)
    ids = torch.randint(3, model.config.vocab_size, (1, 1024), generator=torch.Generator().manual_seed(0))
    plain_bytes = min(held_for_backward(model, ids) for _ in range(2))
    lean_bytes = min(held_for_backward(lean, ids) for _ in range(2))
    # Per token and block the plain model keeps ~7.5 values of hidden width and 4 of the MLP's (4x wider): the
    # lean one its input, q, k, v, attention and o (5), gate and up (2 of the MLP's) and down (1): 14 of 23.5.
    assert lean_bytes < 0.7 * plain_bytes, (lean_bytes, plain_bytes)


def test_the_policy_keeps_products_and_attention_and_recomputes_the_rest():
    policy, aten = keeping_policy(min_contraction=16), torch.ops.aten
    tokens, weight = torch.empty(8, 32), torch.empty(32, 64)
    assert policy(None, aten.mm.default, tokens, weight) == CheckpointPolicy.MUST_SAVE  # a linear's product
    assert policy(None, aten.addmm.default, torch.empty(64), tokens, weight) == CheckpointPolicy.MUST_SAVE
    lora_b = (torch.empty(8, 64), torch.empty(8, 4), torch.empty(4, 64))  # result + (x @ A^T) @ B^T, rank 4
    assert policy(None, aten.addmm.default, *lora_b) == CheckpointPolicy.PREFER_RECOMPUTE
    assert policy(None, aten.bmm.default, torch.empty(2, 8, 4), torch.empty(2, 4, 8)) == CheckpointPolicy.MUST_SAVE
    for op in (aten.silu.default, aten.mul.Tensor, aten.native_dropout.default, aten.clone.default):
        assert policy(None, op, tokens) == CheckpointPolicy.PREFER_RECOMPUTE


class AttentionOps(TorchDispatchMode):
    """Records the attention operators that run."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: set = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if "attention" in func.name():
            self.seen.add(func)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("padding_free", [False, True])
def test_the_attention_kernels_the_blocks_run_are_kept(tiny_model_dir, padding_free):
    """Contract: KEPT_OPS names torch-internal aten operators (the fused attention kernels); if torch renames the one
    that sdpa or the segment attention (model/attention.py) runs, this fails instead of attention being recomputed."""
    model = load_model(
        str(tiny_model_dir), torch.float32, "cpu", attn_implementation=ATTENTION if padding_free else "sdpa"
    )
    ids = batch(model.config.vocab_size)[:1]
    boundaries = {"cu_seq_lens_q": torch.tensor([0, 5, 12]), "cu_seq_lens_k": torch.tensor([0, 5, 12]),
                  "max_length_q": 7, "max_length_k": 7}  # fmt: skip
    recorder = AttentionOps()
    with recorder:
        model.train()(input_ids=ids, **(boundaries if padding_free else {}))
    assert recorder.seen and recorder.seen <= KEPT_OPS, recorder.seen


def test_unused_where_activations_are_handled_otherwise():
    assert is_used(TrainConfig()) is False  # checkpointing still auto: it may resolve to on
    assert is_used(TrainConfig(gradient_checkpointing=False))
    assert not is_used(TrainConfig(gradient_checkpointing=True))
    assert not is_used(TrainConfig(gradient_checkpointing=False, compile=True))
    assert not is_used(TrainConfig(gradient_checkpointing=False, lean_activations=False))


TINY = {"vocab_size": 128, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2}  # fmt: skip


@pytest.mark.parametrize(
    ("family", "sizes"),
    [
        ("Qwen3", {"head_dim": 16}),  # q/k norms too
        ("Gemma2", {"head_dim": 16}),  # (1 + w) norms, pre and post norms, GELU-tanh gate
        ("Olmo2", {}),  # norms after attention and MLP
        ("Phi3", {"pad_token_id": None, "resid_pdrop": 0.2}),  # fused gate_up product; dropout
        ("GPT2", {"n_embd": 64, "n_layer": 2, "n_head": 4}),  # LayerNorm; MLP with no gate; dropout
    ],
)
def test_other_model_families_train_the_same(family, sizes):
    import transformers

    config_class = getattr(transformers, f"{family}Config")
    model_class = getattr(transformers, f"{family}LMHeadModel" if family == "GPT2" else f"{family}ForCausalLM")
    config = config_class(**({"vocab_size": 128} if family == "GPT2" else TINY), **sizes)
    torch.manual_seed(0)
    model = model_class(config)
    lean = copy.deepcopy(model)
    assert make_activations_lean(lean) == 2
    ids = torch.randint(0, 128, (2, 17), generator=torch.Generator().manual_seed(0))

    def run(model):
        torch.manual_seed(1)  # the same dropout masks in both
        return model(input_ids=ids, labels=ids).loss

    loss, grads = gradients(model, run)
    lean_loss, lean_grads = gradients(lean, run)
    assert torch.equal(loss, lean_loss) and grads.keys() == lean_grads.keys()
    for name, grad in grads.items():
        assert torch.equal(grad, lean_grads[name]), name
