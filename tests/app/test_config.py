"""The config schema, every YAML preset, and validation that reports every problem at once."""

import re
import subprocess
import sys

import pytest
from omegaconf import OmegaConf

import launch
from conftest import DEMO_TRAIN, REPO, run_cli
from train.app.config import (
    CONFIG_DIR,
    Config,
    keys_that_keep_the_math,
    leaf_paths,
    register_defaults,
    schema_keys,
)
from train.app.help import describe_schema
from train.app.loss_registry import builtin_losses, resolve_loss
from train.app.validate import validate
from train.errors import ConfigError

MODELS = sorted(p.stem for p in (REPO / "config" / "model").glob("*.yaml"))
LOSSES = sorted(p.stem for p in (REPO / "config" / "loss").glob("*.yaml"))


def problems_of(overrides: list[str]) -> list[str]:
    with pytest.raises(ConfigError) as error:
        launch.compose_config(overrides)
    return error.value.problems


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("model", [m for m in MODELS if m != "base_model"])
def test_every_preset_composes_and_validates(loss, model):
    cfg = launch.compose_config([f"loss={loss}", f"model={model}", f"datasets=[{DEMO_TRAIN}]"])
    assert isinstance(cfg, Config)
    assert cfg.loss.name == loss
    assert cfg.model.name_or_path


def test_base_model_alone_asks_for_a_model_path():
    problems = problems_of([f"datasets=[{DEMO_TRAIN}]"])
    assert problems == ["model.name_or_path is not set: pick a preset (model=smollm2) or set ++model.name_or_path=DIR"]


def test_run_dir_is_cache_dir_slash_exp_name():
    cfg = launch.compose_config(["model=tiny", f"datasets=[{DEMO_TRAIN}]", "cache_dir=/tmp/x", "exp_name=abc"])
    assert cfg.run_dir == "/tmp/x/abc"
    assert cfg.model.name_or_path == "/tmp/x/tiny-llama"


def test_plain_and_forced_overrides_both_work():
    cfg = launch.compose_config(
        ["model=tiny", f"datasets=[{DEMO_TRAIN}]", "model.use_peft=true", "++model.peft.lora_r=4", "lr=0.5"]
    )
    assert cfg.model.use_peft is True and cfg.model.peft.lora_r == 4 and cfg.lr == 0.5


def test_every_problem_is_reported_at_once_with_fixes():
    problems = problems_of(
        [
            "model=tiny",
            "datasets=[missing.jsonl]",
            "model.batch_sise=4",
            "lr=fast",
            "model.dtype=fp16",
            "batch_size=3",
            "warmup_ratio=1.5",
            "model.max_grad_norm=-1",
            "eval_datasets=[README.md]",
        ]
    )
    text = "\n".join(problems)
    assert len(problems) == 8, text
    assert "unknown key 'model.batch_sise' (did you mean 'model.batch_size'?)" in text
    assert "unknown key 'batch_size' (did you mean 'model.batch_size'?)" in text
    assert "lr='fast': expected a number" in text
    assert "model.dtype='fp16': must be one of ['auto', 'float32', 'bfloat16']" in text
    assert "warmup_ratio=1.5: must be in [0, 1)" in text
    assert "model.max_grad_norm=-1.0: must be > 0" in text
    assert "'missing.jsonl' is neither a file, a saved dataset folder, nor a named dataset" in text
    assert "'README.md' has an unsupported extension" in text


def test_unknown_loss_and_model_presets_list_the_valid_ones():
    assert problems_of(["loss=sfft", f"datasets=[{DEMO_TRAIN}]"])[0].count("sft") >= 1
    message = problems_of(["model=tinyy", f"datasets=[{DEMO_TRAIN}]"])[0]
    assert "tinyy" in message and "tiny" in message.replace("tinyy", "")


def test_batch_must_split_over_processes_and_accumulation():
    from hydra import compose, initialize_config_dir

    register_defaults()  # config.yaml starts from every key's default (`halyard_defaults`)
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        composed = compose(
            "config",
            overrides=[
                "model=tiny",
                f"++datasets=[{DEMO_TRAIN}]",
                "++model.batch_size=6",
                "++model.gradient_accumulation_steps=2",
            ],
        )
    validate(composed, world_size=1)
    with pytest.raises(
        ConfigError,
        match=r"model.batch_size=6 does not split into 2 process\(es\) x 2 accumulation step\(s\); choose a multiple of 4",
    ):
        validate(composed, world_size=2)


