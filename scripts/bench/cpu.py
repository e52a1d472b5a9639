"""cpu-options: threads, bfloat16 autocast (with attention in float32 too) and torch.compile on one SmolLM2 training
step, and each of the model's matmul shapes and its attention in float32 against bfloat16; and that step (a batch of
middling chat examples, one forward + backward with Halyard's lean loss), which eval-cost counts in too."""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer

from train.app.attention import float32_sdpa
from train.app.config import DataConfig
from train.batching.collate import collate
from train.data.preprocess import load_examples
from train.objectives.losses import selected_nll_sum, supervised_positions

from .data import synthetic_chat_rows


def middling_chat_batch(tokenizer, prefix: str) -> dict:
    """A padded batch of 8 synthetic chat examples of similar, middling length (the 25th-32nd shortest of 64)."""
    data = Path(tempfile.mkdtemp(prefix=prefix)) / "chat.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in synthetic_chat_rows(64, seed=4)))
    examples = sorted(load_examples([str(data)], tokenizer, DataConfig(), 512)[0], key=lambda e: len(e.input_ids))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return collate(examples[24:32], pad)


def training_step_seconds(model, batch: dict, bf16: bool) -> float:
    """Wall seconds of one forward + backward with Halyard's lean loss (logits at supervised positions only)."""
    started = time.perf_counter()
    keep = supervised_positions(batch["labels"])
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], logits_to_keep=keep).logits
    loss = selected_nll_sum(logits, batch["labels"], keep)
    (loss.total / loss.count).backward()
    model.zero_grad(set_to_none=True)
    return time.perf_counter() - started


def bench_cpu_options(args) -> str:
    """CPU settings on one training step of SmolLM2-135M (real weights, a padded batch of chat examples), in one
    process on the same batch: threads, bfloat16 autocast, torch.compile. Median of the timed repeats."""
    tokenizer = AutoTokenizer.from_pretrained(args.smollm2)
    batch = middling_chat_batch(tokenizer, "halyard-bench-cpu-")
    threads = torch.get_num_threads()

    def step_seconds(model, bf16: bool, repeats: int) -> float:
        # the first is a warm-up (and, compiled, the compilation)
        times = [training_step_seconds(model, batch, bf16) for _ in range(repeats + 1)]
        return statistics.median(times[1:]), times[0]

    def fresh(attention: str = "sdpa"):
        model = AutoModelForCausalLM.from_pretrained(args.smollm2, attn_implementation=attention, dtype=torch.float32)
        model.config.use_cache = False
        return model

    model = fresh()
    results = {f"float32, {threads} threads (default)": step_seconds(model, False, args.repeats)}
    torch.set_num_threads(1)
    results["float32, 1 thread"] = step_seconds(model, False, args.repeats)
    torch.set_num_threads(threads)
    results[f"bfloat16 autocast, {threads} threads"] = step_seconds(model, True, args.repeats)
    results[f"bfloat16 autocast, attention in float32 (model.attention_float32), {threads} threads"] = step_seconds(
        fresh(float32_sdpa()), True, args.repeats
    )
    if args.compile:
        compiled = torch.compile(fresh(), dynamic=True)
        results[f"float32, torch.compile(dynamic=True), {threads} threads"] = step_seconds(
            compiled, False, args.repeats
        )
    base = results[f"float32, {threads} threads (default)"][0]
    tokens = int(batch["attention_mask"].sum())
    positions = batch["input_ids"].numel()
    matmuls = matmul_table(model.config, positions, args.repeats)
    rows, length = batch["input_ids"].shape
    attention = attention_table(model.config, {"the batch": (rows, length), "a packed row": (1, 512)}, args.repeats)
    lines = [
        f"SmolLM2-135M real weights, one forward + backward with Halyard's lean loss on 8 chat examples ({tokens} real "
        f"tokens, padded to {batch['input_ids'].shape[1]}), {args.repeats} timed repeats after one warm-up, in one "
        "process.",
        "",
        "| setting | median step (s) | vs default | first step (s) |",
        "|---|---|---|---|",
        *(
            f"| {name} | {median:.2f} | {median / base:.2f}x | {first:.1f} |"
            for name, (median, first) in results.items()
        ),
        "",
        f"Each matmul of the model's layers and head at the batch's {positions} positions, float32 "
        f"against bfloat16 tensors (what autocast multiplies), median of {args.repeats} after one warm-up:",
        "",
        *matmuls,
        "",
        f"One layer's causal sdpa attention, forward + backward, float32 against bfloat16 queries, keys and values "
        f"(what autocast hands it), median of {args.repeats} after one warm-up:",
        "",
        *attention,
    ]
    return "\n".join(lines)


