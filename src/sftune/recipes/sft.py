"""Supervised fine-tuning, top to bottom: start the run, its data, its settings, its model, then the one loop.

`train(config)` is what `sftune train` and `sftune.train` both call. Every step is a named part of a component
(training/, model/, data/, objectives/); the loop, checkpoints, signals, health checks, logging and saving are the
loop's (training/loop.py), written once for every objective.
"""

from __future__ import annotations

from sftune.config import Config
from sftune.model.setup import setup_model, setup_tokenizer
from sftune.objectives.sft import SupervisedObjective
from sftune.training.data import memory_estimator, publish_data, setup_data
from sftune.training.loop import fit, start_run
from sftune.training.run import TrainResult

__all__ = ["TrainResult", "train"]


def train(config: Config, resume: str | None = None, resume_changed: bool = False) -> TrainResult:
    with start_run(config, resume, resume_changed) as run:  # device, processes, run folder (locked), seed
        tokenizer, template = setup_tokenizer(run.config)
        data = setup_data(run.config, tokenizer, template)  # read, built and checked once
        run.resolve(memory_estimator([len(e.input_ids) for e in data.train], run.info.world_size))  # every `auto`
        publish_data(data, run.config, run.run_dir, run.memory, write=run.info.is_main)  # and its gates

        def build_model() -> object:
            return setup_model(run.config, tokenizer, run.device, run.precision, strategy=run.info.strategy)

        model = build_model()
        objective = SupervisedObjective.for_model(model, data, tokenizer)
        return fit(run, model, objective, tokenizer, template, rebuild=build_model)