def test_every_key_is_documented_in_help():
    table = describe_schema()
    for path in _leaf_paths_of_schema():
        assert re.search(rf"^  {re.escape(path)}[\s(]", table, re.MULTILINE), path


def test_a_resumed_run_may_change_only_the_keys_that_keep_the_math():
    """Declared per key (`setting(..., changes_math=False)`) or per section (wandb, benchmarks...): the operational
    keys a long run is resumed with most often may change; what sets the numbers may not."""
    may_change = keys_that_keep_the_math()
    operational = ["profile_steps", "memory_check", "log_every_steps", "eval_samples", "data.num_workers",
                   "model.micro_batch_tokens", "wandb.enabled", "benchmarks.tasks", "sweep.objective"]  # fmt: skip
    math = ["seed", "lr", "max_steps", "datasets", "model.batch_size", "model.dtype", "model.peft.lora_r",
            "data.packing", "optimizer.name", "reference.precompute", "loss.name"]  # fmt: skip
    assert set(operational) <= may_change and not may_change & set(math)
    assert may_change <= schema_keys()


def test_every_key_is_read_by_the_code():
    """A key that nothing reads is a lie in the docs. Reads in the schema and validation do not count."""
    schema = {REPO / "train" / "app" / "config.py", REPO / "train" / "app" / "validate.py"}
    code = "\n".join(p.read_text() for p in [*REPO.glob("train/**/*.py"), REPO / "launch.py"] if p not in schema)
    interpolated = set(re.findall(r"\$\{([\w.]+)\}", (REPO / "train" / "app" / "config.py").read_text()))
    unread = [
        path
        for path in _leaf_paths_of_schema()
        if path not in interpolated and not re.search(rf"\.{path.rsplit('.', 1)[-1]}\b", code)
    ]
    assert unread == []


def _leaf_paths_of_schema() -> list[str]:
    """Every key, including the settings of every loss."""
    from omegaconf import OmegaConf

    paths = set(leaf_paths(OmegaConf.structured(Config)))
    for name, trainer_path in builtin_losses().items():
        schema = resolve_loss(name, trainer_path)[0].settings
        paths |= {f"loss.{key}" for key in leaf_paths(OmegaConf.structured(schema))}
    return sorted(paths)


def test_config_errors_exit_2_without_traceback_or_heavy_imports():
    result = run_cli(["model=tiny", "datasets=[nope.jsonl]", "model.lora_r=4", "cache_dir=/nonexistent-halyard"])
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "halyard: invalid configuration (3 problems)" in result.stderr
    assert "model.name_or_path=/nonexistent-halyard/tiny-llama: no such folder" in result.stderr
    assert "did you mean 'model.peft.lora_r'" in result.stderr
    # Errors come before any model loads: validation imports the loss's trainer module, never a model's code.
    probe = (
        "import sys, launch\ntry:\n    launch.compose_config(['model=tiny'])\nexcept Exception:\n    pass\n"
        "print(any(name.startswith('transformers.models.llama') for name in sys.modules))"
    )
    imported = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, check=True)
    assert imported.stdout.strip() == "False"


def test_help_lists_keys_and_exits_0():
    result = run_cli(["--help"])
    assert result.returncode == 0
    assert "model.gradient_accumulation_steps" in result.stdout and "eval_every_steps" in result.stdout


def test_help_is_for_users_presets_formats_and_readable_defaults():
    text = run_cli(["--help"]).stdout
    assert text.startswith("Halyard fine-tunes causal language models")  # what it does, not a note for developers
    assert "This file keeps" not in text and "train/app/run.py" not in text
    presets = [*LOSSES, *MODELS, *(p.stem for p in (REPO / "config" / "experiment").glob("*.yaml"))]
    presets += [f"accelerate_config/{p.name}" for p in (REPO / "accelerate_config").glob("*.yaml")]
    for name in presets:
        assert re.search(rf"^ +{re.escape(name)}\b", text, re.MULTILINE), name
    assert re.search(r"^  preference +\{\"prompt\": str\|messages, \"chosen\"", text, re.MULTILINE)
    assert "default default" not in text and "a string;" not in text
    assert re.search(r"^  lr +1e-05 +Peak learning rate \(reached after warmup\)", text, re.MULTILINE)
    assert re.search(r"^  model\.name_or_path +null +", text, re.MULTILINE)
    assert re.search(r"^  model\.peft\.target_modules +\[all-linear\] +", text, re.MULTILINE)
    assert re.search(r"^  loss\.beta \([a-z_, ]*dpo[a-z_, ]*\) +0\.1 +", text, re.MULTILINE)
    assert "-m" in text and "--config-dir" in text and "--cfg job" in text  # Hydra's usage


