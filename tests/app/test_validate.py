"""Validation reads each setting's declared choices: a value outside them is reported with the list, for the schema's
settings and a loss's own alike. (The rest of validation is tested through the CLI in test_config.py.)"""

import dataclasses
import subprocess
import sys
from dataclasses import dataclass

import pytest

import launch
from conftest import DEMO_TRAIN, REPO
from train.app.config import Config, leaf_settings, schema_keys, setting
from train.app.validate import TRANSFORMERS_KEYS, check_choices
from train.errors import ConfigError
from train.objectives.sft import SFTSettings, SFTTrainer

CHOICE_SETTINGS = [
    (path, list(f.metadata["choices"])) for path, f, _ in leaf_settings(Config()) if "choices" in f.metadata
]
COMMON = ["model=tiny", f"datasets=[{DEMO_TRAIN}]"]


@dataclass
class FlavorSettings(SFTSettings):
    flavor: str = setting("plain", "Test-only setting", choices={"plain": "", "salted": "with salt"})


class FlavorTrainer(SFTTrainer):
    """SFT with one more setting that declares choices (found by import path, as a user's loss is)."""

    settings_class = FlavorSettings


def with_value(cfg: Config, path: str, value) -> Config:
    """A copy of `cfg` with the dotted setting `path` set to `value`."""
    head, _, rest = path.partition(".")
    if not rest:
        return dataclasses.replace(cfg, **{head: value})
    return dataclasses.replace(cfg, **{head: with_value(getattr(cfg, head), rest, value)})


def test_the_schema_declares_the_choices_it_used_to_list_by_hand():
    declared = dict(CHOICE_SETTINGS)
    assert declared["model.dtype"] == ["auto", "float32", "bfloat16"]
    assert declared["wandb.mode"] == [None, "online", "offline", "disabled"]
    assert declared["save_dtype"] == ["auto", "float32", "bfloat16", "float16"]
    assert {"model.attn_implementation", "data.train_on", "data.truncation", "data.on_bad_row", "optimizer.name",
            "lr_scheduler", "save_merged", "on_nonfinite"} <= set(declared)  # fmt: skip


@pytest.mark.parametrize(("path", "choices"), CHOICE_SETTINGS)
def test_a_value_outside_a_setting_s_choices_is_reported_with_them(path, choices):
    with pytest.raises(ConfigError) as error:
        launch.compose_config([*COMMON, f"{path}=not_a_choice"])
    assert f"{path}='not_a_choice': must be one of {choices}" in error.value.problems


@pytest.mark.parametrize(("path", "choices"), CHOICE_SETTINGS)
def test_every_declared_choice_passes_the_check(path, choices):
    for value in choices:
        assert check_choices(with_value(Config(), path, value)) == [], (path, value)


def test_a_loss_s_own_setting_with_choices_is_validated_with_the_rest():
    trainer = [f"loss.trainer={__name__}.FlavorTrainer"]
    with pytest.raises(ConfigError) as error:
        launch.compose_config([*COMMON, "loss=sft", *trainer, "loss.flavor=salty", "model.dtype=fp16"])
    assert sorted(error.value.problems) == [
        "loss.flavor='salty': must be one of ['plain', 'salted']",
        "model.dtype='fp16': must be one of ['auto', 'float32', 'bfloat16']",
    ]
    cfg = launch.compose_config([*COMMON, "loss=sft", *trainer, "loss.flavor=salted"])
    assert type(cfg.loss) is FlavorSettings and cfg.loss.flavor == "salted"


def test_choices_given_as_a_sequence_are_stored_as_choices_without_meanings():
    @dataclass
    class Settings:
        mode: str = setting("a", "Mode", choices=("a", "b"))

    (field,) = dataclasses.fields(Settings)
    assert field.metadata["choices"] == {"a": "", "b": ""}
    assert dataclasses.fields(FlavorSettings)[-1].metadata["choices"] == {"plain": "", "salted": "with salt"}


def test_torch_loads_with_the_loss_s_trainer_module_not_with_the_config_modules():
    """launch.py's claim: the schema, validation and help modules import no torch; resolving a loss imports its
    trainer module, and with it torch."""
    probe = (
        "import sys\nimport train.app.config, train.app.validate, train.app.help, train.app.serialize\n"
        "before = 'torch' in sys.modules\nfrom train.app.loss_registry import resolve_loss\n"
        "resolve_loss('sft', 'train.objectives.sft.SFTTrainer')\nprint(before, 'torch' in sys.modules)"
    )
    result = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, check=True)
    assert result.stdout.split() == ["False", "True"]


def test_every_transformers_name_maps_to_a_key_of_the_schema_that_it_does_not_shadow():
    keys = schema_keys()
    for name, (key, _) in TRANSFORMERS_KEYS.items():
        assert key in keys and name not in keys, name


def test_a_rejected_value_is_reported_once_not_again_as_its_default():
    problems = problems_of(["model=base_model", "datasets=a.jsonl", "model.name_or_path=[x]"])
    assert problems == [
        "datasets='a.jsonl': expected a list of strings; write it in brackets: datasets=[a.jsonl]",
        "model.name_or_path=['x']: expected a string or null",
    ]


def problems_of(overrides: list[str]) -> list[str]:
    with pytest.raises(ConfigError) as error:
        launch.compose_config(overrides)
    return error.value.problems


