"""Chat with a model folder through its chat template: one answer, an interactive chat, or a batch of prompts.

CHECKPOINT is a Hugging Face model folder (a base model, or a run's FINAL/), a step checkpoint (step-N/), or a PEFT
adapter folder (a LoRA run's FINAL/ or FINAL/adapter/, or its step-N/), loaded on top of the base model it names.
The model is loaded once.

Usage:
  python scripts/generate.py CHECKPOINT                       # interactive multi-turn chat, answers streamed
  python scripts/generate.py CHECKPOINT --prompt "What is the capital of France?"   # one answer, printed
  python scripts/generate.py CHECKPOINT --batch prompts.jsonl --out answers.jsonl  # {"prompt"} or {"messages"}
Decoding is greedy unless a sampling option is given: --temperature T (> 0), --top-p P or --top-k K; --top-p or
--top-k alone samples at temperature 1. --temperature 0 is greedy and cannot be combined with --top-p or --top-k.
--repetition-penalty R (> 1 discourages repeats) applies to greedy decoding and sampling alike. The values given
(or these defaults) are what runs: the model's own generation_config sampling defaults are not used.
Other options: --system TEXT, --max-new-tokens N, --seed S. In the chat, /reset forgets the conversation and /exit
(or Ctrl-D) quits.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Sampling:
    max_new_tokens: int = 128
    temperature: float = 0.0  # 0: greedy decoding
    top_p: float = 1.0  # 1: no nucleus cut
    top_k: int = 0  # 0: no top-k cut
    repetition_penalty: float = 1.0  # 1: none

    def generate_kwargs(self) -> dict:
        # Every value is passed, so a model's generation_config (which may set top_k=50, say) never changes the decoding.
        common = {"max_new_tokens": self.max_new_tokens, "repetition_penalty": self.repetition_penalty}
        if self.temperature <= 0:
            return {**common, "do_sample": False}
        return {**common, "do_sample": True, "temperature": self.temperature, "top_p": self.top_p, "top_k": self.top_k}


def number(kind: type, rule: str, valid):
    """An argparse type: `kind(text)`, rejected with `rule` in the message unless `valid(value)`."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not (math.isfinite(value) and valid(value)):
            raise argparse.ArgumentTypeError(f"{text} is invalid: must be {rule}")
        return value

    return parse


def sampling_from(args, parser: argparse.ArgumentParser) -> Sampling:
    """--top-p or --top-k without --temperature samples at temperature 1; with --temperature 0 they are refused."""
    cuts = [flag for flag, value in (("--top-p", args.top_p), ("--top-k", args.top_k)) if value is not None]
    temperature = args.temperature
    if temperature is None:
        temperature = 1.0 if cuts else Sampling.temperature
    elif temperature == 0 and cuts:
        parser.error(f"--temperature 0 decodes greedily, which ignores {' and '.join(cuts)}; give a temperature > 0 "
                     f"to sample, or drop {' and '.join(cuts)}")  # fmt: skip
    return Sampling(
        max_new_tokens=args.max_new_tokens,
        temperature=temperature,
        top_p=Sampling.top_p if args.top_p is None else args.top_p,
        top_k=Sampling.top_k if args.top_k is None else args.top_k,
        repetition_penalty=args.repetition_penalty,
    )


def model_folder(checkpoint: Path) -> Path:
    if (checkpoint / "trainer_state.json").exists():  # a step checkpoint: its model is in model/
        if not (checkpoint / "model").is_dir():
            raise SystemExit(f"{checkpoint} was written under FSDP and holds only shards; chat with the run's FINAL/")
        return checkpoint / "model"
    return checkpoint


def load(checkpoint: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = model_folder(checkpoint)
    if (folder / "adapter_config.json").exists():
        from peft import AutoPeftModelForCausalLM  # loads the base model named in adapter_config.json

        return AutoPeftModelForCausalLM.from_pretrained(folder), AutoTokenizer.from_pretrained(folder)
    return AutoModelForCausalLM.from_pretrained(folder), AutoTokenizer.from_pretrained(folder)


def with_system(messages: list[dict], system: str | None) -> list[dict]:
    return ([{"role": "system", "content": system}] if system else []) + messages


def reply(model, tokenizer, messages: list[dict], sampling: Sampling, stream: bool = False) -> str:
    """The assistant's next turn after `messages`; with `stream`, its tokens are printed as they come."""
    import torch
    from transformers import TextStreamer

    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True) if stream else None
    with torch.no_grad():
        output = model.generate(
            **inputs, **sampling.generate_kwargs(), pad_token_id=tokenizer.pad_token_id, streamer=streamer
        )
    return tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip()


