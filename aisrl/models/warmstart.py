"""Supervised warm start: teach a fresh tiny model a task's format and some of its skill from references.

Invariant: the result depends only on the settings (seed included): training problems are
`task.train_problem(seed, i)` for i = 0, 1, ..., the initial weights come from the seed, and no
global RNG is touched. The loss covers the completion only (`reference` + newline), never the
prompt, so the model learns to answer and then stop, the same convention the rollout engines and
verifiers use. Held-out greedy accuracy on the task's eval split is measured before and after and
saved with the model (`warmstart.json`), so every later run knows where its policy started.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch

from aisrl.models.config import WarmStartSettings
from aisrl.models.tiny import create_model, load_model, save_model
from aisrl.models.tokenizer import EOS_ID, NEWLINE_ID, PAD_ID, build_char_tokenizer, encode

IGNORE = -100  # label of positions that carry no loss (prompt and padding)


@dataclass(frozen=True)
class EvalResult:
    """Greedy evaluation on held-out problems: accuracy = share with reward 1, and the mean reward."""

    accuracy: float
    mean_reward: float
    n: int


@dataclass(frozen=True)
class WarmStartResult:
    before: EvalResult | None
    after: EvalResult | None
    final_loss: float
    seconds: float
    out: str


def make_batch(examples: Sequence[tuple[str, str]], max_positions: int) -> dict[str, torch.Tensor]:
    """Right-padded ids and labels of prompt + completion; labels are IGNORE on the prompt and padding."""
    rows, labels = [], []
    for prompt, completion in examples:
        prompt_ids = encode(prompt)
        completion_ids = encode(completion)[1:]  # no second BOS
        ids = prompt_ids + completion_ids
        if len(ids) > max_positions:
            raise ValueError(f"example of {len(ids)} tokens exceeds max_positions={max_positions}: {prompt!r}")
        rows.append(ids)
        labels.append([IGNORE] * len(prompt_ids) + completion_ids)
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), PAD_ID, dtype=torch.long)
    target = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (ids, lab) in enumerate(zip(rows, labels, strict=True)):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        target[i, : len(lab)] = torch.tensor(lab)
        mask[i, : len(ids)] = 1
    return {"input_ids": input_ids, "labels": target, "attention_mask": mask}


def completion_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean next-token cross-entropy over completion tokens only."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]).float(), batch["labels"][:, 1:].reshape(-1), ignore_index=IGNORE
    )


def lr_at(step: int, settings: WarmStartSettings) -> float:
    """Linear warmup to `lr`, then cosine decay to 10% of it."""
    if step < settings.warmup_steps:
        return settings.lr * (step + 1) / settings.warmup_steps
    progress = (step - settings.warmup_steps) / max(1, settings.steps - settings.warmup_steps)
    return settings.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


@torch.no_grad()
def greedy_completions(model, prompts: Sequence[str], max_new_tokens: int, batch_size: int = 128) -> list[str]:
    """Greedy completions up to and including the first newline (or EOS, or the token limit)."""
    tokenizer = build_char_tokenizer()
    model.eval()
    texts: list[str] = []
    for start in range(0, len(prompts), batch_size):
        chunk = [encode(p, tokenizer) for p in prompts[start : start + batch_size]]
        width = max(len(ids) for ids in chunk)
        input_ids = torch.tensor([[PAD_ID] * (width - len(ids)) + ids for ids in chunk])
        mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in chunk])
        out = model.generate(
            input_ids=input_ids,
            attention_mask=mask,
            do_sample=False,
            max_new_tokens=max_new_tokens,
            eos_token_id=[NEWLINE_ID, EOS_ID],
            pad_token_id=PAD_ID,
        )
        texts.extend(tokenizer.decode(row[width:].tolist(), skip_special_tokens=True) for row in out)
    return texts


def evaluate(model, task, problems: Sequence, max_new_tokens: int) -> EvalResult:
    """Greedy accuracy of the model on problems, scored by the task's verifier."""
    if not problems:
        return EvalResult(0.0, 0.0, 0)
    completions = greedy_completions(model, [p.prompt for p in problems], max_new_tokens)
    rewards = [float(task.verify(p, c)) for p, c in zip(problems, completions, strict=True)]
    return EvalResult(sum(r >= 1.0 for r in rewards) / len(rewards), sum(rewards) / len(rewards), len(rewards))


def warm_start(settings: WarmStartSettings, console=None) -> WarmStartResult:
    """Trains a fresh tiny model on the task's references and saves it to `settings.out`."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from aisrl.tasks import get_task

    console = console or Console()
    task = get_task(settings.task, **settings.task_options)
    held_out = task.eval_split(settings.eval_size) if settings.eval_size else []
    start = time.perf_counter()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(settings.seed)
        model = create_model(settings.model_shape(), seed=settings.seed)
        before = evaluate(model, task, held_out, settings.max_new_tokens) if held_out else None
        if before:
            console.print(f"[bold]before[/]: greedy accuracy {before.accuracy:.1%} on {before.n} held-out problems")
        optimizer = torch.optim.AdamW(
            model.parameters(), lr=settings.lr, betas=(0.9, 0.95), weight_decay=settings.weight_decay
        )
        loss_value = float("nan")
        columns = (TextColumn("warm start"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"))
        with Progress(*columns, TimeElapsedColumn(), console=console, transient=False) as progress:
            bar = progress.add_task("train", total=settings.steps, info="")
            model.train()
            for step in range(settings.steps):
                problems = [
                    task.train_problem(settings.seed, step * settings.batch_size + i)
                    for i in range(settings.batch_size)
                ]
                batch = make_batch([(p.prompt, _completion(p.reference)) for p in problems], settings.max_positions)
                for group in optimizer.param_groups:
                    group["lr"] = lr_at(step, settings)
                loss = completion_loss(model, batch)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                optimizer.step()
                if step % settings.log_every == 0 or step == settings.steps - 1:
                    loss_value = float(loss.detach())
                    progress.update(bar, info=f"loss {loss_value:.3f} lr {lr_at(step, settings):.1e}")
                progress.advance(bar)
    out = save_model(model, settings.out)
    # Evaluate what was saved (BF16 weights), which is what the rollout engines will load.
    after = evaluate(load_model(out), task, held_out, settings.max_new_tokens) if held_out else None
    seconds = time.perf_counter() - start
    result = WarmStartResult(before, after, loss_value, seconds, str(out))
    record = {"settings": settings.model_dump(mode="json"), "result": asdict(result)}
    (out / "warmstart.json").write_text(json.dumps(record, indent=2) + "\n")
    if after:
        console.print(
            f"[bold]after[/]: greedy accuracy {after.accuracy:.1%} (mean reward {after.mean_reward:.3f}) on "
            f"{after.n} held-out problems, {seconds:.0f} s; model saved to {out}"
        )
    return result


def _completion(reference: str) -> str:
    """The training target: the reference answer, then the newline that ends it."""
    if "\n" in reference:
        raise ValueError(f"Problem.reference must be one line (the answer ends at the first newline): {reference!r}")
    return reference + "\n"