MATMUL_DIRECTIONS = {  # a linear layer's three products in a training step: y = x W^T, dx = g W, dW = g^T x
    "forward": lambda x, w, g: x @ w.T,
    "input gradient": lambda x, w, g: g @ w,
    "weight gradient": lambda x, w, g: g.T @ x,
}


def matmul_table(config, tokens: int, repeats: int) -> list[str]:
    """Milliseconds of each matmul a decoder layer and the head run per step (forward, input gradient, weight
    gradient), float32 against bfloat16, on `tokens` positions: where bfloat16 autocast gains or loses on this CPU."""
    shapes = {  # name: (in features, out features)
        "attention q/o": (config.hidden_size, config.hidden_size),
        "MLP up/gate": (config.hidden_size, config.intermediate_size),
        "MLP down": (config.intermediate_size, config.hidden_size),
        "head": (config.hidden_size, config.vocab_size),
    }
    rows = [
        "| matmul | in x out | direction | float32 (ms) | bfloat16 (ms) | bfloat16 / float32 |",
        "|---|---|---|---|---|---|",
    ]
    generator = torch.Generator().manual_seed(0)
    for name, (inputs, outputs) in shapes.items():
        sizes = ((tokens, inputs), (outputs, inputs), (tokens, outputs))  # x, W, g
        tensors = [torch.randn(*size, generator=generator) for size in sizes]
        for direction, product in MATMUL_DIRECTIONS.items():
            float32_ms = median_ms(product, tensors, repeats)
            bfloat16_ms = median_ms(product, [t.bfloat16() for t in tensors], repeats)
            ratio = bfloat16_ms / float32_ms
            rows.append(
                f"| {name} | {inputs} x {outputs} | {direction} | {float32_ms:.1f} | {bfloat16_ms:.1f} | {ratio:.2f}x |"
            )
    return rows


def attention_table(config, shapes: dict[str, tuple[int, int]], repeats: int) -> list[str]:
    """Milliseconds of one decoder layer's causal sdpa attention, forward and backward, at each (rows, tokens per
    row) of `shapes`, float32 against bfloat16: what model.attention_float32 chooses between."""
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    lines = [
        "| attention | rows x tokens | float32 (ms) | bfloat16 (ms) | bfloat16 / float32 |",
        "|---|---|---|---|---|",
    ]
    generator = torch.Generator().manual_seed(0)
    for name, (rows, length) in shapes.items():
        sizes = (
            (rows, heads, length, head_dim),
            (rows, kv_heads, length, head_dim),
            (rows, kv_heads, length, head_dim),
        )
        tensors = [torch.randn(*size, generator=generator) for size in sizes]
        float32_ms, bfloat16_ms = (
            median_ms(attention_pass, [t.to(dtype).requires_grad_() for t in tensors], repeats)
            for dtype in (torch.float32, torch.bfloat16)
        )
        lines.append(
            f"| {name} | {rows} x {length} | {float32_ms:.1f} | {bfloat16_ms:.1f} | {bfloat16_ms / float32_ms:.2f}x |"
        )
    return lines


def attention_pass(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Causal attention (grouped-query heads) and the gradients of its inputs: one layer's share of a step."""
    output = F.scaled_dot_product_attention(query, key, value, is_causal=True, enable_gqa=True)
    return torch.autograd.grad(output.sum(), (query, key, value))


def median_ms(product, tensors: list[torch.Tensor], repeats: int) -> float:
    """Median wall milliseconds of `product(*tensors)` over `repeats` calls after one warm-up."""
    product(*tensors)
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        product(*tensors)
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1000
