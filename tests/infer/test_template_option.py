"""--template at inference: a base model (no chat template of its own) is prompted exactly as training with
template.name=NAME renders the same messages: same ids, same added tokens, stops at the same end-of-turn token."""

from __future__ import annotations

import pytest

from sftune.data.templates import BUILTIN_TEMPLATES, TemplateError
from sftune.infer.generate import generate_replies, load_for_inference, prompt_ids
from tests.infer.helpers import CONVERSATION, build_base_model, training_example

JINJA = (
    "{% for m in messages %}<|im_start|>{{ m.role }}: {{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant: {% endif %}"
)


@pytest.fixture(scope="module")
def base_model_dir(tmp_path_factory):
    return build_base_model(tmp_path_factory.mktemp("base"))


@pytest.fixture(scope="module")
def jinja_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("template") / "turns.jinja"
    path.write_text(JINJA)
    return path


def test_a_model_without_a_chat_template_is_refused_naming_the_option_and_the_builtins(base_model_dir):
    with pytest.raises(TemplateError) as refused:
        load_for_inference(str(base_model_dir), "cpu", "fp32")
    message = str(refused.value)
    assert "--template" in message and str(base_model_dir) in message
    assert all(name in message for name in BUILTIN_TEMPLATES) and ".jinja" in message


@pytest.mark.parametrize("template", [*BUILTIN_TEMPLATES, "jinja-file"])
def test_prompt_ids_are_the_training_rendering_up_to_the_first_supervised_token(base_model_dir, jinja_file, template):
    name = str(jinja_file) if template == "jinja-file" else template
    example, reply_start = training_example(base_model_dir, name, CONVERSATION)

    model, tokenizer = load_for_inference(str(base_model_dir), "cpu", "fp32", template=name)
    ids = prompt_ids(tokenizer, CONVERSATION[:-1])

    # Prompt + the supervised reply is the training example: the prompt ends where the training labels begin.
    assert ids == example.input_ids[:reply_start]
    # Tokens the template adds (chatml, llama3) are added as training adds them, with embedding rows for them.
    assert model.get_input_embeddings().weight.shape[0] == len(tokenizer)
    # Generation stops at the end-of-turn token the training mask supervises after a reply.
    eos = model.generation_config.eos_token_id
    assert set(example.end_token_ids) <= set([eos] if isinstance(eos, int) else eos)


def test_generation_with_a_template_runs_and_is_cut_at_its_end_token(base_model_dir):
    model, tokenizer = load_for_inference(str(base_model_dir), "cpu", "fp32", template="chatml")
    reply = generate_replies(model, tokenizer, [CONVERSATION[:-1]], max_new_tokens=6)[0]
    assert 0 <= reply.num_tokens <= 6
    assert "<|im_end|>" not in reply.text and "<|im_start|>" not in reply.text


def test_a_template_replaces_a_saved_one_and_a_missing_file_is_refused_before_the_weights_load(
    tiny_model_dir, tmp_path, monkeypatch
):
    example, reply_start = training_example(tiny_model_dir, "alpaca", CONVERSATION)
    _, tokenizer = load_for_inference(str(tiny_model_dir), "cpu", "fp32", template="alpaca")
    assert prompt_ids(tokenizer, CONVERSATION[:-1]) == example.input_ids[:reply_start]

    def no_weights(*args, **kwargs):
        raise AssertionError("the weights were loaded before the template was checked")

    monkeypatch.setattr("sftune.infer.generate.load_model", no_weights)
    for bad in (str(tmp_path / "missing.jinja"), "chatml2"):
        with pytest.raises(TemplateError, match="does not exist|unknown template"):
            load_for_inference(str(tiny_model_dir), "cpu", "fp32", template=bad)