def test_peft_options_that_cannot_work_are_refused_together():
    with pytest.raises(ConfigError) as error:
        launch.compose_config(
            [
                *COMMON,
                "model.peft.use_dora=true",
                "++model.peft.modules_to_save=[lm_head]",
                "model.add_special_tokens=[' ']",
            ]
        )
    assert error.value.problems == [
        "model.peft.use_dora=True, model.peft.modules_to_save=['lm_head']: LoRA options, but model.use_peft=false "
        "trains every weight; set model.use_peft=true (method=lora), or remove them",
        "model.add_special_tokens=[' ']: each token must be a non-empty string, listed once; write them quoted, e.g. "
        "model.add_special_tokens=['<tool_call>','</tool_call>']",
    ]
    with pytest.raises(ConfigError) as error:
        launch.compose_config([*COMMON, "method=lora", "model.peft.target_modules=[q_proj,lm_head]",
                               "model.peft.modules_to_save=[lm_head]"])  # fmt: skip
    assert error.value.problems == [
        "model.peft.modules_to_save=['lm_head']: ['lm_head'] are in model.peft.target_modules too; a module is either "
        "adapted (LoRA) or trained whole, not both: remove it from one list"
    ]
    cfg = launch.compose_config([*COMMON, "method=lora", "model.peft.use_rslora=true", "model.peft.use_dora=true"])
    assert cfg.model.peft.use_rslora and cfg.model.peft.use_dora


def test_float32_attention_is_refused_with_a_kernel_it_does_not_upcast():
    with pytest.raises(ConfigError) as error:
        launch.compose_config([*COMMON, "model.attention_float32=true", "model.attn_implementation=eager"])
    assert error.value.problems == [
        "model.attention_float32=true upcasts sdpa attention, but model.attn_implementation=eager; use "
        "attn_implementation=sdpa, or attention_float32=false"
    ]
    assert launch.compose_config([*COMMON, "model.attention_float32=true"]).model.attention_float32 is True


def test_quantized_bases_that_cannot_work_are_refused_with_the_reason():
    """QLoRA's refusals, all at once: a quantized base without LoRA, a 4-bit option with int8, FSDP (planned from the
    accelerate config, before any process starts)."""
    fsdp = f"accelerate_config={REPO / 'accelerate_config' / 'fsdp_cpu_2proc.yaml'}"
    overrides = [*COMMON, "model.quantization=int8", "model.double_quantization=true", fsdp, "model.batch_size=8"]
    with pytest.raises(ConfigError) as error:
        launch.compose_config([*overrides, "model.quantization_compute_dtype=bfloat16"])
    problems = error.value.problems
    assert len(problems) == 4, problems
    assert problems[0].startswith("model.quantization=int8 without model.use_peft: a quantized base cannot be trained")
    assert "method=qlora" in problems[0]
    assert problems[1].startswith("model.double_quantization: a setting of 4-bit bases; model.quantization=int8")
    assert problems[2].startswith("model.quantization_compute_dtype: a setting of 4-bit bases")
    assert problems[3].startswith("model.quantization=int8 under FSDP") and "bnb_4bit_quant_storage" in problems[3]
    assert (
        "fsdp_offload_cpu_2proc.yaml" in problems[3]
        and (REPO / "accelerate_config/fsdp_offload_cpu_2proc.yaml").is_file()
    )
    cfg = launch.compose_config([*COMMON, "method=qlora", "model.double_quantization=false"])  # what works
    assert (cfg.model.use_peft, cfg.model.quantization, cfg.model.double_quantization) == (True, "nf4", False)
    assert cfg.lr == 2e-4


def test_benchmark_settings_and_the_sweep_objective_are_checked_before_anything_loads(tmp_path, monkeypatch):
    """An unknown task, a task whose data is a download while offline, bad values and an objective no task produces:
    found from the task YAMLs (tests/bench_helpers.py), all at once; the harness loads no dataset."""
    from bench_helpers import TASK, write_task

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    tasks = write_task(tmp_path)
    (tmp_path / "remote.yaml").write_text(
        "task: remote_mc\ndataset_path: someone/not_downloaded_dataset\ntest_split: test\n"
        "output_type: multiple_choice\ndoc_to_text: q\ndoc_to_choice: choices\ndoc_to_target: label\n"
    )
    bench = [f"benchmarks.include_path={tasks}", "benchmarks.batch_size=0", "benchmarks.num_fewshot=-1"]
    problems = problems_of([*COMMON, *bench, f"benchmarks.tasks=[{TASK},remote_mc,halyard_tiny_mcq]",
                            f"sweep.objective=bench/{TASK}/accuracy"])  # fmt: skip
    assert len(problems) == 5, problems
    assert problems[0] == "benchmarks.batch_size=0: must be > 0"
    assert problems[1].startswith("benchmarks.num_fewshot=-1: must be >= 0")
    assert problems[2].startswith("benchmarks.tasks: 'remote_mc' needs the dataset 'someone/not_downloaded_dataset'")
    assert problems[3].startswith(f"benchmarks.tasks: unknown task 'halyard_tiny_mcq' (did you mean {TASK}")
    assert problems[4].startswith(f"sweep.objective=bench/{TASK}/accuracy: no task of benchmarks.tasks produces it")
    assert f"bench/{TASK}/acc, bench/{TASK}/acc_norm, bench/{TASK}/brier_score" in problems[4]
    assert problems_of([*COMMON, "sweep.objective=bench/x/acc"]) == [
        "sweep.objective=bench/x/acc: a benchmark metric, but benchmarks.tasks is empty; add its task, e.g. "
        "benchmarks.tasks=[x]"
    ]
    assert "not a metric a run reports" in problems_of([*COMMON, "sweep.objective=accuracy"])[0]
    cfg = launch.compose_config([*COMMON, f"benchmarks.include_path={tasks}", f"benchmarks.tasks=[{TASK}]",
                                 f"sweep.objective=bench/{TASK}/acc_norm", "sweep.direction=maximize"])  # fmt: skip
    assert (cfg.benchmarks.tasks, cfg.sweep.objective) == ([TASK], f"bench/{TASK}/acc_norm")