def test_data_settings_are_checked_together():
    problems = problems_of([
        "model=tiny", f"datasets=[{DEMO_TRAIN}]", "data.format=yaml", "data.train_on=user", "data.truncation=cut",
        "data.on_bad_row=ignore", "data.dataset_samples=[1,2]", "data.eval_split_ratio=1", "data.num_proc=0",
        "data.num_workers=-1",
    ])  # fmt: skip
    text = "\n".join(problems)
    assert len(problems) == 8, text
    assert "data.num_workers=-1: must be >= 0" in text
    assert "data.format='yaml': must be one of ['auto', 'instruction'" in text
    assert "data.dataset_samples has 2 entries for 1 datasets; give one per dataset" in text
    assert "data.num_proc=0: must be > 0" in text


def test_a_loss_s_capabilities_are_checked_with_every_other_problem():
    problems = problems_of(["model=tiny", "loss=rm", f"datasets=[{DEMO_TRAIN}]", "data.packing=true", "lr=-1"])
    text = "\n".join(problems)
    assert len(problems) == 2, text
    assert "data.packing=true: loss=rm (train.objectives.reward.RewardTrainer) does not support packing" in text
    shared = ["model=tiny", "loss=rm", f"datasets=[{DEMO_TRAIN}]", "data.shared_prompt=true", "data.packing=true"]
    text = "\n".join(problems_of([*shared, "model.attn_implementation=eager"]))
    assert "data.shared_prompt=true: loss=rm (train.objectives.reward.RewardTrainer) does not support it" in text
    assert "data.shared_prompt=true and data.packing=true: pick one" in text
    assert "data.shared_prompt=true needs model.attn_implementation=sdpa" in text
    problems = problems_of(["model=tiny", "loss=kto", f"datasets=[{DEMO_TRAIN}]", "reference.precompute=true"])
    assert problems == [
        "reference.precompute=true: loss=kto (train.objectives.kto.KTOTrainer) cannot precompute them (its reference "
        "log-probs change every step); set it to false"
    ]
    problems = problems_of(["model=tiny", "loss=simpo", f"datasets=[{DEMO_TRAIN}]", "reference.precompute=true"])
    assert "it uses no reference model" in problems[0]
    problems = problems_of(["model=tiny", "loss=sft", f"datasets=[{DEMO_TRAIN}]", "data.format=preference"])
    assert problems == [
        "data.format=preference: loss=sft (train.objectives.sft.SFTTrainer) trains on instruction/output, messages, "
        "conversations, prompt/completion or text rows, which this format does not give; set data.format=auto or a "
        "format of those rows"
    ]
    problems = problems_of(["model=tiny", "loss=dpo", f"datasets=[{DEMO_TRAIN}]", "loss.trainer=null"])
    assert problems == ["loss=dpo names no trainer: add `trainer: <module>.<TrainerClass>` to its YAML"]


def test_a_mismatched_trainer_and_settings_cannot_pass_validation():
    """The settings come from the trainer class: cDPO's label_smoothing is not a key of IPO's settings."""
    problems = problems_of(
        ["model=tiny", "loss=cdpo", "loss.trainer=train.objectives.preference.IPOTrainer", f"datasets=[{DEMO_TRAIN}]"]
    )
    assert problems == [
        "unknown key 'loss.label_smoothing': loss=cdpo with loss.trainer=train.objectives.preference.IPOTrainer has "
        "no setting 'label_smoothing' (its settings: loss.tau, loss.length_normalized); loss.label_smoothing is a "
        "setting of loss=cdpo, dpo"
    ]
    cfg = launch.compose_config(["model=tiny", "loss=cdpo", f"datasets=[{DEMO_TRAIN}]"])
    assert type(cfg.loss).__name__ == "DPOSettings" and cfg.loss.label_smoothing == 0.1


@pytest.mark.parametrize(
    ("trainer", "expected"),
    [
        ("DPOTrainer", "give the trainer's import path, module and class, e.g. train.objectives.preference.DPOTrainer"),
        ("no_such_module.Trainer", "no module named 'no_such_module'; put no_such_module.py in the working directory"),
        ("train.objectives.preference.DPOTrainr", "has no trainer class (a BasicTrainer subclass) 'DPOTrainr' (did you mean "
         "'train.objectives.preference.DPOTrainer'?)"),
        ("train.objectives.preference.DPOSettings", "has no trainer class"),
    ],
)  # fmt: skip
def test_a_trainer_that_cannot_be_imported_is_named_with_a_fix(trainer, expected):
    problems = problems_of(["model=tiny", "loss=dpo", f"loss.trainer={trainer}", f"datasets=[{DEMO_TRAIN}]"])
    assert len(problems) == 1 and expected in problems[0], problems


