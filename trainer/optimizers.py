"""Optimisers and learning-rate schedules for `train.optimizer` and `train.scheduler`.

Every optimiser here keeps its whole state in `state_dict()` (param groups included), so saving
`optimizer.state_dict()` and loading it into a freshly built optimiser over the same parameters continues
training bit for bit — what exact resume relies on. Build the scheduler after the optimiser and load the
optimiser's state before the scheduler's.

Trade-offs, for a rank-16 LoRA on FLUX.1 (≈56 M parameters, AdamW state ≈0.45 GB in fp32):

- adamw      torch AdamW; the fused kernel on CUDA. The reference: learning_rate ≈ 1e-4 for LoRAs.
- adamw8bit  bitsandbytes AdamW with block-quantised 8-bit moments: state ≈1/4 of AdamW's, same learning rate.
             Tensors under 4096 elements keep fp32 state.
- lion8bit   bitsandbytes Lion, one 8-bit moment (≈1/8 of AdamW's state). Lion's update has unit size per
             element, so its usual learning rate is 3-10x lower than AdamW's (and weight decay 3-10x higher);
             the learning rate is used as given, never rescaled. Reported to collapse on nf4 bases.
- adafactor  transformers' Adafactor with a fixed learning rate (no relative step), so the scheduler drives it;
             factored second moment, smallest state of all for matrices.
- prodigy    Prodigy estimates the step size itself; `learning_rate` is a multiplier on that estimate and is
             normally 1.0. Its estimate starts at 1e-6 and grows over the first ~50-100 steps, so the loss
             barely moves at first; a warmup of about that length suits it (safeguard_warmup is on). It keeps
             ≈4 copies of the parameters (two moments, the starting point and a running sum).
"""

from __future__ import annotations

import contextlib
import io
import warnings
from collections.abc import Iterable
from typing import Any

import torch

from trainer.errors import UserError

OPTIMIZERS = ("adamw", "adamw8bit", "lion8bit", "adafactor", "prodigy")
SCHEDULERS = ("constant", "constant_with_warmup", "cosine", "linear", "polynomial")

# The value Lion's authors and bitsandbytes use; AdamW's default second beta (0.999) is too slow for Lion.
LION_BETAS = (0.9, 0.99)
ADAMW_BETAS = (0.9, 0.999)
# Where the polynomial schedule ends (diffusers' default, spelled out so it does not drift).
POLYNOMIAL_LR_END = 1e-7
POLYNOMIAL_POWER = 1.0


