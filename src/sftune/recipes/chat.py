"""`sftune chat`: talk to a trained model in the terminal, multi-turn, with the template saved at training time."""

from __future__ import annotations

from sftune.config import GenerateConfig
from sftune.infer.chat import chat_loop, enable_line_editing, write_stdout
from sftune.infer.generate import load_for_inference, saved_template
from sftune.infer.prompts import run_prompt_settings


def chat(model_path: str, settings: GenerateConfig) -> int:
    """Load the model, check it has a saved template, then talk until the user quits."""
    model, tokenizer = load_for_inference(model_path, settings.device, settings.dtype)
    saved_template(tokenizer)  # fail before the first prompt, not after the user typed a question
    write_stdout(f"sftune chat with {model_path}\n/reset clears the history, /exit or Ctrl-D quits\n")
    enable_line_editing()
    system = run_prompt_settings(model_path, settings.system_prompt).system_prompt  # the run's, as trained
    return chat_loop(model, tokenizer, system, settings)