def test_optimizer_and_schedule_settings_are_validated_with_the_rest(monkeypatch):
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda n, *a: None if n == "bitsandbytes" else real_find_spec(n, *a)
    )
    common = ["model=tiny", f"datasets=[{DEMO_TRAIN}]"]
    problems = problems_of([*common, "optimizer.name=adamw_8bit", "optimizer.betas=[0.9]", "optimizer.eps=0",
                            "lr_scheduler=cosine_restarts", "min_lr_ratio=2", "warmup_steps=-1", "lr_decay_ratio=0"])  # fmt: skip
    text = "\n".join(problems)
    assert len(problems) == 7, text
    assert "optimizer.name=adamw_8bit needs the bitsandbytes package, which is not installed" in text
    assert "optimizer.betas=[0.9]: give two numbers in [0, 1)" in text
    assert "optimizer.eps=0.0: must be > 0" in text
    assert (
        "lr_scheduler='cosine_restarts': must be one of ['cosine', 'linear', 'constant', 'warmup_stable_decay']" in text
    )
    assert "min_lr_ratio=2.0: must be in [0, 1]" in text
    assert "optimizer.name='sgd': must be one of" in "\n".join(problems_of([*common, "optimizer.name=sgd"]))
    assert problems_of([*common, "lr_scheduler=constant", "min_lr_ratio=0.1"]) == [
        "min_lr_ratio=0.1: lr_scheduler=constant has no decay; set it to 0"
    ]
    cfg = launch.compose_config([*common, "optimizer.name=adafactor", "optimizer.betas=[0.8,0.99]", "warmup_steps=3"])
    assert (cfg.optimizer.name, cfg.optimizer.betas, cfg.warmup_steps) == ("adafactor", [0.8, 0.99], 3)


@pytest.mark.parametrize(("method", "use_peft", "lr"), [("lora", True, 2e-4), ("full", False, 1e-5)])
def test_method_presets_set_the_adapters_and_a_learning_rate_to_match(method, use_peft, lr):
    common = ["model=smollm2", f"datasets=[{DEMO_TRAIN}]", f"method={method}"]
    cfg = launch.compose_config(common)
    assert (cfg.model.use_peft, cfg.lr, cfg.model.max_length) == (use_peft, lr, 256)  # the model preset stays
    assert launch.compose_config([*common, "lr=1e-3"]).lr == 1e-3  # a key given on the command line wins


def test_a_setting_the_chosen_loss_lacks_is_named_with_the_loss_s_own(tiny_cache):
    """Switching loss=dpo to loss=orpo with loss.beta still set: ORPO has no beta; say so and list ORPO's keys."""
    args = ["loss=orpo", "model=tiny", f"cache_dir={tiny_cache}", f"datasets=[{DEMO_TRAIN}]", "loss.beta=0.2"]
    result = run_cli([*args, "loss.odds_ratio_wieght=0.2"])
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert "invalid configuration (2 problems)" in result.stderr
    assert (
        "unknown key 'loss.beta': loss=orpo has no setting 'beta' (its settings: loss.odds_ratio_weight); "
        "loss.beta is a setting of loss=apo_down, apo_zero, cdpo, cpo, dpo, hinge, kto, rdpo, rpo, simpo"
    ) in result.stderr
    assert "unknown key 'loss.odds_ratio_wieght' (did you mean 'loss.odds_ratio_weight'?)" in result.stderr
    assert "loss.trainer" not in result.stderr


def test_transformers_and_trl_names_are_answered_with_halyard_s_keys(tiny_cache):
    args = ["model=tiny", f"cache_dir={tiny_cache}", f"datasets=[{DEMO_TRAIN}]", "learning_rate=2e-5"]
    args += ["per_device_train_batch_size=4", "num_train_epochs=2", "gradient_accumulation_steps=2", "logging_steps=5"]
    result = run_cli(args)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    problems = [line.removeprefix("  - ") for line in result.stderr.splitlines()[1:]]
    assert problems == [
        "unknown key 'learning_rate': Halyard calls it 'lr'",
        "unknown key 'per_device_train_batch_size': Halyard calls it 'model.batch_size' (the GLOBAL batch: "
        "per-device batch x processes x model.gradient_accumulation_steps)",
        "unknown key 'num_train_epochs': Halyard calls it 'n_epochs'",
        "unknown key 'gradient_accumulation_steps': Halyard calls it 'model.gradient_accumulation_steps'",
        "unknown key 'logging_steps': Halyard calls it 'log_every_steps'",
    ]


