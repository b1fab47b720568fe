"""Completion-token logprobs with each distinct prompt run through the model once, not once per sample.

GRPO samples G completions per prompt, and a short-answer task's prompt is most of each row (Countdown:
about 22 prompt tokens and 7 completion tokens), so a plain packed forward pass spends most of its
work recomputing the same prompt G times, in the forward pass and again in the backward pass.
Here a micro-batch is run in two passes:
1. its distinct prompts, right-padded, with the KV cache kept (and only the logits of each prompt's
   last position computed: they predict the first completion token);
2. its completions (all tokens but the last), right-padded, on that cache with its rows selected per
   sample (`Cache.reorder_cache`, an index_select), at positions prompt length + j.

Invariant: the result is the packed pass's (`Trainer.token_logprobs`) up to float rounding: the same
log pi(y_t | y_<t) at the rollout temperature for every completion token, flat in row order then
position, differentiable with respect to the parameters (the prompt pass's gradient is the sum over
the samples that share it, which is what autograd gives through the index_select). Prompt padding is
masked out of every key; padded completion positions are computed and never read.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import numpy as np
import torch


def prompt_index(prompts: list[np.ndarray]) -> np.ndarray:
    """int64[S]: the same number for rows whose prompt token ids are equal, in order of first appearance."""
    seen: dict[bytes, int] = {}
    return np.array([seen.setdefault(np.asarray(p, dtype=np.int64).tobytes(), len(seen)) for p in prompts],
                    dtype=np.int64)  # fmt: skip


def shared_prompt_logprobs(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    prompt_lengths: np.ndarray,
    lengths: np.ndarray,
    prompts: np.ndarray,
    pad_id: int,
    temperature: float,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
) -> torch.Tensor:
    """Flat logprobs of the completion tokens of these rows (module invariant).

    input_ids: long[B, T], each row its prompt then its completion, right-padded; prompt_lengths and
    lengths: int[B] prompt and completion tokens per row; prompts: int[B] the rows' `prompt_index`.
    """
    device = input_ids.device
    distinct, first_row, row_prompt = np.unique(prompts, return_index=True, return_inverse=True)
    p_len = prompt_lengths[first_row]
    width = int(p_len.max())
    columns = np.arange(width)
    p_mask = torch.from_numpy(columns[None, :] < p_len[:, None]).to(device)
    p_ids = torch.where(p_mask, input_ids[torch.from_numpy(first_row).to(device), :width], pad_id)
    last = p_len - 1  # the position whose logits predict the first completion token
    keep = np.unique(last)
    positions = torch.from_numpy(columns).expand(len(distinct), -1).to(device)
    with autocast():
        out = model(input_ids=p_ids, attention_mask=p_mask.long(), position_ids=positions, use_cache=True,
                    logits_to_keep=torch.from_numpy(keep).to(device))  # fmt: skip
    at = torch.from_numpy(np.searchsorted(keep, last)).to(device)
    first_logits = out.logits[torch.arange(len(distinct), device=device), at]  # [U, V]
    row_prompt_t = torch.from_numpy(row_prompt.astype(np.int64)).to(device)
    logits = [first_logits[row_prompt_t].unsqueeze(1)]  # [B, 1, V]

    c_width = int(lengths.max())
    c_cols = np.arange(c_width)
    c_valid = c_cols[None, :] < lengths[:, None]  # [B, C]
    gather_cols = np.minimum(prompt_lengths[:, None] + c_cols[None, :], input_ids.shape[1] - 1)
    c_ids = torch.gather(input_ids, 1, torch.from_numpy(gather_cols).to(device))
    c_ids = torch.where(torch.from_numpy(c_valid).to(device), c_ids, pad_id)
    if c_width > 1:  # completion tokens 0..C-2 predict tokens 1..C-1
        cache = out.past_key_values
        cache.reorder_cache(row_prompt_t)
        mask = torch.cat([p_mask[row_prompt_t], torch.from_numpy(c_valid[:, :-1]).to(device)], dim=1).long()
        positions = torch.from_numpy(prompt_lengths[:, None] + c_cols[None, :-1]).to(device)
        with autocast():
            rest = model(input_ids=c_ids[:, :-1], attention_mask=mask, position_ids=positions, past_key_values=cache,
                         use_cache=True).logits  # fmt: skip
        logits.append(rest)
    valid = torch.from_numpy(c_valid).to(device)
    picked = torch.cat(logits, dim=1)[valid].float() / temperature  # [N, V], row order then position
    lp = torch.log_softmax(picked, dim=-1).gather(-1, c_ids[valid].unsqueeze(-1)).squeeze(-1)
    return torch.clamp(lp, max=0.0)  # log_softmax can round a certain token to +1e-7
