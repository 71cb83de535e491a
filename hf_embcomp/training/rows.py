"""The one minibatch loop every learned method fits with (autoencoders, codes), run through Accelerate.

A method supplies a module and a ``step_fn`` computing the loss of a batch of rows; this loop handles
seeding, batching over the V rows, the optimiser, the progress bar and devices (Accelerate: a GPU or
several processes when launched with ``accelerate launch``).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Callable

import torch
from accelerate import Accelerator
from torch import nn
from tqdm.auto import tqdm

from ..progress import disabled as progress_disabled

logger = logging.getLogger(__name__)

StepFn = Callable[[nn.Module, torch.Tensor, float], torch.Tensor]
"""(module, rows [B, d] float32, progress in [0, 1)) -> scalar loss."""


def train_rows(
    module: nn.Module,
    rows: torch.Tensor | Sequence[torch.Tensor],
    step_fn: StepFn,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    seed: int = 0,
    lr_decay_every: int | None = None,
    lr_decay: float = 0.5,
    max_grad_norm: float | None = None,
    desc: str = "fit",
    accelerator: Accelerator | None = None,
    on_epoch_end: Callable[[int, nn.Module], None] | None = None,
) -> list[float]:
    """Train ``module`` with Adam on minibatches of the rows of a matrix.

    Args:
        module: the trainable model (moved to the accelerator's device).
        rows: float32 [N, d], the training rows (e.g. the token embedding E or a residual); or a sequence of
            float32 [N, d_i] whose batches are joined column-wise (a batch of ``(E, R)`` equals the batch of
            ``torch.cat([E, R], 1)`` without that [N, sum d_i] copy of every row).
        step_fn: computes the loss of a batch; gets the training progress (epoch fraction / epochs).
        epochs, batch_size, lr: the schedule; rows are reshuffled every epoch by a seeded generator.
        lr_decay_every: StepLR period in epochs (None: constant lr); ``lr_decay`` its gamma.
        max_grad_norm: global-norm gradient clipping (None: off).
        on_epoch_end: called as ``on_epoch_end(epoch, module)`` (unwrapped module, eval mode) after every
            epoch, e.g. for checkpoint selection on a held-out criterion.

    Returns:
        The mean loss of each epoch (floats).
    """
    acc = accelerator or Accelerator()
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam([p for p in module.parameters() if p.requires_grad], lr=lr)
    sched = torch.optim.lr_scheduler.StepLR(opt, lr_decay_every, lr_decay) if lr_decay_every else None
    module, opt = acc.prepare(module, opt)
    parts = [t.to(acc.device) for t in ([rows] if isinstance(rows, torch.Tensor) else rows)]
    n = parts[0].shape[0]
    steps_per_epoch = math.ceil(n / batch_size)
    history: list[float] = []
    bar = tqdm(total=epochs * steps_per_epoch, desc=desc, disable=progress_disabled() or not acc.is_local_main_process,
               leave=False)
    module.train()
    for epoch in range(epochs):
        perm = torch.randperm(n, generator=gen).to(acc.device)
        total = 0.0
        for i in range(steps_per_epoch):
            idx = perm[i * batch_size : (i + 1) * batch_size]
            batch = parts[0][idx] if len(parts) == 1 else torch.cat([t[idx] for t in parts], 1)
            progress = (epoch + i / steps_per_epoch) / epochs
            loss = step_fn(module, batch, progress)
            opt.zero_grad(set_to_none=True)
            acc.backward(loss)
            if max_grad_norm is not None:
                acc.clip_grad_norm_(module.parameters(), max_grad_norm)
            opt.step()
            total += float(loss.detach()) * batch.shape[0]
            bar.update(1)
        if sched is not None:
            sched.step()
        history.append(total / n)
        bar.set_postfix(loss=f"{history[-1]:.4g}")
        logger.info("%s epoch %d/%d loss %.6g", desc, epoch + 1, epochs, history[-1])
        if on_epoch_end is not None:
            module.eval()
            with torch.no_grad():
                on_epoch_end(epoch, acc.unwrap_model(module))
            module.train()
    bar.close()
    module.eval()
    return history
