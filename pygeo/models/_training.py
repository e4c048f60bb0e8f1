"""The one training loop of pygeo's models: Adam (or K-FAC) on model.loss over shuffled mini-batches."""
from __future__ import annotations

import sys
import time
from typing import List, Optional

import torch
from torch import nn
from tqdm.auto import tqdm


def fit(model: nn.Module, data: torch.Tensor, epochs: int, batch_size: int, lr: float, seed: int, progress: bool,
        description: str, max_seconds: Optional[float] = None, optimizer: str = "adam",
        optimizer_options: Optional[dict] = None) -> List[float]:
    """Adam (or optimizer="natural": pygeo.optim.NaturalGradient, K-FAC with the model's own likelihoods; options
    such as damping in optimizer_options) on model.loss(batch) (a mean over the batch) for data [N, ...]; returns the
    mean loss of each epoch run, an interrupted one included.

    Deterministic for a given seed: the batch order comes from its own generator and the model's sampling noise from
    torch's global generator, forked and seeded (the caller's random state is left as it was). Stops after max_seconds
    (checked after every step); Ctrl-C stops cleanly and keeps the model as trained so far. Leaves the model in eval
    mode. The caller checks the data's shape and values; the settings and the data's size, dtype and device are
    checked here.
    """
    for name, value in (("epochs", epochs), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if not lr > 0:
        raise ValueError(f"lr must be positive, got {lr!r}")
    if max_seconds is not None and not max_seconds > 0:
        raise ValueError(f"max_seconds must be positive (or None), got {max_seconds!r}")
    if len(data) == 0:
        raise ValueError("the training data must hold at least one example, got 0")
    parameter = next(model.parameters())
    if parameter.device != data.device:
        raise ValueError(f"model is on {parameter.device} but the data are on {data.device}; move one of them")
    if parameter.dtype != data.dtype:
        raise TypeError(f"model parameters are {parameter.dtype} but the data are {data.dtype}; convert one of them")

    if optimizer not in ("adam", "natural"):
        raise ValueError(f"optimizer must be 'adam' or 'natural', got {optimizer!r}")
    order_generator = torch.Generator().manual_seed(seed)
    natural = optimizer == "natural"
    if natural:
        from ..optim import NaturalGradient

        optimizer = NaturalGradient(model, lr=lr, **(optimizer_options or {}))
    else:
        optimizer = torch.optim.Adam(model.parameters(), lr=lr, **(optimizer_options or {}))
    losses: List[float] = []
    start_time = time.perf_counter()
    model.train()
    rng_devices = [data.device] if data.device.type == "cuda" else []
    with torch.random.fork_rng(devices=rng_devices):
        torch.manual_seed(seed)  # the model's sampling noise (reparameterisation)
        bar = tqdm(range(epochs), desc=description, unit="epoch", disable=not progress)
        try:
            for _ in bar:
                order = torch.randperm(len(data), generator=order_generator).to(data.device)
                total, seen, out_of_time = torch.zeros((), device=data.device), 0, False
                try:
                    for begin in range(0, len(data), batch_size):
                        batch = data[order[begin:begin + batch_size]]
                        loss = model.loss(batch)
                        optimizer.zero_grad(set_to_none=True)
                        if natural:  # K-FAC's sampled-target backward, on the steps whose factors are due
                            optimizer.update_curvature()
                        loss.backward()
                        optimizer.step()
                        total += loss.detach() * len(batch)
                        seen += len(batch)
                        out_of_time = max_seconds is not None and time.perf_counter() - start_time > max_seconds
                        if out_of_time:
                            break
                finally:
                    if seen:
                        losses.append(float(total) / seen)
                bar.set_postfix(loss=f"{losses[-1]:.1f}")
                if out_of_time:
                    break
        except KeyboardInterrupt:
            tqdm.write(f"{description} interrupted after {len(losses)} epoch(s) (the last possibly partial); keeping "
                       "the model as trained so far", file=sys.stderr)
        finally:
            bar.close()
            model.eval()
            if natural:
                optimizer.remove_hooks()
    return losses
