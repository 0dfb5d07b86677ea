"""Lean activations (train.lean_activations): the same loss and gradients bit for bit as the plain model, under
full fine-tuning, LoRA (fused and PEFT's layers) and QLoRA, packed rows and bf16 autocast included; less memory held
between forward and backward; an MLP that is not down(act(gate) * up) and a tensor changed in place after it was
made are kept as they are."""

from __future__ import annotations

import copy
import ctypes
import gc

import pytest
import torch

from sftune.model.lean_activations import BlockRecipes, is_gated_mlp, is_product_of, make_activations_lean, unpack
from sftune.model.load import load_model
from sftune.host.allocator import active_allocator
from sftune.host.memory import glibc
from tests.conftest import build_tiny_model, build_tiny_tokenizer
from tests.model.helpers import adapters, batch, fused_and_peft_pair


def gradients(model, run) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.train()
    loss = run(model)
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def assert_identical(model, run, lean=None) -> None:
    """`lean`: the same model built again (a 4-bit base cannot be deep-copied), made lean here."""
    lean = copy.deepcopy(model) if lean is None else lean
    assert make_activations_lean(lean) == (2, 2)  # both blocks, both gated MLPs
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


@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_lora_gradients_are_unchanged_fused_or_not(tiny_model_dir, method):
    fused, plain = fused_and_peft_pair(tiny_model_dir, method)
    lean_fused, lean_plain = fused_and_peft_pair(tiny_model_dir, method)
    ids = batch(fused.config.vocab_size)
    for model, lean in ((fused, lean_fused), (plain, lean_plain)):
        assert_identical(model, plain_loss(ids), lean)
        assert adapters(model)


def test_packed_rows_and_bf16_autocast_are_unchanged(tiny_model_dir):
    model = load_model(str(tiny_model_dir), torch.float32, "cpu")
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
    # lean one drops the 2 norm outputs and 2 of the MLP's ~ 10 of 23.5 values.
    assert lean_bytes < 0.7 * plain_bytes, (lean_bytes, plain_bytes)


class ScaledMLP(torch.nn.Module):
    """gate/up/down/act_fn, but down does not get act(gate) * up."""

    def __init__(self) -> None:
        super().__init__()
        self.gate_proj, self.up_proj = torch.nn.Linear(4, 8), torch.nn.Linear(4, 8)
        self.down_proj, self.act_fn = torch.nn.Linear(8, 4), torch.nn.SiLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(2 * self.act_fn(self.gate_proj(x)) * self.up_proj(x))


def test_only_a_proven_gated_mlp_is_made_lean(tiny_model_dir):
    model = load_model(str(tiny_model_dir), torch.float32, "cpu")
    assert is_gated_mlp(model.model.layers[0].mlp, torch.float32, torch.device("cpu"))
    assert not is_gated_mlp(ScaledMLP(), torch.float32, torch.device("cpu"))
    assert not is_gated_mlp(torch.nn.Linear(4, 4), torch.float32, torch.device("cpu"))


def test_a_tensor_changed_in_place_is_kept_not_remade():
    x = torch.randn(3, 5, requires_grad=True)
    weight = torch.randn(3, 5)
    recipes = BlockRecipes()

    def run(lean: bool) -> torch.Tensor:
        x.grad = None
        made = x * 2
        if lean:
            recipes.add(made, lambda t: t * 2, x)
        made.mul_(3)  # after this, x * 2 is no longer what `made` holds
        with torch.autograd.graph.saved_tensors_hooks(recipes.pack, unpack):
            (made * made * weight).sum().backward()
        return x.grad.clone()

    assert torch.equal(run(lean=True), run(lean=False))


def test_only_down_input_made_as_that_product_is_registered():
    gate = torch.randn(4, 6, requires_grad=True)
    activated, up = torch.nn.functional.silu(gate), gate * 3
    assert is_product_of(activated * up, activated, up) and is_product_of(up * activated, activated, up)
    dropped = torch.nn.functional.dropout(activated * up, p=0.5, training=True)  # e.g. an MLP with dropout
    assert not is_product_of(dropped, activated, up)
    assert not is_product_of(2 * activated * up, activated, up)
    assert not is_product_of(activated * up, activated, gate * 3)  # equal values, another tensor


def test_in_place_change_of_a_kept_tensor_raises_as_autograd_does():
    x = torch.randn(3, 5, requires_grad=True)
    recipes = BlockRecipes()
    with torch.autograd.graph.saved_tensors_hooks(recipes.pack, unpack):
        made = x * 2
        loss = (made * made).sum()  # saves `made`, kept as it is
    made.add_(1)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


TINY = {"vocab_size": 128, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2}  # fmt: skip


@pytest.mark.parametrize(
    ("family", "sizes", "gated"),
    [
        ("Qwen3", {"head_dim": 16}, 2),  # q/k norms too
        ("Gemma2", {"head_dim": 16}, 2),  # (1 + w) norms, pre and post norms, GELU-tanh gate
        ("Olmo2", {}, 2),  # norms after attention and MLP
        ("Phi3", {"pad_token_id": None, "resid_pdrop": 0.2}, 0),  # fused gate_up: MLP as it is; dropout
        ("GPT2", {"n_embd": 64, "n_layer": 2, "n_head": 4}, 0),  # LayerNorm; MLP with no gate; dropout
    ],
)
def test_other_model_families_train_the_same(family, sizes, gated):
    import transformers

    config_class = getattr(transformers, f"{family}Config")
    model_class = getattr(transformers, f"{family}LMHeadModel" if family == "GPT2" else f"{family}ForCausalLM")
    config = config_class(**({"vocab_size": 128} if family == "GPT2" else TINY), **sizes)
    torch.manual_seed(0)
    model = model_class(config)
    lean = copy.deepcopy(model)
    assert make_activations_lean(lean) == (2, gated)
    ids = torch.randint(0, 128, (2, 17), generator=torch.Generator().manual_seed(0))

    def run(model):
        torch.manual_seed(1)  # the same dropout masks in both
        return model(input_ids=ids, labels=ids).loss

    loss, grads = gradients(model, run)
    lean_loss, lean_grads = gradients(lean, run)
    assert torch.equal(loss, lean_loss) and grads.keys() == lean_grads.keys()
    for name, grad in grads.items():
        assert torch.equal(grad, lean_grads[name]), name
