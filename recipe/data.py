"""SFT-style data for FlyThinker: verl `messages` parquet -> (prompt ids, response ids), loss on the
assistant turn only; deterministic epoch order so a resumed run sees the same batches."""

from __future__ import annotations

import logging

import pandas as pd
import torch
from tqdm import tqdm

from flythinker_worker.model import IGNORE_INDEX

logger = logging.getLogger(__name__)


def pad_token_id(tokenizer) -> int:
    """The id that pads batches: the tokenizer's pad token, else its EOS."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def conversation(row: dict) -> list[dict]:
    """The row's messages, ending with the assistant turn (`messages`, or `prompt` + `response`)."""
    path, index = row.get("_source", ("<rows>", "?"))
    if "messages" in row and row["messages"] is not None:
        messages = [dict(m) for m in row["messages"]]
    elif "prompt" in row and "response" in row:
        messages = [dict(m) for m in row["prompt"]] + [{"role": "assistant", "content": row["response"]}]
    else:
        raise ValueError(f"{path} row {index}: needs a `messages` column (or `prompt` + `response`)")
    if not messages or messages[-1].get("role") != "assistant":
        raise ValueError(f"{path} row {index}: the last message must be the assistant turn")
    return messages


def prompt_ids(tokenizer, messages, max_prompt_length: int | None = None) -> tuple[list[int], bool]:
    """(ids, cut): the chat-templated prompt (system/user turns, no assistant turn) with the assistant
    header appended. Over budget it keeps its LAST tokens: the query and the header sit at the end."""
    messages = [{"role": m["role"], "content": m["content"]} for m in messages]
    ids = list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                             return_dict=False))
    if max_prompt_length is not None and len(ids) > max_prompt_length:
        return ids[-max_prompt_length:], True
    return ids, False


def response_ids(tokenizer, text: str, max_response_length: int | None = None) -> tuple[list[int], bool]:
    """(ids, cut): the assistant text's tokens then EOS; over budget the end is cut."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    if max_response_length is not None and len(ids) > max_response_length:
        return ids[:max_response_length], True
    return ids, False


def read_rows(files: list[str]) -> list[dict]:
    """All rows of the parquet files, in file order."""
    rows = []
    for path in files:
        try:
            frame = pd.read_parquet(path)
        except FileNotFoundError:
            raise FileNotFoundError(f"data file not found: {path}") from None
        for index, row in enumerate(frame.to_dict("records")):
            row["_source"] = (path, index)
            rows.append(row)
    return rows


class SFTDataset:
    """Tokenised (prompt, response) pairs. Prompts over budget keep their LAST tokens (the query sits at
    the end); responses over budget are cut at the end."""

    def __init__(self, files: list[str], tokenizer, max_prompt_length: int, max_response_length: int,
                 desc: str = "tokenising"):
        self.tokenizer = tokenizer
        self.pad_id = pad_token_id(tokenizer)
        self.rows = read_rows(files)
        if not self.rows:
            raise ValueError(f"no rows in {files}")
        self.prompts, self.responses = [], []
        cut_prompts = cut_responses = 0
        for row in tqdm(self.rows, desc=desc, leave=False):
            messages = conversation(row)
            prompt, cut_prompt = prompt_ids(tokenizer, messages[:-1], max_prompt_length)
            response, cut_response = response_ids(tokenizer, messages[-1]["content"], max_response_length)
            cut_prompts += cut_prompt
            cut_responses += cut_response
            self.prompts.append(prompt)
            self.responses.append(response)
        if cut_prompts or cut_responses:
            logger.warning("%s: truncated %d prompts and %d responses to the length budget", files,
                           cut_prompts, cut_responses)

    def __len__(self) -> int:
        return len(self.prompts)

    def collate(self, indices: list[int | None]) -> dict[str, torch.Tensor]:
        """Right-padded batch; an index of None is a filler row with no loss (keeps ranks even)."""
        seqs, labels = [], []
        for i in indices:
            if i is None:
                seqs.append([self.pad_id])
                labels.append([IGNORE_INDEX])
                continue
            prompt, response = self.prompts[i], self.responses[i]
            seqs.append(prompt + response)
            labels.append([IGNORE_INDEX] * len(prompt) + response)
        width = max(len(s) for s in seqs)
        input_ids = torch.full((len(seqs), width), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(seqs), width), dtype=torch.long)
        label_tensor = torch.full((len(seqs), width), IGNORE_INDEX, dtype=torch.long)
        for row, (seq, lab) in enumerate(zip(seqs, labels)):
            input_ids[row, :len(seq)] = torch.tensor(seq)
            attention_mask[row, :len(seq)] = 1
            label_tensor[row, :len(lab)] = torch.tensor(lab)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": label_tensor}


def epoch_order(size: int, epoch: int, seed: int, shuffle: bool) -> list[int]:
    """Sample order of one epoch: a function of (seed, epoch) only, so resume reproduces it."""
    if not shuffle:
        return list(range(size))
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(size, generator=generator).tolist()


def train_batch_indices(step: int, size: int, batch_size: int, seed: int, shuffle: bool) -> list[int]:
    """Indices of global step `step` (0-based); the last incomplete batch of an epoch is dropped."""
    steps_per_epoch = size // batch_size
    epoch, within = divmod(step, steps_per_epoch)
    order = epoch_order(size, epoch, seed, shuffle)
    return order[within * batch_size:(within + 1) * batch_size]
