"""The GRPO step with the AIS-mixed loss, in plain synchronous torch (callers run it in a thread).

Invariants:
- `prepare` never changes the parameters: it computes GRPO advantages per group and lp_pi, the
  current policy's logprob of every completion token, with no grad, at the rollout temperature,
  in the configured compute precision (BF16 autocast by default), before the update.
- `update` minimises `aisrl.core.grpo.mixed_ppo_loss` with the per-token coefficients it is given
  (c_i = (1 - alpha) + alpha * wt_i, 0 where masked), with lp_old = lp_pi; each minibatch is
  divided by its own PRE-mask token count, so masking never up-weights the surviving tokens.
  `gradient` is the same computation without the optimizer step (the autograd test uses it).
- With one epoch of one minibatch (and `reuse_forward`), lp_pi and the update share one forward
  pass: `prepare` runs it with grad and keeps its graph, lp_pi is its detached output (the same
  values a no-grad pass gives: alpha only needs them as constants), and `update` builds the loss
  on that graph, so the parameters must not change between the two (the learner runs one step
  at a time). Otherwise `update` recomputes its forward passes.
- Sequences are packed right-padded; token order everywhere is sequence order, then position,
  the order of `MismatchArrays` and of the coefficients.
- Randomness (minibatch order) comes from the trainer's own numpy Generator, whose state is
  checkpointed with the torch RNG state.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from aisrl.core.corrections import loss_weights
from aisrl.core.grpo import PPOStats, expand_to_tokens, group_advantages, mixed_ppo_loss, ppo_stats
from aisrl.core.types import CorrectionConfig, MismatchArrays
from aisrl.core.weights import log_ratios
from aisrl.services.learner.groups import Group
from aisrl.services.learner.prompt_sharing import prompt_index, shared_prompt_logprobs


@dataclass(frozen=True)
class TrainConfig:
    lr: float = 1e-5
    warmup_steps: int = 0
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float = 1.0
    ppo_epochs: int = 1
    minibatches: int = 1
    micro_batch_size: int = 64
    eps_lo: float = 0.2
    eps_hi: float = 0.2
    temperature: float = 1.0
    std_normalize: bool = True
    compute_dtype: str = "bfloat16"
    seed: int = 0
    reuse_forward: bool = True
    share_prompts: bool = True


@dataclass
class PreparedBatch:
    """One batch packed for the model, with lp_pi and advantages (module invariant)."""

    input_ids: torch.Tensor  # long[S, T], right-padded
    attention_mask: torch.Tensor  # long[S, T]
    target_mask: torch.Tensor  # bool[S, T]: completion tokens (each predicted from the position before)
    row_lengths: np.ndarray  # int64[S]: prompt + completion tokens per row
    lengths: np.ndarray  # int64[S]: completion tokens per row
    offsets: np.ndarray  # int64[S]: first flat token index of each row
    seq_advantages: np.ndarray  # float64[S]
    token_advantages: np.ndarray  # float64[N]
    lp_mu: np.ndarray  # float64[N], rollout logprobs (float32 values)
    lp_pi: np.ndarray  # float64[N], learner logprobs before the update (float32 values)
    rewards: np.ndarray  # float64[S]
    prompts: np.ndarray | None = None  # int64[S]: rows with equal numbers share their prompt (prompt_sharing.py)
    # (rows, lp with grad) per micro-batch of the forward pass lp_pi came from, for `update` to reuse
    graph: list[tuple[np.ndarray, torch.Tensor]] | None = None
    # (id of the trainer, its update count) when the graph was made: the graph is only valid for that
    # trainer's parameters, before any optimizer step
    graph_key: tuple[int, int] | None = None

    def take_graph(self, key: tuple[int, int]) -> list[tuple[np.ndarray, torch.Tensor]] | None:
        """The kept forward pass, once, if it was made by the trainer and parameters `key` names (else None:
        the caller runs a fresh forward). Memory is freed when the update is done with it."""
        graph, self.graph = self.graph, None
        return graph if self.graph_key == key else None

    @property
    def n_tokens(self) -> int:
        return int(self.lengths.sum())

    @property
    def arrays(self) -> MismatchArrays:
        return MismatchArrays(self.lp_pi, self.lp_mu, self.lengths, self.seq_advantages)

    def token_index(self, rows: np.ndarray) -> np.ndarray:
        """Flat token indices of rows, in the order of rows."""
        return np.concatenate([np.arange(self.offsets[r], self.offsets[r] + self.lengths[r]) for r in rows])


@dataclass(frozen=True)
class UpdateStats:
    loss: float  # first minibatch of the first epoch (r = 1 there)
    grad_norm: float  # mean pre-clip norm over the optimizer updates
    lr: float
    clip_fraction: float  # last epoch, kept tokens
    approx_kl: float  # k3 KL(old || theta) over kept tokens, as the last epoch saw them
    updates: int
    seconds: float


def token_coefficients(arrays: MismatchArrays, config: CorrectionConfig, alpha: float, keep: np.ndarray) -> np.ndarray:
    """c_i = (1 - alpha) + alpha * wt_i on kept tokens, 0 elsewhere (docs/ais.md), for any alpha.

    wt_i = min(w_i, C), self-normalized over the kept tokens when the config says so. The diagnostics
    service answers with alpha and statistics only; the masks (mis, veto, opsm, IcePop, rejection,
    M2PO) do not depend on alpha, so they come from the local computation and this function applies alpha.
    """
    if not 0.0 <= alpha <= 1.0 or not math.isfinite(alpha):
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    wt = loss_weights(log_ratios(arrays.lp_pi, arrays.lp_mu), arrays.lengths, config, keep)
    return np.where(keep, (1.0 - alpha) + alpha * wt, 0.0)


def merge_stats(parts: Sequence[PPOStats]) -> PPOStats:
    """PPO statistics of several token sets as one (means weighted by kept tokens)."""
    n = sum(p.n_kept for p in parts)
    if n == 0:
        return PPOStats(0, 0.0, 1.0, 1.0, 1.0, 0.0)
    kept = [p for p in parts if p.n_kept]

    def mean(name: str) -> float:
        return sum(getattr(p, name) * p.n_kept for p in kept) / n

    return PPOStats(n, mean("clip_fraction"), mean("ratio_mean"), min(p.ratio_min for p in kept),
                    max(p.ratio_max for p in kept), mean("approx_kl"))  # fmt: skip


def pack(
    groups: Sequence[Group], pad_id: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, np.ndarray, np.ndarray]:
    """Right-padded input ids, attention mask, completion-target mask, row lengths and completion lengths."""
    rows = [(s.prompt_ids, s.completion_ids) for g in groups for s in g.samples]
    row_lengths = np.array([len(p) + len(c) for p, c in rows], dtype=np.int64)
    lengths = np.array([len(c) for _, c in rows], dtype=np.int64)
    width = int(row_lengths.max())
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    target = torch.zeros((len(rows), width), dtype=torch.bool)
    for i, (p, c) in enumerate(rows):
        ids = np.concatenate([p, c]).astype(np.int64)
        input_ids[i, : len(ids)] = torch.from_numpy(ids)
        attention[i, : len(ids)] = 1
        target[i, len(p) : len(ids)] = True
    return input_ids, attention, target, row_lengths, lengths


class Trainer:
    """Owns the model (float32 master weights) and the AdamW optimizer."""

    def __init__(self, model: torch.nn.Module, config: TrainConfig, pad_id: int = 0, device: str | None = None) -> None:
        self.config = config
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = model.to(self.device, dtype=torch.float32)
        self.model.train()
        self.pad_id = pad_id
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(), lr=config.lr, betas=config.betas, weight_decay=config.weight_decay
        )
        self.rng = np.random.default_rng(config.seed)
        self.updates = 0  # optimizer updates so far (drives the warmup)

    # -- precision

    def _autocast(self):
        if self.config.compute_dtype == "float32":
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)

    def lr_now(self) -> float:
        warm = self.config.warmup_steps
        return self.config.lr * (min(1.0, (self.updates + 1) / warm) if warm else 1.0)

    # -- logprobs

    def token_logprobs(self, input_ids: torch.Tensor, attention: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """log pi(y_t | y_<t) at the rollout temperature for every target token, flat in row order."""
        width = int(attention.sum(dim=1).max())
        ids, att, tgt = (t[:, :width].to(self.device) for t in (input_ids, attention, target))
        with self._autocast():
            logits = self.model(input_ids=ids, attention_mask=att).logits
        logits = logits[:, :-1].float() / self.config.temperature
        picked = tgt[:, 1:]
        lp = torch.log_softmax(logits[picked], dim=-1)
        out = lp.gather(-1, ids[:, 1:][picked].unsqueeze(-1)).squeeze(-1)
        return torch.clamp(out, max=0.0)  # log_softmax can round a certain token to +1e-7

    def rows_logprobs(self, prepared: PreparedBatch, rows: np.ndarray) -> torch.Tensor:
        """token_logprobs of these rows' completion tokens; each distinct prompt runs once with share_prompts."""
        r = torch.from_numpy(rows)
        if self.config.share_prompts and prepared.prompts is not None:
            prompt_lengths = prepared.row_lengths[rows] - prepared.lengths[rows]
            return shared_prompt_logprobs(
                self.model, prepared.input_ids[r].to(self.device), prompt_lengths, prepared.lengths[rows],
                prepared.prompts[rows], self.pad_id, self.config.temperature, self._autocast,
            )  # fmt: skip
        return self.token_logprobs(prepared.input_ids[r], prepared.attention_mask[r], prepared.target_mask[r])

    @torch.no_grad()
    def logprobs(self, prepared: PreparedBatch) -> np.ndarray:
        """lp of every completion token under the current parameters (no grad), float64[N] of float32 values."""
        out = [self.rows_logprobs(prepared, rows) for rows in self._micro(np.arange(len(prepared.lengths)))]
        return torch.cat(out).float().cpu().numpy().astype(np.float64)

    def _forward_with_graph(self, prepared: PreparedBatch) -> list[tuple[np.ndarray, torch.Tensor]]:
        return [(rows, self.rows_logprobs(prepared, rows)) for rows in self._micro(np.arange(len(prepared.lengths)))]

    @property
    def reuses_forward(self) -> bool:
        """Whether lp_pi's forward pass is also the update's (module invariant)."""
        c = self.config
        return c.reuse_forward and c.ppo_epochs == 1 and c.minibatches == 1

    def _micro(self, rows: np.ndarray) -> list[np.ndarray]:
        size = self.config.micro_batch_size
        return [rows[i : i + size] for i in range(0, len(rows), size)]

    # -- the step

    def prepare(self, groups: Sequence[Group]) -> PreparedBatch:
        """Advantages per group and lp_pi before the update (module invariant)."""
        if not groups:
            raise ValueError("prepare: empty batch")
        input_ids, attention, target, row_lengths, lengths = pack(groups, self.pad_id)
        adv = np.concatenate([group_advantages(g.rewards, std_normalize=self.config.std_normalize) for g in groups])
        offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
        lp_mu = np.concatenate([s.lp_mu for g in groups for s in g.samples]).astype(np.float64)
        rewards = np.concatenate([g.rewards for g in groups])
        prepared = PreparedBatch(
            input_ids, attention, target, row_lengths, lengths, offsets, adv, expand_to_tokens(adv, lengths),
            lp_mu, np.empty(0), rewards, prompt_index([s.prompt_ids for g in groups for s in g.samples]),
        )  # fmt: skip
        if self.reuses_forward:
            prepared.graph = self._forward_with_graph(prepared)
            prepared.graph_key = self._graph_key()
            lp = torch.cat([lp.detach() for _, lp in prepared.graph])
            prepared.lp_pi = lp.float().cpu().numpy().astype(np.float64)
        else:
            prepared.lp_pi = self.logprobs(prepared)
        return prepared

    def _minibatch_grad(
        self,
        prepared: PreparedBatch,
        rows: np.ndarray,
        coef: np.ndarray,
        graph: list[tuple[np.ndarray, torch.Tensor]] | None = None,
    ) -> tuple[float, PPOStats]:
        """Accumulates the gradient of one minibatch's loss (divided by its pre-mask token count).

        `graph`, when given, is the forward pass of exactly these rows (prepare's), used instead of a new one.
        Returns the loss and the PPO statistics of the tokens as the forward pass saw them.
        """
        denominator = float(prepared.lengths[rows].sum())
        total, seen = 0.0, []
        for micro, kept in graph or [(m, None) for m in self._micro(rows)]:
            idx = prepared.token_index(micro)
            lp = self.rows_logprobs(prepared, micro) if kept is None else kept
            old, adv, c = prepared.lp_pi[idx], prepared.token_advantages[idx], coef[idx]
            loss = mixed_ppo_loss(lp, old, adv, c, denominator, self.config.eps_lo, self.config.eps_hi)
            loss.backward()
            total += float(loss.detach())
            seen.append(ppo_stats(lp.detach(), old, adv, c, self.config.eps_lo, self.config.eps_hi))
        return total, merge_stats(seen)

    def gradient(self, prepared: PreparedBatch, coef: np.ndarray) -> dict[str, torch.Tensor]:
        """The full-batch gradient of the loss with these coefficients (no optimizer step)."""
        self.optimizer.zero_grad(set_to_none=True)
        self._minibatch_grad(prepared, np.arange(len(prepared.lengths)), coef)
        grads = {n: p.grad.detach().clone() for n, p in self.model.named_parameters() if p.grad is not None}
        self.optimizer.zero_grad(set_to_none=True)
        return grads

    def _graph_key(self) -> tuple[int, int]:
        return (id(self), self.updates)

    def update(self, prepared: PreparedBatch, coef: np.ndarray) -> UpdateStats:
        """ppo_epochs x minibatches AdamW updates on the mixed loss (module invariant)."""
        started = time.perf_counter()
        if coef.shape != prepared.lp_pi.shape:
            raise ValueError(f"coefficients have shape {coef.shape}, the batch has {prepared.lp_pi.shape} tokens")
        n_rows = len(prepared.lengths)
        parts = min(self.config.minibatches, n_rows)
        graph = prepared.take_graph(self._graph_key())
        if graph is not None and (self.config.ppo_epochs, parts) != (1, 1):
            raise ValueError("a kept forward pass serves one epoch of one minibatch only")
        losses, norms, seen, lr = [], [], [], self.lr_now()
        for _ in range(self.config.ppo_epochs):
            for rows in np.array_split(self.rng.permutation(n_rows), parts):
                if graph is not None:  # the kept pass covers every row in batch order (the draw keeps the RNG stream)
                    rows = np.concatenate([micro for micro, _ in graph])
                lr = self.lr_now()
                for group in self.optimizer.param_groups:
                    group["lr"] = lr
                self.optimizer.zero_grad(set_to_none=True)
                loss, stats = self._minibatch_grad(prepared, rows, coef, graph)
                graph = None
                losses.append(loss)
                seen.append(stats)
                clip = self.config.grad_clip if self.config.grad_clip > 0 else math.inf
                norms.append(float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip)))
                self.optimizer.step()
                self.updates += 1
        self.optimizer.zero_grad(set_to_none=True)
        last = merge_stats(seen[-parts:])  # the last epoch: how far the policy moved from lp_old
        return UpdateStats(
            loss=losses[0], grad_norm=float(np.mean(norms)), lr=lr, clip_fraction=last.clip_fraction,
            approx_kl=last.approx_kl, updates=len(norms), seconds=time.perf_counter() - started,
        )  # fmt: skip

    @torch.no_grad()
    def batch_loss(self, prepared: PreparedBatch, coef: np.ndarray) -> float:
        """The whole batch's loss under the current parameters, with lp_old = prepared.lp_pi."""
        lp = torch.from_numpy(self.logprobs(prepared))
        return float(mixed_ppo_loss(lp, prepared.lp_pi, prepared.token_advantages, coef, float(prepared.n_tokens),
                                    self.config.eps_lo, self.config.eps_hi))  # fmt: skip

    # -- weights and state

    def weights_state(self, dtype: torch.dtype = torch.bfloat16) -> dict[str, torch.Tensor]:
        """A CPU copy of the parameters in the served dtype (what rollout workers load)."""
        return {
            k: v.detach().to("cpu", dtype=dtype, copy=True).contiguous() for k, v in self.model.state_dict().items()
        }

    def rng_state(self) -> dict:
        state = {"numpy": self.rng.bit_generator.state, "torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def set_rng_state(self, state: dict) -> None:
        self.rng.bit_generator.state = state["numpy"]
        torch.set_rng_state(state["torch"])
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])