def test_a_list_without_brackets_is_one_problem_with_the_brackets_to_write(tiny_cache):
    result = run_cli(["model=tiny", f"cache_dir={tiny_cache}", "datasets=data/demo/train.jsonl"])
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.splitlines() == [
        "halyard: invalid configuration (1 problem):",
        "  - datasets='data/demo/train.jsonl': expected a list of strings; write it in brackets: "
        "datasets=[data/demo/train.jsonl]",
    ]


def test_cfg_job_checks_what_a_run_checks_and_prints_the_typed_config(tiny_cache):
    """`--cfg job` is the dry run: the loss's settings with their defaults, interpolations resolved, nothing
    written; a bad key, a missing data file or model exits 2 with the usual message."""
    args = ["--cfg", "job", "loss=dpo", "model=tiny", f"cache_dir={tiny_cache}", "exp_name=dry"]
    shown = run_cli([*args, "datasets=[data/demo/pref_train.jsonl]", "lr=3e-6"])
    assert shown.returncode == 0, shown.stderr
    printed = OmegaConf.create(shown.stdout)
    assert OmegaConf.to_container(printed.loss) == {
        "name": "dpo",
        "trainer": "train.objectives.preference.DPOTrainer",
        "beta": 0.1,
        "label_smoothing": 0.0,
    }
    assert printed.lr == 3e-6 and printed.run_dir == f"{tiny_cache}/dry" and printed.model.max_length == 128
    assert not (tiny_cache / "dry").exists()
    section = run_cli([*args, "datasets=[data/demo/pref_train.jsonl]", "-p", "loss"])
    assert section.returncode == 0 and section.stdout.startswith("# @package loss\nname: dpo\n"), section.stderr
    bad = run_cli([*args, "datasets=[data/demo/nope.jsonl]", "loss.bta=0.2", "++model.name_or_path=/nonexistent"])
    assert bad.returncode == 2 and "Traceback" not in bad.stderr and not bad.stdout, bad.stderr
    assert "invalid configuration (3 problems)" in bad.stderr
    assert "unknown key 'loss.bta' (did you mean 'loss.beta'?)" in bad.stderr
    assert "datasets: 'data/demo/nope.jsonl' is neither a file" in bad.stderr
    assert "model.name_or_path=/nonexistent: no such folder" in bad.stderr


FAMILIES = {  # preset -> the hub id it starts from
    "llama": "meta-llama/Llama-3.2-1B-Instruct",
    "qwen2_5": "Qwen/Qwen2.5-1.5B-Instruct",
    "qwen3": "Qwen/Qwen3-1.7B",
    "mistral": "mistralai/Mistral-7B-Instruct-v0.3",
    "gemma": "google/gemma-3-1b-it",
}


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_family_presets_are_one_line_starts(family, method):
    """`model=<family> method=<method>` composes and validates: the hub id, bfloat16 (each family's stored dtype),
    the method's adapters. What offline cannot prove: that the hub model loads and trains (it cannot be downloaded
    here); its chat template's masks are checked where its tokenizer is (tests/data/test_chat.py)."""
    cfg = launch.compose_config([f"model={family}", f"method={method}", f"datasets=[{DEMO_TRAIN}]"])
    assert (cfg.model.name_or_path, cfg.model.dtype, cfg.model.use_peft) == (FAMILIES[family], "bfloat16", True)
    assert cfg.model.quantization == ("nf4" if method == "qlora" else "none")


def test_a_family_preset_dry_run_names_what_is_missing_offline(tiny_cache):
    """The README's one-line start as a dry run: offline, the hub model is named with the command that fetches it;
    pointed at a local folder, the same preset and method validate and print their settings."""
    args = ["--cfg", "job", "model=qwen3", "method=qlora", f"datasets=[{DEMO_TRAIN}]", "exp_name=qwen3-dry"]
    offline = run_cli(args)
    assert offline.returncode == 2 and "Traceback" not in offline.stderr, offline.stderr
    assert "model.name_or_path=Qwen/Qwen3-1.7B" in offline.stderr and "hf download Qwen/Qwen3-1.7B" in offline.stderr
    local = run_cli([*args, f"cache_dir={tiny_cache}", f"++model.name_or_path={tiny_cache}/tiny-llama"])
    assert local.returncode == 0, local.stderr
    printed = OmegaConf.create(local.stdout).model
    assert (printed.max_length, printed.quantization, printed.use_peft) == (4096, "nf4", True)
