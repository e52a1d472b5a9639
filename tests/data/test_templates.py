"""data.chat_template (train/data/templates.py): a built-in template or a Jinja file, checked before anything loads,
set on the tokenizer by build_tokenizer, and part of the preprocessing cache key."""

import pytest
from data_helpers import demo_config, write

from train.app.config import DataConfig
from train.data.templates import CHAT_TEMPLATES, chat_template_problem, chat_template_text
from train.errors import ConfigError

KEYS = DataConfig()
SIMPLE = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}<|im_end|>\n{% endfor %}"


def test_names_and_files(tmp_path):
    path = write(tmp_path, "t.jinja", SIMPLE)
    assert chat_template_text("chatml") == CHAT_TEMPLATES["chatml"] and chat_template_text(path) == SIMPLE
    assert chat_template_problem(None) is None
    assert "neither a built-in template (chatml) nor a file" in chat_template_problem("chatmI")
    assert "the file is empty" in chat_template_problem(write(tmp_path, "empty.jinja", "\n"))


def test_validation_names_a_bad_template_before_anything_loads(tmp_path):
    with pytest.raises(ConfigError, match=r"data.chat_template='llama9': neither a built-in template"):
        demo_config(tmp_path, "data.chat_template=llama9")


def test_build_tokenizer_sets_the_template_and_the_cache_key_follows_it(tmp_path, tiny_cache):
    from train.app.config import ModelConfig
    from train.app.models import build_tokenizer
    from train.data.preprocess import cache_key

    model = ModelConfig(name_or_path=str(tiny_cache / "tiny-llama"))
    own = build_tokenizer(model)
    chatml = build_tokenizer(model, "chatml")
    path = write(tmp_path, "t.jinja", SIMPLE)
    simple = build_tokenizer(model, path)
    assert chatml.chat_template == CHAT_TEMPLATES["chatml"] and simple.chat_template == SIMPLE
    keys = {
        cache_key(["x"], tokenizer, DataConfig(chat_template=value), 64, "sft")
        for tokenizer, value in ((own, None), (chatml, "chatml"), (simple, path))
    }
    assert len(keys) == 3
