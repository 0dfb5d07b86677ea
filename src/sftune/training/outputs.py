"""What a finished run leaves behind: the trained model (full folder or adapter, with the settings inference needs
in sftune_inference.json), the loss curve, the manifest."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from sftune.config import Config
from sftune.data.templates import ChatTemplate
from sftune.infer.run_settings import write_inference_settings
from sftune.model.load import resolve_dtype, resolve_model_path
from sftune.model.lora import save_trained
from sftune.model.save import generation_eos_ids
from sftune.training.checkpoint import TrainerState
from sftune.training.manifest import write_manifest
from sftune.training.metrics import MetricsLog, plot_loss_curve


def save_outputs(
    config: Config,
    run_dir: Path,
    model: Any,
    tokenizer: Any,
    template: ChatTemplate,
    end_token_ids: list[int],
    counts: dict[str, Any],
    state: TrainerState,
    device: torch.device,
    precision: str,
) -> Path:
    """model/ (stopping at every end-of-turn id the mask trained, carrying the run's prompt settings so that RUN and
    RUN/model prompt alike), loss.png and manifest.json."""
    save_dtype_name = config.output.save_dtype if config.output.save_dtype != "auto" else config.model.dtype
    save_dtype = resolve_dtype(save_dtype_name, device)
    base_path = resolve_model_path(config.model.name_or_path)
    eos_ids = generation_eos_ids(tokenizer, set(end_token_ids))
    model_dir = save_trained(model, tokenizer, run_dir / "model", config.train.method, save_dtype, eos_ids, base_path)
    write_inference_settings(model_dir, config, template)
    plot_loss_curve(MetricsLog(run_dir / "metrics.jsonl").read(), run_dir / "loss.png")
    extra = {
        "template": {"name": template.name, "mask": config.template.mask, "masking": "incremental prefix rendering"},
        "device": str(device),
        "precision": precision,
        "save_dtype": str(save_dtype).removeprefix("torch."),
        "global_step": state.global_step,
        "tokens_seen": state.tokens_seen,
        "counts": counts,
    }
    write_manifest(run_dir / "manifest.json", config, extra)
    print(f"saved model to {model_dir}")
    return model_dir
