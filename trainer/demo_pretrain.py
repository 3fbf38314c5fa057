"""Brief pre-training of the demo's tiny models, so that a LoRA trained on them visibly learns.

Random weights cannot show learning: a random VAE decodes any latent to coloured noise, and a random transformer
samples noise that no small adapter turns into a picture. So, when the demo is built, the VAE learns to give the
demo's pictures back (decode(encode(x)) ≈ x), its latents get the statistics the pipelines normalise with, and the
transformer learns to draw pictures of that kind from captions in another vocabulary (numbers: `coded_caption`), so
it listens to its prompt without knowing the demo's words. Those are left for the LoRA: at step 0 a demo caption gives
some picture in some colours, after training the one it names.

Step counts, not time, bound each stage, so a build is the same for a seed on a given machine.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any

import torch

from trainer.demo_shapes import COLOURS, SHAPES, Picture, random_pictures, render

POOL = 256  # distinct pictures per stage: plenty for shapes this simple
# Measured with bench/bench_demo_learning.py (one thread, as the app builds): 52 s of CPU for the build (78 s before
# Adam was fused and FLUX.1's transformer took 160 steps). Every count here is close to a cliff, found by trying:
# the VAE at 160-180 steps (any warmup, learning rate or batch tried) decodes the training pictures 35-52 of 255 off
# against 23 at 200; FLUX.2's transformer at 180-260 steps (learning rates 3e-3 to 1.2e-2) leaves the demo run's
# blue square on red at 0.47-0.60 of its step-0 error against 0.29 at 300.
VAE_STEPS = 200
VAE_BATCH = 16  # a step's fixed cost is most of it at 8: twice the pictures for 1.6x the time
VAE_LR = 8e-3  # 4e-3 left blue on red decoding as green (round trip 37 of 255; 35 at 8e-3 on L1 alone)
VAE_WARMUP = 0.3  # 0.15: training pictures 26 of 255 off on average, the worst 40; 0.3: 23 and 31
TRANSFORMER_STEPS = {"flux2": 300, "flux1": 160}  # FLUX.1 at 160 (a higher peak): 0.19-0.40 of step 0's error
TRANSFORMER_BATCH = 16
TRANSFORMER_LR = {"flux2": 3e-3, "flux1": 6e-3}
TRANSFORMER_WARMUP = {"flux2": 0.15, "flux1": 0.25}


def picture_pixels(count: int, seed: int) -> torch.Tensor:
    """`count` random demo pictures as pixels in [-1, 1], (count, 3, 64, 64)."""
    return pixels_of(list(itertools.islice(random_pictures(seed), count)))


def pixels_of(pictures: list[Picture]) -> torch.Tensor:
    import numpy as np

    images = [np.asarray(render(p)) for p in pictures]
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def coded_caption(picture: Picture) -> str:
    """The transformer's pre-training caption: the shape and colours as numbers, e.g. "2 0 4". It learns to listen to
    its captions without learning a word of the demo's ("a red circle on a white background"): those are the LoRA's."""
    names = list(COLOURS)
    return f"{SHAPES.index(picture.shape)} {names.index(picture.fg)} {names.index(picture.bg)}"


def _adam(module: torch.nn.Module, peak: float, steps: int, warmup: float) -> tuple[torch.optim.Optimizer, Any]:
    """Adam with a one-cycle schedule (`warmup`: the share of the steps rising to `peak`). Fused: one kernel over
    every tensor instead of a loop of small ops each step (a tenth of a transformer step on this CPU), as
    deterministic."""
    optimizer = torch.optim.Adam(module.parameters(), lr=peak, fused=True)
    return optimizer, torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=peak, total_steps=steps, pct_start=warmup)


def train_vae(vae: Any, seed: int, steps: int = VAE_STEPS) -> float:  # noqa: ANN401 - a diffusers VAE
    """Teach the VAE to reconstruct demo pictures (mean absolute error of the decoded means); returns the last loss."""
    pixels = picture_pixels(POOL, seed)
    generator = torch.Generator().manual_seed(seed)
    optimizer, schedule = _adam(vae, VAE_LR, steps, VAE_WARMUP)
    vae.train()
    loss = torch.zeros(())
    for _ in range(steps):
        batch = pixels[torch.randint(0, POOL, (VAE_BATCH,), generator=generator)]
        decoded = vae.decode(vae.encode(batch).latent_dist.mode()).sample
        # L1 for flat colours and sharp edges (measured on 64 pictures after 200 steps: 40 against 58 of 255 mean
        # absolute error on squared alone), plus squared so that a wholly wrong colour costs more than a blurred edge:
        # L1 alone left the blue square on red decoding green (round trip 35 of 255; 22 with both)
        error = decoded - batch
        loss = error.abs().mean() + error.pow(2).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    vae.eval()
    vae.requires_grad_(False)
    return loss.item()


def vae_from_flux2(vae: Any, flux2_vae: Any, seed: int) -> None:  # noqa: ANN401 - diffusers VAEs
    """Start the FLUX.1 VAE from the trained FLUX.2 one, whose layers are the same but for the latent width: those
    are copied, and FLUX.2's 32 latent channels become FLUX.1's 16 by their principal components on demo pictures
    (folded into the encoder's last and the decoder's first conv, with FLUX.2's 1x1 quant convs)."""
    with torch.no_grad():
        own = vae.state_dict()
        vae.load_state_dict({k: v for k, v in flux2_vae.state_dict().items()
                             if k in own and own[k].shape == v.shape}, strict=False)
        width = vae.config.latent_channels
        quant, post = flux2_vae.quant_conv, flux2_vae.post_quant_conv
        wq, bq = quant.weight[:, :, 0, 0], quant.bias
        w_mean = torch.einsum("oc,cikl->oikl", wq, flux2_vae.encoder.conv_out.weight)[:flux2_vae.config.latent_channels]
        b_mean = (wq @ flux2_vae.encoder.conv_out.bias + bq)[:flux2_vae.config.latent_channels]
        latents = flux2_vae.encode(picture_pixels(POOL, seed + 3)).latent_dist.mode()
        flat = latents.permute(0, 2, 3, 1).reshape(-1, latents.shape[1])
        centre = flat.mean(dim=0)
        basis = torch.linalg.svd(flat - centre, full_matrices=False).Vh[:width].T  # (32, 16)
        conv_out = vae.encoder.conv_out  # mean, then log-variance (left at 0)
        conv_out.weight.zero_()
        conv_out.bias.zero_()
        conv_out.weight[:width] = torch.einsum("or,oikl->rikl", basis, w_mean)
        conv_out.bias[:width] = basis.T @ (b_mean - centre)
        wp, bp = post.weight[:, :, 0, 0], post.bias
        conv_in, wd = vae.decoder.conv_in, flux2_vae.decoder.conv_in.weight
        conv_in.weight.copy_(torch.einsum("oikl,ij,jr->orkl", wd, wp, basis))
        conv_in.bias.copy_(flux2_vae.decoder.conv_in.bias + torch.einsum("oikl,i->o", wd, wp @ centre + bp))


def set_latent_statistics(vae: Any, family: str, seed: int) -> None:  # noqa: ANN401
    """What the pipelines normalise latents with, measured on demo pictures: FLUX.2's BatchNorm running statistics of
    the 2x2-patchified latents, FLUX.1's shift and scaling factors."""
    with torch.no_grad():
        latents = vae.encode(picture_pixels(POOL, seed + 1)).latent_dist.mode()
    if family == "flux2":
        from diffusers import Flux2KleinPipeline

        patches = Flux2KleinPipeline._patchify_latents(latents)
        vae.bn.running_mean.copy_(patches.mean(dim=(0, 2, 3)))
        vae.bn.running_var.copy_(patches.var(dim=(0, 2, 3)))
    else:
        vae.register_to_config(shift_factor=round(float(latents.mean()), 4),
                               scaling_factor=round(1.0 / float(latents.std()), 4))


def pretrain_transformer(pipe: Any, family: str, seed: int, steps: int | None = None) -> float:  # noqa: ANN401
    """Flow matching on demo pictures with their coded captions, every weight trained (the family's steps unless
    `steps` is given); returns the last loss."""
    from trainer import flow, registry
    from trainer.families import family_ops
    from trainer.spec import AdvancedSection

    ops, flavour = family_ops(family), registry.get_flavour(family, "demo")
    pictures = list(itertools.islice(random_pictures(seed + 2), POOL))
    text = ops.encode_prompts(pipe, [coded_caption(p) for p in pictures], flavour)
    with torch.no_grad():
        latents = torch.cat([ops.encode_images(pipe, chunk) for chunk in pixels_of(pictures).split(64)])
    transformer, generator = pipe.transformer, torch.Generator().manual_seed(seed)
    steps = steps or TRANSFORMER_STEPS[family]
    optimizer, schedule = _adam(transformer, TRANSFORMER_LR[family], steps, TRANSFORMER_WARMUP[family])
    advanced = AdvancedSection()
    mu = ops.shift_mu(ops.image_seq_len(latents[:1]), flavour)
    transformer.train()
    loss = torch.zeros(())
    for _ in range(steps):
        chosen = torch.randint(0, POOL, (TRANSFORMER_BATCH,), generator=generator)
        clean, batch_text = latents[chosen], {k: v[chosen] for k, v in text.items()}
        noise = torch.randn(clean.shape, generator=generator)
        sigmas = flow.sample_sigmas(advanced, TRANSFORMER_BATCH, mu, generator)
        noisy, target = flow.noisy_latents(clean, noise, sigmas)
        # FLUX.1 samples with an embedded guidance value: learn a range of them so any the user picks works.
        guidance = 1.0 + 4.0 * torch.rand(TRANSFORMER_BATCH, generator=generator) \
            if flavour.guidance == "embedded" else None
        loss = (ops.predict(transformer, noisy, sigmas, batch_text, guidance) - target).pow(2).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    transformer.eval()
    return loss.item()


def pretrain(pipe: Any, family: str, seed: int, report: Callable[[str], None],  # noqa: ANN401
             flux2_vae: Any = None) -> None:  # noqa: ANN401
    """VAE, its latent statistics, then the transformer; `report` hears each stage as it starts. With `flux2_vae`
    (FLUX.1 built after FLUX.2), the FLUX.1 VAE is made from it: as good, at no training cost."""
    if flux2_vae is None:
        report(f"{family}: training the VAE ({VAE_STEPS} steps)")
        train_vae(pipe.vae, seed)
    else:
        report(f"{family}: the VAE from the FLUX.2 one")
        vae_from_flux2(pipe.vae, flux2_vae, seed)
        pipe.vae.eval()
    set_latent_statistics(pipe.vae, family, seed)
    report(f"{family}: pre-training the transformer ({TRANSFORMER_STEPS[family]} steps)")
    pretrain_transformer(pipe, family, seed)