def build_optimizer(
    params: Iterable[torch.nn.Parameter],
    name: str,
    learning_rate: float,
    weight_decay: float = 0.01,
    betas: tuple[float, float] | None = None,
    device_type: str = "cpu",
) -> torch.optim.Optimizer:
    """The optimiser named by `train.optimizer` over `params` (the trainable LoRA parameters).

    `betas` None takes each optimiser's usual values (AdamW and Prodigy (0.9, 0.999), Lion (0.9, 0.99));
    for adafactor only the first is used, as its momentum (Adafactor has none by default; its second moment
    follows its own decay schedule). `device_type` is where the parameters live ("cuda" picks the fused AdamW).

    Learning rates: adamw/adamw8bit ≈1e-4 for a LoRA; lion8bit's usual learning rate is 3-10x lower than
    AdamW's; adafactor like AdamW; prodigy's learning rate is a multiplier on its own estimate, normally 1.0.
    """
    params = list(params)
    if name == "adamw":
        kwargs: dict[str, Any] = {"fused": True} if device_type == "cuda" else {}
        return torch.optim.AdamW(params, lr=learning_rate, betas=betas or ADAMW_BETAS,
                                 weight_decay=weight_decay, **kwargs)
    if name in ("adamw8bit", "lion8bit"):
        bnb_optim = _import_bitsandbytes_optim(name)
        if name == "adamw8bit":
            return bnb_optim.AdamW8bit(params, lr=learning_rate, betas=betas or ADAMW_BETAS,
                                       weight_decay=weight_decay)
        return bnb_optim.Lion8bit(params, lr=learning_rate, betas=betas or LION_BETAS, weight_decay=weight_decay)
    if name == "adafactor":
        try:
            from transformers.optimization import Adafactor
        except ImportError as error:
            raise UserError(f"train.optimizer = 'adafactor' needs transformers, which failed to import ({error}); "
                            "reinstall the requirements or choose another train.optimizer") from error
        return Adafactor(params, lr=learning_rate, relative_step=False, scale_parameter=False, warmup_init=False,
                         beta1=betas[0] if betas else None, weight_decay=weight_decay)
    if name == "prodigy":
        try:
            from prodigyopt import Prodigy
        except ImportError as error:
            raise UserError(f"train.optimizer = 'prodigy' needs prodigyopt, which failed to import ({error}); "
                            "install it with `pip install prodigyopt==1.1.2` or choose another "
                            "train.optimizer") from error
        if not 0.1 <= learning_rate <= 10.0:
            warnings.warn(f"train.learning_rate = {learning_rate:g} with prodigy: Prodigy's learning rate multiplies "
                          "the step size it estimates itself and is normally 1.0", UserWarning, stacklevel=2)
        with contextlib.redirect_stdout(io.StringIO()):  # it prints "Using decoupled weight decay"
            return Prodigy(params, lr=learning_rate, betas=betas or ADAMW_BETAS, weight_decay=weight_decay,
                           safeguard_warmup=True, use_bias_correction=True)
    raise ValueError(f"unknown optimizer {name!r} (the spec allows {', '.join(OPTIMIZERS)})")


def _import_bitsandbytes_optim(name: str) -> Any:
    """`bitsandbytes.optim`, or a UserError saying which setting needs it and how to get out of it."""
    try:
        import bitsandbytes.optim as bnb_optim
    except Exception as error:  # a broken install raises RuntimeError or OSError as often as ImportError
        raise UserError(f"train.optimizer = {name!r} needs bitsandbytes, which failed to import ({error}); "
                        "install it with `pip install bitsandbytes==0.50.2` or set train.optimizer = 'adamw'"
                        ) from error
    return bnb_optim


def build_scheduler(
    optimizer: torch.optim.Optimizer, name: str, warmup_steps: int, max_steps: int
) -> torch.optim.lr_scheduler.LRScheduler:
    """The learning-rate schedule named by `train.scheduler`, stepped once per optimiser step.

    constant: the learning rate throughout (warmup_steps unused). The others ramp linearly from 0 over
    `warmup_steps`, then: constant_with_warmup stays; cosine follows a half cosine to 0 at `max_steps`;
    linear falls straight to 0; polynomial (power 1) falls straight to 1e-7.
    """
    from diffusers.optimization import get_polynomial_decay_schedule_with_warmup, get_scheduler

    # The name and the warmup are the spec's to check (TrainSection): this takes validated values.
    if name == "polynomial":
        # get_scheduler passes `power` but not `lr_end`, so call the schedule itself. Its lr_end must lie below
        # the starting learning rate; a learning rate at or under 1e-7 decays to 0 instead.
        lr_end = POLYNOMIAL_LR_END if optimizer.defaults["lr"] > POLYNOMIAL_LR_END else 0.0
        return get_polynomial_decay_schedule_with_warmup(
            optimizer, num_warmup_steps=warmup_steps, num_training_steps=max_steps, lr_end=lr_end,
            power=POLYNOMIAL_POWER)
    return get_scheduler(name, optimizer=optimizer, num_warmup_steps=warmup_steps, num_training_steps=max_steps)


def effective_learning_rate(optimizer: torch.optim.Optimizer) -> float:
    """The step size the first param group takes now: its learning rate, times Prodigy's estimate `d` for prodigy
    (whose learning rate is only a multiplier). For progress reports; the scheduler's lr is the multiplier."""
    group = optimizer.param_groups[0]
    return float(group["lr"]) * float(group.get("d", 1.0))
