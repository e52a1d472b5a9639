"""model.head_loss=fused in the SFT trainer: the loss and every gradient equal the logits path's on the tiny model
(padded and packed batches, token and sequence reductions), the setting reaches the trainer, and validation refuses
it where it cannot work."""

from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

import launch
from conftest import DEMO_TRAIN, read_metrics, run_cli
from train.app.assemble import loop_settings
from train.batching.collate import collate, collate_packed
from train.data.store import Example, PackedExample
from train.errors import ConfigError, HalyardError
from train.loop.trainer import forward_supervised_hidden, output_head
from train.objectives.losses import IGNORE_INDEX
from train.objectives.sft import SFTSettings, SFTTrainer

PAD = 0


def examples(vocab: int) -> list[Example]:
    """Three examples of uneven length with prompts (-100) and supervised answers."""
    generator = torch.Generator().manual_seed(0)
    found = []
    for length, prompt in ((9, 4), (6, 2), (12, 7)):
        ids = torch.randint(1, vocab, (length,), generator=generator).tolist()
        found.append(Example(ids, [IGNORE_INDEX] * prompt + ids[prompt:]))
    return found


def padded_batch(vocab: int):
    return collate(examples(vocab), PAD)


def packed_batch(vocab: int):
    first, second, third = examples(vocab)
    rows = [
        PackedExample(first.input_ids + second.input_ids, first.labels + second.labels, [9, 6]),
        PackedExample(third.input_ids, third.labels, [12]),
    ]
    return collate_packed(rows, PAD)


def sft_trainer(head_loss: str, reduction: str) -> SFTTrainer:
    """An SFTTrainer with only what batch_loss reads: the loop's head_loss, the loss settings, unwrap_model."""
    trainer = SFTTrainer.__new__(SFTTrainer)
    trainer.loop = SimpleNamespace(head_loss=head_loss)
    trainer.settings = SFTSettings(reduction=reduction)
    trainer.accelerator = SimpleNamespace(unwrap_model=lambda model: model)
    return trainer


def loss_and_gradients(model, trainer: SFTTrainer, batch) -> tuple[float, int, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss = trainer.batch_loss(model, batch)
    loss.total.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}
    return loss.total.item(), int(loss.count), grads


@pytest.fixture(scope="module")
def tiny_model(tiny_cache):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_cache / "tiny-llama", attn_implementation="sdpa")


@pytest.mark.parametrize("layout", ["padded", "packed"])
@pytest.mark.parametrize("reduction", ["token", "sequence"])
def test_fused_head_equals_the_logits_path_with_every_gradient(tiny_model, layout, reduction):
    batch = (padded_batch if layout == "padded" else packed_batch)(tiny_model.config.vocab_size)
    logits = loss_and_gradients(tiny_model, sft_trainer("logits", reduction), batch)
    fused = loss_and_gradients(tiny_model, sft_trainer("fused", reduction), batch)
    assert fused[0] == pytest.approx(logits[0], rel=1e-5)
    assert fused[1] == logits[1] == (5 + 4 + 5 if reduction == "token" else 3)  # supervised tokens, or examples
    assert fused[2].keys() == logits[2].keys()
    for name, grad in logits[2].items():
        # relative to the gradient's size: the two paths sum in different orders, so not bit-equal
        assert (fused[2][name] - grad).norm() <= 1e-5 * grad.norm(), name


def test_the_last_hidden_state_is_the_final_norms_output(tiny_model):
    """What the fused head multiplies by the head's weight gives the model's own logits."""
    batch = padded_batch(tiny_model.config.vocab_size)
    hidden, keep = forward_supervised_hidden(tiny_model, batch)
    weight, bias = output_head(tiny_model)
    assert bias is None and weight is tiny_model.get_output_embeddings().weight
    full = tiny_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert torch.allclose(hidden @ weight.T, full[keep], rtol=1e-5, atol=1e-5)


def test_output_head_refuses_a_soft_capped_head(tiny_model, monkeypatch):
    monkeypatch.setattr(tiny_model.config, "final_logit_softcapping", 30.0, raising=False)
    with pytest.raises(HalyardError, match="model.head_loss=logits"):
        output_head(tiny_model)


def test_the_setting_reaches_the_trainers_loop_settings(tiny_cache):
    for value in ("logits", "fused"):
        overrides = ["model=tiny", f"cache_dir={tiny_cache}", f"datasets=[{DEMO_TRAIN}]", f"model.head_loss={value}"]
        cfg = launch.compose_config(overrides)
        assert loop_settings(cfg, SFTTrainer, total_steps=1).head_loss == value
    assert launch.compose_config(["model=tiny", f"datasets=[{DEMO_TRAIN}]"]).model.head_loss == "logits"


def problems_of(overrides: list[str]) -> list[str]:
    with pytest.raises(ConfigError) as error:
        launch.compose_config(overrides)
    return error.value.problems


def test_validation_refuses_fused_where_it_cannot_work():
    dpo = problems_of(["loss=dpo", "model=tiny", f"datasets=[{DEMO_TRAIN}]", "model.head_loss=fused"])
    assert any("model.head_loss=fused: loss=dpo" in p and "set model.head_loss=logits" in p for p in dpo), dpo
    fsdp = problems_of(
        [
            "model=tiny",
            f"datasets=[{DEMO_TRAIN}]",
            "model.head_loss=fused",
            "accelerate_config=accelerate_config/fsdp_cpu_2proc.yaml",
        ]
    )
    assert any("model.head_loss=fused under FSDP" in p for p in fsdp), fsdp
    for loss in ("sft", "pt"):  # no problem where it works (compose_config raises on any)
        launch.compose_config([f"loss={loss}", "model=tiny", f"datasets=[{DEMO_TRAIN}]", "model.head_loss=fused"])


