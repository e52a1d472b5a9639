"""Collation (train/batching/collate.py): padded batches against exact tensors."""

import torch
from data_helpers import CONVERSATION

from train.batching.collate import collate
from train.data.chat import tokenize_conversation
from train.data.store import IGNORE_INDEX, Example


def test_collate_pads_to_longest_with_masked_labels():
    examples = [Example([1, 2, 3], [-100, 2, 3]), Example([4, 5], [-100, 5])]
    batch = collate(examples, pad_token_id=3)
    assert torch.equal(batch["input_ids"], torch.tensor([[1, 2, 3], [4, 5, 3]]))
    assert torch.equal(batch["labels"], torch.tensor([[-100, 2, 3], [-100, 5, -100]]))
    assert torch.equal(batch["attention_mask"], torch.tensor([[1, 1, 1], [1, 1, 0]]))


def test_eos_used_as_pad_is_still_supervised(tiny_tokenizers):
    tokenizer = tiny_tokenizers["chatml"]
    eos = tokenizer.eos_token_id
    short = tokenize_conversation(
        [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Arr"}], tokenizer, "a"
    )
    long = tokenize_conversation(CONVERSATION, tokenizer, "b")
    batch = collate([short, long], pad_token_id=eos)
    end = short.input_ids.index(eos, len(short.input_ids) - 3)
    assert batch["labels"][0, end] == eos  # the end of the response is learned
    assert (batch["labels"][0, len(short.input_ids) :] == IGNORE_INDEX).all()  # the padding is not
