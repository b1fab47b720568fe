"""The independent reference for the engines' logprob contract: one plain, unpadded PyTorch forward pass."""

from __future__ import annotations

import numpy as np
import torch


def forward_logprobs(model: torch.nn.Module, completion, temperature: float) -> np.ndarray:
    """log_softmax(logits / T) at the sampled ids of one engine `Completion`."""
    ids = np.concatenate([completion.prompt_token_ids, completion.token_ids]).astype(np.int64)
    with torch.no_grad():
        logits = model(torch.from_numpy(ids)[None]).logits[0].float()
    start = len(completion.prompt_token_ids) - 1
    lp = torch.log_softmax(logits[start:-1] / temperature, dim=-1)
    return lp.gather(1, torch.from_numpy(completion.token_ids.astype(np.int64))[:, None])[:, 0].numpy()
