"""The flow-matching objective: which noise level each sample gets and how its error is weighted."""

from __future__ import annotations

import math

import torch
from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3

from trainer.spec import AdvancedSection

_DENSITY_NAMES = {"uniform": "none", "logit_normal": "logit_normal", "mode": "mode"}


def shift_sigmas(u: torch.Tensor, shift: float) -> torch.Tensor:
    """The scheduler's time shift s·u / (s·u + 1 − u): larger shifts spend more steps at high noise."""
    return shift * u / (shift * u + 1.0 - u)


def sample_sigmas(advanced: AdvancedSection, batch_size: int, mu: float | None,
                  generator: torch.Generator) -> torch.Tensor:
    """Noise levels in [0, 1] for one batch; `mu` is the resolution-dependent shift (used when auto_shift is on)."""
    u = compute_density_for_timestep_sampling(
        weighting_scheme=_DENSITY_NAMES[advanced.timestep_sampling], batch_size=batch_size,
        logit_mean=advanced.logit_mean, logit_std=advanced.logit_std, mode_scale=advanced.mode_scale,
        generator=generator,
    )
    shift = math.exp(mu) if (advanced.auto_shift and mu is not None) else advanced.shift
    low, high = advanced.min_timestep / 1000.0, advanced.max_timestep / 1000.0
    return low + (high - low) * shift_sigmas(u, shift)


def guidance_values(advanced: AdvancedSection, batch_size: int, generator: torch.Generator) -> torch.Tensor:
    """The guidance a guidance-distilled model is conditioned on while training: fixed, or uniform in a range."""
    if advanced.guidance_mode == "random":
        span = advanced.guidance_max - advanced.guidance_min
        return advanced.guidance_min + span * torch.rand(batch_size, generator=generator)
    return torch.full((batch_size,), advanced.guidance_value)


def loss_weights(advanced: AdvancedSection, sigmas: torch.Tensor) -> torch.Tensor:
    scheme = "none" if advanced.loss_weighting == "none" else advanced.loss_weighting
    return compute_loss_weighting_for_sd3(scheme, sigmas)


def noisy_latents(
    latents: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """x_σ = (1 − σ)·x₀ + σ·ε and the velocity target ε − x₀ the model learns to predict."""
    s = sigmas.view(-1, *([1] * (latents.dim() - 1))).to(latents)
    return (1.0 - s) * latents + s * noise, noise - latents
