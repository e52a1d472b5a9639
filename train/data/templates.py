"""Chat templates for tokenizers that have none (base models): `data.chat_template` names a built-in one here or a
Jinja file, and `train/app/models.py` sets it on the tokenizer before anything is tokenized, so the trained model is
saved with the template it was trained with. No heavy imports: the config schema reads the names."""

from __future__ import annotations

from pathlib import Path

from train.errors import DataError

# name -> Jinja template, in the form Hugging Face tokenizers store it.
CHAT_TEMPLATES = {
    # ChatML (Qwen, SmolLM2, many others): its end of turn <|im_end|> should be a special token of the tokenizer, or
    # the model learns to stop only at the end of a conversation (the label mask audit reports it).
    "chatml": (
        "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
        "'<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    ),
}


def chat_template_problem(value: str | None) -> str | None:
    """Why data.chat_template cannot be used (checked before anything loads), or None."""
    if value is None or value in CHAT_TEMPLATES:
        return None
    path = Path(value)
    if not path.is_file():
        return (
            f"data.chat_template={value!r}: neither a built-in template ({', '.join(CHAT_TEMPLATES)}) nor a file "
            f"(paths are relative to {Path.cwd()}); give a name, or the path of a Jinja template (.jinja)"
        )
    try:
        if not path.read_text(encoding="utf-8").strip():
            return f"data.chat_template={value!r}: the file is empty; it must hold a Jinja chat template"
    except (OSError, UnicodeDecodeError) as error:
        return f"data.chat_template={value!r}: cannot be read as text ({error})"
    return None


def chat_template_text(value: str) -> str:
    """The Jinja text data.chat_template names: a built-in template's, or a file's."""
    problem = chat_template_problem(value)
    if problem:
        raise DataError(problem)
    return CHAT_TEMPLATES.get(value) or Path(value).read_text(encoding="utf-8")


def no_template_message(tokenizer) -> str:
    """The one error for a tokenizer without a chat template given conversations."""
    return (
        f"the tokenizer at '{tokenizer.name_or_path}' has no chat template, so conversations cannot be rendered; set "
        f"data.chat_template=chatml (built in) or data.chat_template=path/to/template.jinja, or "
        f"model.tokenizer_name_or_path to a tokenizer that has one (plain text rows need none)"
    )