def answer(model, tokenizer, prompt: str, max_new_tokens: int) -> str:
    """A greedy answer to one user prompt (what quickstart.sh prints before and after training)."""
    return reply(model, tokenizer, [{"role": "user", "content": prompt}], Sampling(max_new_tokens=max_new_tokens))


def chat(model, tokenizer, system: str | None, sampling: Sampling, lines=sys.stdin) -> None:
    """A multi-turn chat on stdin/stdout: the whole conversation so far is the context of every answer."""
    history: list[dict] = []
    print("chat: type a message; /reset forgets the conversation, /exit quits", file=sys.stderr)
    while True:
        print("you> ", end="", flush=True)
        line = lines.readline()
        if not line or line.strip() == "/exit":
            print()
            return
        text = line.strip()
        if text == "/reset":
            history = []
            print("(conversation reset)")
            continue
        if not text:
            continue
        history.append({"role": "user", "content": text})
        print("assistant> ", end="", flush=True)
        history.append({"role": "assistant", "content": reply(model, tokenizer, with_system(history, system),
                                                               sampling, stream=True)})  # fmt: skip


def batch(model, tokenizer, source: Path, out, system: str | None, sampling: Sampling) -> int:
    """Answer every row of a JSONL file ({"prompt": str} or {"messages": [...]}, optional "system"); write each row
    with its "completion" added. Returns the number of rows."""
    count = 0
    for number, line in enumerate(source.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        row = json.loads(line)
        if "messages" in row:
            messages = row["messages"]
        elif "prompt" in row:
            messages = [{"role": "user", "content": row["prompt"]}]
        else:
            raise SystemExit(f"{source} row {number}: give a 'prompt' string or a 'messages' list (found {list(row)})")
        completion = reply(model, tokenizer, with_system(messages, row.get("system", system)), sampling)
        out.write(json.dumps({**row, "completion": completion}) + "\n")
        out.flush()
        count += 1
    return count


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--prompt", help="answer this one prompt and exit")
    parser.add_argument("--batch", type=Path, help="answer every row of this JSONL file")
    parser.add_argument("--out", type=Path, help="with --batch: write the answered rows here (default: stdout)")
    parser.add_argument("--system", help="a system prompt for every conversation")
    parser.add_argument("--max-new-tokens", type=number(int, "> 0", lambda v: v > 0), default=Sampling.max_new_tokens)
    parser.add_argument("--temperature", type=number(float, ">= 0 (0: greedy)", lambda v: v >= 0),
                        help="sample at this temperature (> 0); 0: greedy. Default: greedy, or 1 with --top-p/--top-k")  # fmt: skip
    parser.add_argument("--top-p", type=number(float, "in (0, 1]", lambda v: 0 < v <= 1),
                        help="nucleus sampling: keep the smallest set of tokens whose probability reaches P (implies "
                        "sampling; default 1: no cut)")  # fmt: skip
    parser.add_argument("--top-k", type=number(int, ">= 0 (0: no cut)", lambda v: v >= 0),
                        help="sample among the K most likely tokens (implies sampling; default 0: no cut)")  # fmt: skip
    parser.add_argument("--repetition-penalty", type=number(float, "> 0 (1: none)", lambda v: v > 0),
                        default=Sampling.repetition_penalty, help="> 1 discourages repeating tokens (default 1: none)")  # fmt: skip
    parser.add_argument("--seed", type=int, default=0, help="seed of the sampling")
    return parser


def main() -> None:
    parser = build_parser()
    args = parser.parse_args()
    sampling = sampling_from(args, parser)
    sys.path.insert(0, str(REPO))
    from transformers import set_seed

    from train.loop.progress import quiet_libraries

    quiet_libraries(verbose=False)  # the libraries' known warnings and loading bars would interleave with the chat
    set_seed(args.seed)
    model, tokenizer = load(args.checkpoint)
    model.eval()
    if args.prompt is not None:
        messages = with_system([{"role": "user", "content": args.prompt}], args.system)
        print(reply(model, tokenizer, messages, sampling))
    elif args.batch is not None:
        with args.out.open("w") if args.out else contextlib.nullcontext(sys.stdout) as out:
            count = batch(model, tokenizer, args.batch, out, args.system, sampling)
        print(f"answered {count} prompts" + (f" into {args.out}" if args.out else ""), file=sys.stderr)
    else:
        chat(model, tokenizer, args.system, sampling)


if __name__ == "__main__":
    main()
