"""`sftune chat`: talk to a trained model in the terminal, multi-turn, with the template saved at training time
(or the one --template names, for a base model)."""

from __future__ import annotations

from sftune.config import GenerateConfig
from sftune.infer.chat import chat_loop, enable_line_editing, write_stdout
from sftune.infer.generate import check_model_path, load_for_inference
from sftune.infer.run_settings import read_run_settings


def chat(model_path: str, settings: GenerateConfig) -> int:
    """Load the model (which fails before the first prompt when it has no template to prompt with), then talk
    until the user quits."""
    check_model_path(model_path)
    system = read_run_settings(model_path, settings.system_prompt).prompts.system_prompt  # the run's, as trained
    model, tokenizer = load_for_inference(model_path, settings.device, settings.dtype, settings.template)
    write_stdout(f"sftune chat with {model_path}\n/reset clears the history, /exit or Ctrl-D quits\n")
    enable_line_editing()
    return chat_loop(model, tokenizer, system, settings)
