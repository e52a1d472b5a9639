"""The resolved config written out: YAML that composes back to the same config, and flat dotted keys."""

from omegaconf import OmegaConf

from train.app.config import Config, ModelConfig
from train.app.serialize import config_yaml, flat_config, flatten


def test_flatten_joins_keys_with_dots_and_stringifies_what_a_tracker_cannot_take():
    tree = {"lr": 0.1, "model": {"name": "m", "peft": {"r": 4}}, "betas": [0.9, 0.99], "entity": None}
    assert flatten(tree) == {"lr": 0.1, "model.name": "m", "model.peft.r": 4, "betas": "[0.9, 0.99]", "entity": "None"}


def test_config_yaml_reads_back_to_the_same_settings():
    cfg = Config(exp_name="run", run_dir="runs/run", lr=3e-4, datasets=["a.jsonl"], model=ModelConfig(batch_size=4))
    back = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(Config), OmegaConf.create(config_yaml(cfg))))
    assert back == cfg
    flat = flat_config(cfg)
    assert flat["lr"] == 3e-4 and flat["model.batch_size"] == 4 and flat["model.use_peft"] is False
    assert flat["datasets"] == "['a.jsonl']" and flat["loss.name"] == "None"
