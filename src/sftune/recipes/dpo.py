"""Preference optimisation (DPO, IPO, SimPO, ORPO) after SFT, top to bottom: start the run, where training starts, the
pairs, the settings, the model and its reference, then the one loop (training/loop.py).

`train_dpo(config)` is what `sftune dpo` and `sftune.train_dpo` call. It may start from an SFT run folder
(model.name_or_path: runs/my_sft), full or adapter (dpo.adapter: merge or continue). What differs from SFT is the
objective (objectives/dpo.py: pairs, the loss and its reference); the run folder, model preparation (full, LoRA,
QLoRA), exact resume, signals, health checks, logging, checkpoints, outputs and manifest are the loop's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sftune.config import Config
from sftune.infer.generate import resolve_model_dir
from sftune.model.setup import setup_model, setup_tokenizer
from sftune.model.start import StartingPoint, adapter_tokenizer, find_starting_point
from sftune.objectives.dpo import PreferenceObjective, reference_mode
from sftune.training.data import publish_data, setup_pairs
from sftune.training.distributed import SINGLE, Distributed
from sftune.training.loop import fit, start_run
from sftune.training.run import TrainResult, seed_everything

__all__ = ["reference_mode", "train_dpo"]


def train_dpo(config: Config, resume: str | None = None, resume_changed: bool = False) -> TrainResult:
    with start_run(config, resume, resume_changed) as run:  # device, processes, run folder (locked), seed
        start = setup_start(run.config, run.run_dir, run.info)  # an SFT adapter merged or continued
        seed_everything(run.config.train.seed)  # again after the start: a merge done or reused draws no numbers
        tokenizer, template = setup_tokenizer(start_config(run.config, start), adapter_tokenizer(start.adapter_dir))
        pairs = setup_pairs(run.config, tokenizer, template)
        run.resolve(None, continued_adapter=start.adapter_dir is not None, objective="dpo")  # every `auto`
        publish_data(pairs, run.config, run.run_dir, None, write=run.info.is_main)
        model_config = start_config(run.config, start)  # the resolved config, its weights from the starting point

        def build_model() -> Any:
            return setup_model(model_config, tokenizer, run.device, run.precision, start.adapter_dir, run.info.strategy)

        model = build_model()
        objective = PreferenceObjective.setup(model, pairs, run, start, model_config)
        return fit(run, model, objective, tokenizer, template, rebuild=build_model, saved_config=model_config)


def setup_start(config: Config, run_dir: Path, info: Distributed = SINGLE) -> StartingPoint:
    """Where training starts: an SFT run folder's model, or its adapter merged (rank 0 merges it into the run folder;
    the other ranks wait, then find it merged) or continued."""
    if not info.is_main:
        info.barrier()
    start = find_starting_point(
        resolve_model_dir(config.model.name_or_path), config.dpo.adapter, config.train.method, run_dir
    )
    if info.is_main:
        info.barrier()
    return start


def start_config(config: Config, start: StartingPoint) -> Config:
    """`config` with model.name_or_path the folder the weights load from; the run's own config keeps what was
    written."""
    return config.model_copy(update={"model": config.model.model_copy(update={"name_or_path": start.model_path})})
