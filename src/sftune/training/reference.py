"""Reference log-probabilities of preference pairs, computed once before training and cached on disk.

The reference is the model as it starts: with its adapter switched off where a fresh adapter trains, or (an SFT
adapter continued, or full fine-tuning) the starting model itself. The cache is keyed by the model's weights (and a
continued adapter), the precision and the pairs' tokens, so a second run or a resume reads instead of recomputing.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from pathlib import Path
from typing import Any

import torch

from sftune.config import Config
from sftune.data.preference import PairExample
from sftune.model.load import default_cache_dir
from sftune.model.start import StartingPoint
from sftune.training.distributed import SINGLE, Distributed
from sftune.training.loss import TokenLoss
from sftune.training.preference import make_pair_batch, sequence_logps


def cached_reference(
    config: Config,
    start: StartingPoint,
    loss: TokenLoss,
    pairs: list[PairExample],
    device: torch.device,
    autocast: Any,
    name: str,
    info: Distributed = SINGLE,
) -> list[tuple[float, float]]:
    """Reference log-probs computed once and cached on disk, keyed by the model (and continued adapter), the pairs'
    tokens and the precision: a second run or a resume reads them instead of recomputing. On several processes
    rank 0 reads or computes them (before the model is wrapped: it holds the model whole) and sends them to the
    others (a broadcast: no cache folder shared between machines needed)."""
    values: list[tuple[float, float]] = []
    path = reference_cache_path(config, start, pairs, name)
    if info.is_main and path.is_file():
        print(f"reference log-probs ({name}): cached, {path}")
        values = [tuple(pair) for pair in json.loads(path.read_text())]  # type: ignore[misc]
    elif info.is_main:
        print(f"reference log-probs ({name}): computing for {len(pairs)} pairs, once")
        values = precompute_reference(
            loss, pairs, config.train.micro_batch_size, device, autocast, adapter_off=start.adapter_dir is None
        )
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(values))
        tmp.replace(path)
    if not info.enabled:
        return values
    sent = info.broadcast(torch.tensor(values or [(0.0, 0.0)] * len(pairs), dtype=torch.float64))  # [pairs, 2]
    return [(chosen, rejected) for chosen, rejected in sent.tolist()]


def reference_cache_path(config: Config, start: StartingPoint, pairs: list[PairExample], name: str) -> Path:
    digest = hashlib.sha256()
    for folder in (Path(start.model_path), *([start.adapter_dir] if start.adapter_dir else [])):
        for weights in sorted(folder.glob("*.safetensors")) if folder.is_dir() else []:
            digest.update(f"{weights.name}:{weights.stat().st_size}:{weights.stat().st_mtime_ns}".encode())
        digest.update(str(folder).encode())
    digest.update(config.train.precision.encode())
    digest.update(f"base:{config.lora.base_dtype if config.train.method == 'lora' else 'as loaded'}".encode())
    for pair in pairs:
        digest.update(
            repr((pair.chosen.input_ids, pair.chosen.labels, pair.rejected.input_ids, pair.rejected.labels)).encode()
        )
    return default_cache_dir().parent / "reference" / f"{name}-{digest.hexdigest()[:24]}.json"


@torch.no_grad()
def precompute_reference(
    loss: TokenLoss,
    pairs: list[PairExample],
    micro_batch_size: int,
    device: torch.device,
    autocast: Any = None,
    adapter_off: bool = True,
) -> list[tuple[float, float]]:
    """(chosen, rejected) reference log-probs of every pair, in one pass before training: with the adapter off
    where there is one, or (`adapter_off=False`, an SFT adapter trained on) the model as it starts."""
    was_training = loss.model.training
    loss.model.eval()
    switch_off = adapter_off and hasattr(loss.model, "disable_adapter")
    adapter_off_context = loss.model.disable_adapter() if switch_off else contextlib.nullcontext()
    results: list[tuple[float, float]] = []
    with adapter_off_context, autocast or contextlib.nullcontext():
        for start in range(0, len(pairs), micro_batch_size):
            chunk = pairs[start : start + micro_batch_size]
            logps = sequence_logps(loss, make_pair_batch(chunk).batch.to(device))[0].float().cpu()
            results += list(zip(logps[: len(chunk)].tolist(), logps[len(chunk) :].tolist(), strict=True))
    loss.model.train(was_training)
    return results
