"""What lean activations keep between forward and backward, and what they cost, on one micro-batch in one process.

    python bench/lean_activations.py [--method lora] [--lora-dropout 0.0] [--repeats 3]
    PYTHONPATH=/path/to/other/src python bench/lean_activations.py ...   # another implementation of the same API

Loads the default model (SmolLM2-135M-Instruct, fp32; LoRA: r=16 all-linear on an fp32 base, as bench/compare.py),
makes a deep copy of it lean (sftune.model.lean_activations.make_activations_lean, whichever `sftune` is imported),
and, interleaved `--repeats` times, runs the decoder blocks (the model without its LM head) forward and backward on
one padding-free row of 4 x 512 tokens through the segment attention, as training does. Prints per variant the bytes
glibc malloc holds between forward and backward (mallinfo2: the tensors kept for backward, nothing else is made) next
to model/memory.py's estimate for it, and the forward+backward seconds (the best of the repeats). Run it with the
system allocator (plain `python`, no mimalloc preloaded): mallinfo2 counts glibc's heap only. Not a test: numbers to
read (bench/results/lean_activations.md).
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import gc
import os
import time

import torch

from sftune.config import load_config
from sftune.model.attention import ATTENTION
from sftune.model.lean_activations import make_activations_lean
from sftune.model.load import load_model, resolve_model_path
from sftune.model.lora import prepare_model
from sftune.model.memory import CHUNK_LOGITS_BYTES, estimate_activation_bytes

TOKENS, EXAMPLES = 2048, 4


class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]  # fmt: skip


LIBC = ctypes.CDLL("libc.so.6")
LIBC.mallinfo2.restype = MallInfo2


def bytes_in_use() -> int:
    info = LIBC.mallinfo2()
    return info.uordblks + info.hblkhd


def row_inputs(vocab: int) -> dict:
    """One padding-free row: EXAMPLES examples of TOKENS / EXAMPLES tokens back to back."""
    length = TOKENS // EXAMPLES
    ids = torch.randint(3, vocab, (1, TOKENS), generator=torch.Generator().manual_seed(0))
    bounds = torch.arange(0, TOKENS + 1, length)
    positions = torch.arange(length).repeat(EXAMPLES)[None]
    return {"input_ids": ids, "position_ids": positions, "cu_seq_lens_q": bounds, "cu_seq_lens_k": bounds,
            "max_length_q": length, "max_length_k": length}  # fmt: skip


def measure(model, inputs: dict) -> tuple[int, float]:
    """(bytes held between the blocks' forward and backward, forward+backward seconds)."""
    blocks = model.get_base_model().model if hasattr(model, "get_base_model") else model.model
    model.train()
    model.zero_grad(set_to_none=True)
    gc.collect()
    start, before = time.perf_counter(), bytes_in_use()
    loss = blocks(**inputs).last_hidden_state.square().mean()
    held = bytes_in_use() - before
    loss.backward()
    return held, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", default="lora", choices=["lora", "full"])
    parser.add_argument("--lora-dropout", type=float, default=0.0)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    lora = {"r": 16, "alpha": 32, "dropout": args.lora_dropout, "target_modules": "all-linear"}
    config = load_config({"data": {"train": "unused.json"}, "train": {"method": args.method}, "lora": lora})
    model = load_model(resolve_model_path("smollm2-135m-instruct"), torch.float32, "cpu", attn_implementation=ATTENTION)
    model.config.use_cache = False  # as model/setup.py sets it
    torch.manual_seed(0)
    model = prepare_model(model, config)
    lean = copy.deepcopy(model)
    make_activations_lean(lean)
    inputs = row_inputs(model.config.vocab_size)
    results: dict[str, list[tuple[int, float]]] = {"plain": [], "lean": []}
    for _ in range(args.repeats):
        for name, variant in (("plain", model), ("lean", lean)):
            results[name].append(measure(variant, inputs))
    import sftune.model.lean_activations as implementation

    print(
        f"{args.method} (LoRA dropout {args.lora_dropout}), {TOKENS} tokens, sftune from {implementation.__file__}, "
        f"load {os.getloadavg()[0]:.2f}"
    )
    for name, runs in results.items():
        estimate = estimate_activation_bytes(model.config, TOKENS, False, TOKENS, True, lean=name == "lean")
        estimate -= CHUNK_LOGITS_BYTES  # no LM head here
        held = min(h for h, _ in runs)
        print(f"  {name}: held {held / 2**20:.0f} MiB (estimate {estimate / 2**20:.0f} MiB), "
              f"forward+backward {min(s for _, s in runs):.2f} s (runs: "
              + ", ".join(f"{s:.2f}" for _, s in runs) + ")")  # fmt: skip


if __name__ == "__main__":
    main()
