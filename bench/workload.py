"""The training workload the GPU check and the memory benchmark share: synthetic packed / padded batches
and one optimizer step of a FlyThinker (torch only)."""

from __future__ import annotations

from contextlib import nullcontext

import torch

IGNORE = -100


# ---- batches (shared with bench.memory) -----------------------------------------------------------------------

def _rows(lengths, vocab, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=g) for n in lengths]


def _labels(row):
    labels = row.clone()
    labels[: len(row) // 2] = IGNORE  # first half prompt (no loss); a row's first token is never a target
    return labels


def packed_batch(lengths, vocab, seed=0, device="cpu"):
    """One (1, T) row of all sequences back to back, position ids restarting per sequence (no padding)."""
    rows = _rows(lengths, vocab, seed)
    return {"input_ids": torch.cat(rows)[None].to(device),
            "position_ids": torch.cat([torch.arange(len(r)) for r in rows])[None].to(device),
            "labels": torch.cat([_labels(r) for r in rows])[None].to(device)}


def padded_batch(lengths, vocab, seed=0, device="cpu"):
    """The same rows right-padded to the longest: (B, W) ids, attention mask, labels."""
    rows, width = _rows(lengths, vocab, seed), max(lengths)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask, labels = torch.zeros_like(ids), torch.full_like(ids, IGNORE)
    for i, r in enumerate(rows):
        ids[i, :len(r)], mask[i, :len(r)], labels[i, :len(r)] = r, 1, _labels(r)
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device), "labels": labels.to(device)}


def train_step(model, optimizer, micro_batches, scale_dtype=torch.float32, clip=1.0) -> float:
    """One optimizer step over micro-batches (token-mean over all of them); gradients reduce-scattered
    after the last one only; s computed once. Returns the loss."""
    from flythinker_worker.sharding import StepScale, clip_and_step, no_gradient_sync

    tokens = sum(int((mb["labels"][:, 1:] != IGNORE).sum()) for mb in micro_batches)
    total = 0.0
    with StepScale(model, scale_dtype):
        for i, mb in enumerate(micro_batches):
            defer = i < len(micro_batches) - 1 and hasattr(model, "set_requires_gradient_sync")
            with no_gradient_sync(model) if defer else nullcontext():
                out = model(mb["input_ids"], mb.get("attention_mask"), labels=mb["labels"],
                            position_ids=mb.get("position_ids"), num_items_in_batch=tokens)
                out.loss.backward()
                total += float(out.loss.detach())
    clip_and_step(model, optimizer, clip)
    optimizer.zero_grad(set_to_none=True)
    return total