def test_a_tied_head_gets_both_gradients(tiny_cache):
    """A head tied to the embeddings (SmolLM2's): the fused loss's weight gradient adds to the embeddings' own."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_cache / "tiny-llama")
    model.lm_head.weight = model.get_input_embeddings().weight  # one Parameter, as tie_word_embeddings makes it
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    batch = packed_batch(model.config.vocab_size)
    logits = loss_and_gradients(model, sft_trainer("logits", "token"), batch)
    fused = loss_and_gradients(model, sft_trainer("fused", "token"), batch)
    assert fused[0] == pytest.approx(logits[0], rel=1e-5)
    for name, grad in logits[2].items():
        assert (fused[2][name] - grad).norm() <= 1e-5 * grad.norm(), name


@pytest.mark.parametrize("modules_to_save", [None, ["lm_head"]])
def test_under_peft_the_head_is_the_base_models_or_its_trained_copy(tiny_cache, modules_to_save):
    """LoRA: a frozen head (no weight gradient taken), or one PEFT trains whole (its copy's weight is the head)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_cache / "tiny-llama")
    config = LoraConfig(
        r=4, target_modules=["q_proj", "v_proj"], modules_to_save=modules_to_save, init_lora_weights=False
    )
    model = get_peft_model(base, config)
    weight, _ = output_head(model)
    assert weight.requires_grad == bool(modules_to_save)
    batch = padded_batch(base.config.vocab_size)
    logits = loss_and_gradients(model, sft_trainer("logits", "token"), batch)
    fused = loss_and_gradients(model, sft_trainer("fused", "token"), batch)
    assert fused[0] == pytest.approx(logits[0], rel=1e-5)
    assert any("lora_A" in name for name in logits[2]) and fused[2].keys() == logits[2].keys()
    assert any("modules_to_save" in name for name in logits[2]) == bool(modules_to_save)
    for name, grad in logits[2].items():
        assert (fused[2][name] - grad).norm() <= 1e-5 * grad.norm(), name


def test_output_head_refuses_lora_on_the_head(tiny_cache):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_cache / "tiny-llama")
    model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "lm_head"]))
    with pytest.raises(HalyardError, match="LoRA adapts the output head"):
        output_head(model)


# ---- through the CLI: the same losses and weights, on one process and two (DDP) ----

CLI_RUNS = {  # name: (head_loss, accelerate config or None, extra args); 4 steps of the global batch 8 each
    "logits_padded": ("logits", None, ["data.group_by_length=false"]),
    "fused_padded": ("fused", None, ["data.group_by_length=false"]),
    "fused_padded_ddp": ("fused", "cpu_2proc.yaml", ["data.group_by_length=false"]),
    "logits_grouped": ("logits", None, []),
    "fused_grouped": ("fused", None, []),
    "logits_packed_sequence": ("logits", None, ["data.packing=true", "loss.reduction=sequence"]),
    "fused_packed_sequence": ("fused", None, ["data.packing=true", "loss.reduction=sequence"]),
}


@pytest.fixture(scope="module")
def cli_runs(tiny_cache):
    from test_launch import accelerate_launcher

    runs = {}
    for name, (head_loss, accelerate_config, extra) in CLI_RUNS.items():
        args = ["loss=sft", "model=tiny", f"datasets=[{DEMO_TRAIN}]", f"cache_dir={tiny_cache}"]
        args += [f"exp_name=fused-head-{name}", "lr=1e-2", "max_steps=4", "log_every_steps=1"]
        launcher = accelerate_launcher(accelerate_config) if accelerate_config else None
        result = run_cli([*args, f"model.head_loss={head_loss}", *extra], launcher=launcher)
        assert result.returncode == 0, result.stderr[-3000:]
        runs[name] = tiny_cache / f"fused-head-{name}"
    return runs


# Weights after 4 AdamW steps at lr 1e-2, as a fraction of how far training moved them.
# The two heads' gradients agree to 3e-7, each as close to a float64 computation as the other (measured on the seam
# tests' batches), and the step losses to 1e-7; but Adam divides by sqrt(v), which blows up the rounding of near-zero
# gradient entries: the logits and fused runs end up to 2.2e-5 apart (packed), one process and two (whose gradients
# differ only in the order of one sum) 2e-6. Without DDP's gradient sync each process would step on its own half of
# the batch, far apart.
HEAD_TOLERANCE, SPLIT_TOLERANCE = 5e-5, 1e-5


@pytest.mark.slow
@pytest.mark.parametrize(
    ("reference", "fused", "tolerance"),
    [
        ("logits_padded", "fused_padded", HEAD_TOLERANCE),
        ("logits_grouped", "fused_grouped", HEAD_TOLERANCE),
        ("logits_packed_sequence", "fused_packed_sequence", HEAD_TOLERANCE),
        ("fused_padded", "fused_padded_ddp", SPLIT_TOLERANCE),  # two processes: DDP's gradient sync ran
    ],
)
def test_fused_head_runs_train_like_the_logits_head(cli_runs, tiny_cache, reference, fused, tolerance):
    losses = [
        [m["loss/train"] for m in read_metrics(cli_runs[name]) if "loss/train" in m] for name in (reference, fused)
    ]
    assert len(losses[0]) == 4
    assert losses[1] == pytest.approx(losses[0], rel=1e-5)
    base = load_file(tiny_cache / "tiny-llama" / "model.safetensors")
    one, two = (load_file(cli_runs[name] / "FINAL" / "model.safetensors") for name in (reference, fused))
    assert one.keys() == two.keys()
    for key in one:
        assert (one[key] - two[key]).norm() <= tolerance * (one[key] - base[key]).norm(), key
