"""The model families and flavours the trainer knows, as plain frozen data.

Standard library only: the UI imports this to fill its menus and must start without loading torch.
Facts are checked against diffusers 0.42 (see shared/DESIGN.md, "Model facts").
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

GUIDANCE_KINDS = ("embedded", "cfg", "none")
TIMESTEP_SHIFTS = ("dynamic", "fixed")

# Block swap streams at most all blocks but a couple, which stay on the device so compute always has a block
# while the next one loads. One rule for every flavour: total_blocks - RESIDENT_BLOCKS
# (FLUX.2 dev 54, klein-base-9B 30, klein-base-4B 23, FLUX.1 55, demos 2).
RESIDENT_BLOCKS = 2
_DERIVE = -1  # max_blocks_to_swap sentinel: derive it from the block counts
# Text tokens of a demo prompt (both families): its tokenizers know the demo's words whole (trainer/demo.py), so a
# caption and the FLUX.2 chat markers fit; a quarter of the 64 characters it took, as cheap again to train on.
DEMO_TEXT_TOKENS = 16
# Prompts per text-encoder forward while embeddings are cached (trainer/data/cache.py): a layer streamed to the GPU
# serves this many at once; every layer's hidden state of each is held until the forward ends (the estimator).
TEXT_ENCODE_BATCH = 8

FLUX2_COMPONENTS = ("transformer", "vae", "text_encoder", "tokenizer", "scheduler")
FLUX1_COMPONENTS = (
    "transformer",
    "vae",
    "text_encoder",
    "tokenizer",
    "text_encoder_2",
    "tokenizer_2",
    "scheduler",
)


@dataclass(frozen=True, kw_only=True)
class Flavour:
    """One trainable model: where it lives, how it is built, and how to sample it."""

    family: str  # "flux2" or "flux1"
    name: str  # e.g. "klein-base-9b"
    label: str  # human label for the UI
    hub_id: str | None  # default hub repo; None for the offline demo
    pipeline_class: str  # diffusers pipeline used to sample
    transformer_class: str
    vae_class: str
    text_encoders: tuple[str, ...]  # transformers class names, in pipeline order
    text_encoder_label: str
    text_encoder_layers: tuple[int, ...]  # hidden-state layers stacked into the prompt embedding (flux2)
    double_blocks: int
    single_blocks: int
    hidden_size: int
    num_heads: int
    joint_attention_dim: int
    latent_channels: int  # VAE latent channels
    pooled_dim: int = 0  # FLUX.1: the CLIP text encoder's pooled width (CLIP-L 768), its pooled_projection_dim
    params_billion: float  # approximate transformer size
    guidance: str  # one of GUIDANCE_KINDS
    max_blocks_to_swap: int = _DERIVE  # plain block count; defaults to total_blocks - RESIDENT_BLOCKS
    sample_steps: int
    sample_guidance: float
    sample_resolution: int  # px, square
    timestep_shift: str  # one of TIMESTEP_SHIFTS
    is_demo: bool = False
    needs_reference_image: bool = False  # kontext edits an input image
    # Takes reference images (the pipeline's `image=`): edit pairs can train it (data.datasets[*].conditioning).
    # Kontext and every FLUX.2 pipeline append the reference latents to the image tokens.
    reference_images: bool = False

    def __post_init__(self) -> None:
        if self.family not in ("flux1", "flux2"):
            raise ValueError(f"unknown family {self.family!r} for flavour {self.name!r}")
        if self.guidance not in GUIDANCE_KINDS:
            raise ValueError(f"guidance must be one of {GUIDANCE_KINDS}, got {self.guidance!r}")
        if self.timestep_shift not in TIMESTEP_SHIFTS:
            raise ValueError(f"timestep_shift must be one of {TIMESTEP_SHIFTS}, got {self.timestep_shift!r}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not a multiple of num_heads {self.num_heads}")
        if self.max_blocks_to_swap == _DERIVE:
            # frozen dataclass: the documented way to set a derived field during __post_init__
            object.__setattr__(self, "max_blocks_to_swap", max(0, self.total_blocks - RESIDENT_BLOCKS))
        if not 0 <= self.max_blocks_to_swap <= self.total_blocks:
            raise ValueError(
                f"max_blocks_to_swap {self.max_blocks_to_swap} outside 0..{self.total_blocks} for {self.name!r}"
            )

    @property
    def total_blocks(self) -> int:
        return self.double_blocks + self.single_blocks

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def components(self) -> tuple[str, ...]:
        """Sub-folders of the diffusers repo layout for this flavour."""
        return FLUX2_COMPONENTS if self.family == "flux2" else FLUX1_COMPONENTS


@dataclass(frozen=True)
class Family:
    name: str
    label: str
    flavours: dict[str, Flavour] = field(hash=False)  # insertion order = UI order, "demo" first


# --- FLUX.2 -------------------------------------------------------------------------------------------

_FLUX2_DEMO = Flavour(
    family="flux2",
    name="demo",
    label="FLUX.2 demo (tiny, random weights)",
    hub_id=None,
    pipeline_class="Flux2KleinPipeline",
    transformer_class="Flux2Transformer2DModel",
    vae_class="AutoencoderKLFlux2",
    text_encoders=("Qwen3ForCausalLM",),
    text_encoder_label="tiny Qwen3 (random)",
    text_encoder_layers=(1, 2, 3),
    double_blocks=2,
    single_blocks=2,
    hidden_size=128,  # 4 heads x head dim 32: as wide as a latent token (32 channels x 2x2)
    num_heads=4,
    joint_attention_dim=48,  # 3 stacked layers x text hidden 16
    latent_channels=32,
    params_billion=0.0001,
    guidance="cfg",
    sample_steps=4,
    sample_guidance=1.0,  # 1.0 disables CFG: one forward pass per step
    sample_resolution=64,
    timestep_shift="dynamic",
    is_demo=True,
    reference_images=True,  # the Flux2KleinPipeline, like klein's, takes reference images
)

_FLUX2_DEV = Flavour(
    family="flux2",
    name="dev",
    label="FLUX.2 [dev] 32B",
    hub_id="black-forest-labs/FLUX.2-dev",
    pipeline_class="Flux2Pipeline",
    transformer_class="Flux2Transformer2DModel",
    vae_class="AutoencoderKLFlux2",
    text_encoders=("Mistral3ForConditionalGeneration",),
    text_encoder_label="Mistral-Small-3.1-24B",
    text_encoder_layers=(10, 20, 30),
    double_blocks=8,
    single_blocks=48,
    hidden_size=6144,
    num_heads=48,
    joint_attention_dim=15360,
    latent_channels=32,
    params_billion=32.0,
    guidance="embedded",
    sample_steps=28,
    sample_guidance=4.0,
    sample_resolution=1024,
    timestep_shift="dynamic",
    reference_images=True,
)

# klein base is the undistilled model: no guidance embedding, real CFG with a negative prompt
_FLUX2_KLEIN_9B = Flavour(
    family="flux2",
    name="klein-base-9b",
    label="FLUX.2 [klein] base 9B",
    hub_id="black-forest-labs/FLUX.2-klein-base-9B",
    pipeline_class="Flux2KleinPipeline",
    transformer_class="Flux2Transformer2DModel",
    vae_class="AutoencoderKLFlux2",
    text_encoders=("Qwen3ForCausalLM",),
    text_encoder_label="Qwen3-8B",
    text_encoder_layers=(9, 18, 27),
    double_blocks=8,
    single_blocks=24,
    hidden_size=4096,
    num_heads=32,
    joint_attention_dim=12288,
    latent_channels=32,
    params_billion=9.0,
    guidance="cfg",
    sample_steps=50,
    sample_guidance=4.0,
    sample_resolution=1024,
    timestep_shift="dynamic",
    reference_images=True,
)

_FLUX2_KLEIN_4B = replace(
    _FLUX2_KLEIN_9B,
    name="klein-base-4b",
    label="FLUX.2 [klein] base 4B",
    hub_id="black-forest-labs/FLUX.2-klein-base-4B",
    text_encoder_label="Qwen3-4B",
    double_blocks=5,
    single_blocks=20,
    hidden_size=3072,
    num_heads=24,
    joint_attention_dim=7680,
    params_billion=4.0,
    max_blocks_to_swap=_DERIVE,  # block counts changed: derive again
)

# --- FLUX.1 -------------------------------------------------------------------------------------------

_FLUX1_DEMO = Flavour(
    family="flux1",
    name="demo",
    label="FLUX.1 demo (tiny, random weights)",
    hub_id=None,
    pipeline_class="FluxPipeline",
    transformer_class="FluxTransformer2DModel",
    vae_class="AutoencoderKL",
    text_encoders=("CLIPTextModel", "T5EncoderModel"),
    text_encoder_label="tiny CLIP + T5 (random)",
    text_encoder_layers=(),
    double_blocks=2,
    single_blocks=2,
    hidden_size=128,  # 4 heads x head dim 32, as the FLUX.2 demo
    num_heads=4,
    joint_attention_dim=32,
    latent_channels=16,
    pooled_dim=32,  # the tiny CLIP is as wide as the transformer
    params_billion=0.0001,
    guidance="embedded",
    sample_steps=4,
    sample_guidance=3.5,
    sample_resolution=64,
    timestep_shift="dynamic",
    is_demo=True,
)

_FLUX1_DEV = Flavour(
    family="flux1",
    name="dev",
    label="FLUX.1 [dev]",
    hub_id="black-forest-labs/FLUX.1-dev",
    pipeline_class="FluxPipeline",
    transformer_class="FluxTransformer2DModel",
    vae_class="AutoencoderKL",
    text_encoders=("CLIPTextModel", "T5EncoderModel"),
    text_encoder_label="CLIP-L + T5-XXL",
    text_encoder_layers=(),
    double_blocks=19,
    single_blocks=38,
    hidden_size=3072,
    num_heads=24,
    joint_attention_dim=4096,
    latent_channels=16,
    pooled_dim=768,
    params_billion=12.0,
    guidance="embedded",
    sample_steps=50,  # the model card's example: 50 steps, guidance 3.5 (FluxPipeline's own default is 28)
    sample_guidance=3.5,
    sample_resolution=1024,
    timestep_shift="dynamic",
)

_FLUX1_KREA = replace(
    _FLUX1_DEV,
    name="krea",
    label="FLUX.1 Krea [dev]",
    hub_id="black-forest-labs/FLUX.1-Krea-dev",
    sample_steps=28,  # the model card sets guidance 4.5 and leaves the steps at FluxPipeline's 28
    sample_guidance=4.5,
)

# schnell is timestep-distilled: no guidance input, 4 steps, fixed shift
_FLUX1_SCHNELL = replace(
    _FLUX1_DEV,
    name="schnell",
    label="FLUX.1 [schnell]",
    hub_id="black-forest-labs/FLUX.1-schnell",
    guidance="none",
    sample_steps=4,
    sample_guidance=0.0,
    timestep_shift="fixed",
)

_FLUX1_KONTEXT = replace(
    _FLUX1_DEV,
    name="kontext",
    label="FLUX.1 Kontext [dev]",
    hub_id="black-forest-labs/FLUX.1-Kontext-dev",
    pipeline_class="FluxKontextPipeline",
    sample_steps=28,  # the model card sets guidance 2.5 and leaves the steps at FluxKontextPipeline's 28
    sample_guidance=2.5,
    needs_reference_image=True,
    reference_images=True,
)


def _family(name: str, label: str, *flavours: Flavour) -> Family:
    return Family(name=name, label=label, flavours={f.name: f for f in flavours})


FAMILIES: dict[str, Family] = {
    "flux2": _family("flux2", "FLUX.2", _FLUX2_DEMO, _FLUX2_DEV, _FLUX2_KLEIN_9B, _FLUX2_KLEIN_4B),
    "flux1": _family("flux1", "FLUX.1", _FLUX1_DEMO, _FLUX1_DEV, _FLUX1_KREA, _FLUX1_SCHNELL, _FLUX1_KONTEXT),
}


def _get_family(family: str) -> Family:
    try:
        return FAMILIES[family]
    except KeyError:
        raise KeyError(f"unknown family {family!r}; choose one of: {', '.join(FAMILIES)}") from None


def flavour_names(family: str) -> list[str]:
    return list(_get_family(family).flavours)


def get_flavour(family: str, flavour: str) -> Flavour:
    flavours = _get_family(family).flavours
    try:
        return flavours[flavour]
    except KeyError:
        raise KeyError(
            f"unknown flavour {flavour!r} for family {family!r}; choose one of: {', '.join(flavours)}"
        ) from None
