"""Typed model configuration: one dataclass per component, composed into `ModelConfig`.

Paper values are the defaults. `model_config("paper" | "demo" | "tiny", compat=...)` returns a
named configuration; `compat="reference"` turns on every reference-quirk switch of
`../shared/spec/prior-method.md` at once.
"""

from __future__ import annotations

import dataclasses
from dataclasses import field
from typing import Annotated, Literal

from pydantic import Field, NonNegativeInt, PositiveFloat, PositiveInt
from pydantic.dataclasses import dataclass

from prior_dist.schema import SECTION, Probability, build

ImageArch = Literal["resnet", "vit"]
BlockKind = Literal["bottleneck", "basic"]
AttentionImpl = Literal["auto", "flash", "sdpa"]
LocalAttentionImpl = Literal["auto", "triton", "torch"]


@dataclass(frozen=True, config=SECTION)
class ImageTowerConfig:
    arch: ImageArch = "resnet"
    image_size: PositiveInt = 224
    # ResNet: torchvision layout; (bottleneck, [3, 4, 6, 3], width 64) is ResNet-50.
    block: BlockKind = "bottleneck"
    layers: Annotated[tuple[PositiveInt, ...], Field(min_length=4, max_length=4)] = (3, 4, 6, 3)
    width: PositiveInt = 64
    pool_heads: PositiveInt = 8
    # ViT: patch size, depth, width, heads (ViT-B/16 when arch="vit").
    patch_size: PositiveInt = 16
    vit_depth: PositiveInt = 12
    vit_width: PositiveInt = 768
    vit_heads: PositiveInt = 12
    vit_mlp_ratio: PositiveFloat = 4.0
    attention_impl: AttentionImpl = "auto"
    activation_checkpointing: bool = False
    # A torchvision-layout ImageNet state dict (local file); RGB conv1 is summed to 1 channel.
    pretrained: str | None = None

    def __post_init__(self) -> None:
        if self.arch == "resnet" and self.image_size % 32:
            raise ValueError(
                f"image.image_size must be a multiple of 32 for a ResNet tower "
                f"(its stride), got {self.image_size}"
            )
        if self.arch == "vit":
            if self.image_size % self.patch_size:
                raise ValueError(
                    f"image.image_size ({self.image_size}) must be a multiple of "
                    f"image.patch_size ({self.patch_size})"
                )
            if self.vit_width % self.vit_heads:
                raise ValueError(
                    f"image.vit_width ({self.vit_width}) must be divisible by "
                    f"image.vit_heads ({self.vit_heads})"
                )

    @property
    def feature_channels(self) -> int:
        """Channels of the final feature map (2048 for ResNet-50), or the ViT width."""
        if self.arch == "vit":
            return self.vit_width
        expansion = 4 if self.block == "bottleneck" else 1
        return self.width * 8 * expansion

    @property
    def grid(self) -> tuple[int, int]:
        stride = self.patch_size if self.arch == "vit" else 32
        return self.image_size // stride, self.image_size // stride


@dataclass(frozen=True, config=SECTION)
class TextTowerConfig:
    """BERT-base shapes of Bio_ClinicalBERT by default."""

    vocab_size: PositiveInt = 28996
    hidden_size: PositiveInt = 768
    num_layers: PositiveInt = 12
    num_heads: PositiveInt = 12
    intermediate_size: PositiveInt = 3072
    max_position_embeddings: PositiveInt = 512
    type_vocab_size: PositiveInt = 2
    layer_norm_eps: PositiveFloat = 1e-12
    dropout: Probability = 0.1
    pad_token_id: NonNegativeInt = 0
    attention_impl: AttentionImpl = "auto"
    activation_checkpointing: bool = False
    # A Hugging Face BERT checkpoint: a local directory or a hub id.
    pretrained: str | None = None

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"text.hidden_size ({self.hidden_size}) must be divisible by "
                f"text.num_heads ({self.num_heads})"
            )


@dataclass(frozen=True, config=SECTION)
class HeadsConfig:
    """Everything after the two encoders: projections, alignment, SPB and the decoders."""

    embed_dim: PositiveInt = 768
    report_pool_heads: PositiveInt = 8
    logit_scale_init: PositiveFloat = 100.0
    logit_scale_max: PositiveFloat | None = (
        None  # None: unclamped, as in the reference; CLIP uses 100
    )
    local_attention_impl: LocalAttentionImpl = "auto"
    num_prototypes: PositiveInt = 512
    gumbel_tau: PositiveFloat = 0.9
    # `normal`: W ~ N(0, 1), as in the paper. `sentences`: at the start of stage 2, W is set to
    # the most spread-out sentence embeddings of the first global batch (farthest-point
    # sampling), a standard remedy for codebook collapse (docs/model.md).
    prototype_init: Literal["normal", "sentences"] = "normal"
    num_queries: PositiveInt = 16
    decoder_layers: PositiveInt = 8
    decoder_heads: PositiveInt = 12
    decoder_intermediate: PositiveInt = 3072
    decoder_dropout: Probability = 0.1
    decoder_max_positions: PositiveInt = 512
    # One width per 2x upsampling from stride 32.
    image_decoder_widths: Annotated[tuple[PositiveInt, ...], Field(min_length=5, max_length=5)] = (
        768,
        384,
        192,
        96,
        48,
    )
    feature_dropout: Probability = 0.5  # Dropout2d over the image token map (stage 3)
    # Stop-gradient on the targets of L_spg (SPB prototypes) and L_kl (sentence embeddings):
    # the spec does not say; without it the demo collapsed in stage 3 (docs/model.md).
    detach_generation_targets: bool = True
    # How L_proto and L_kl average over sentences: `per_report` (each report's mean, then the
    # mean over reports: a 3-sentence report weighs as much as an 18-sentence one) or `pooled`
    # (one mean over every sentence of the global batch, as the reference code does).
    sentence_loss_mean: Literal["per_report", "pooled"] = "per_report"
    # Biases on the image decoder's convolutions that BatchNorm follows: they do nothing there
    # (BN subtracts the mean); the reference has none, so its checkpoints load strictly without.
    image_decoder_conv_bias: bool = True

    def __post_init__(self) -> None:
        if self.embed_dim % self.report_pool_heads:
            raise ValueError(
                f"heads.embed_dim ({self.embed_dim}) must be divisible by "
                f"heads.report_pool_heads ({self.report_pool_heads})"
            )
        if self.embed_dim % self.decoder_heads:
            raise ValueError(
                f"heads.embed_dim ({self.embed_dim}) must be divisible by "
                f"heads.decoder_heads ({self.decoder_heads})"
            )
        if self.logit_scale_max is not None and self.logit_scale_max < self.logit_scale_init:
            raise ValueError(
                f"heads.logit_scale_max ({self.logit_scale_max}) must be >= "
                f"heads.logit_scale_init ({self.logit_scale_init}) or None"
            )
        if self.num_queries > self.decoder_max_positions:
            raise ValueError(
                f"heads.num_queries ({self.num_queries}) must be <= "
                f"heads.decoder_max_positions ({self.decoder_max_positions})"
            )


@dataclass(frozen=True, config=SECTION)
class CompatConfig:
    """Reference-quirk switches (spec sections 1, 4, 5). Defaults are the correct behaviour."""

    token_layout: Literal["spatial", "reference_view"] = "spatial"
    decoder_mask: Literal["none", "causal"] = "none"
    matching: Literal["correct", "reference"] = "correct"
    eval_gumbel: bool = False
    # Build the parameters the reference has but never uses (BERT pooler, text global
    # projection, the sentence decoder's word embeddings), frozen, so its checkpoints load
    # strictly and parameter counts compare one to one.
    reference_unused_params: bool = False


REFERENCE_COMPAT = CompatConfig(
    token_layout="reference_view",
    decoder_mask="causal",
    matching="reference",
    eval_gumbel=True,
    reference_unused_params=True,
)


@dataclass(frozen=True, config=SECTION)
class ModelConfig:
    image: ImageTowerConfig = field(default_factory=ImageTowerConfig)
    text: TextTowerConfig = field(default_factory=TextTowerConfig)
    heads: HeadsConfig = field(default_factory=HeadsConfig)
    compat: CompatConfig = field(default_factory=CompatConfig)

    def __post_init__(self) -> None:
        if self.image.arch == "vit" and self.compat.token_layout == "reference_view":
            raise ValueError(
                "compat.token_layout=reference_view reproduces a ResNet feature-map "
                "quirk; it does not apply to image.arch=vit"
            )

    def replace(self, **sections) -> ModelConfig:
        return dataclasses.replace(self, **sections)

    def for_vocabulary(self, size: int) -> ModelConfig:
        """This config for a tokenizer of `size` tokens: a text tower trained from scratch takes
        the tokenizer's vocabulary size; a pretrained one keeps its checkpoint's."""
        if self.text.pretrained is not None or self.text.vocab_size == size:
            return self
        return self.replace(text=dataclasses.replace(self.text, vocab_size=size))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict, where: str = "model") -> ModelConfig:
        """A model config from a mapping (a recipe's merged `model` section, a run directory's
        or an export's JSON), validated field by field."""
        return build(cls, data, where)


def _paper() -> ModelConfig:
    return ModelConfig()


def _demo() -> ModelConfig:
    # Trains in minutes on a CPU at 128 px (a 4x4 patch grid): a ResNet-10-like tower, a
    # 2-layer BERT, small heads.
    return ModelConfig(
        image=ImageTowerConfig(
            image_size=128, block="basic", layers=(1, 1, 1, 1), width=16, pool_heads=4
        ),
        text=TextTowerConfig(
            vocab_size=4096,
            hidden_size=128,
            num_layers=2,
            num_heads=4,
            intermediate_size=256,
            max_position_embeddings=256,
        ),
        heads=HeadsConfig(
            embed_dim=128,
            report_pool_heads=4,
            num_prototypes=64,
            decoder_layers=2,
            decoder_heads=4,
            decoder_intermediate=256,
            decoder_max_positions=64,
            image_decoder_widths=(64, 48, 32, 16, 8),
        ),
    )


def _tiny() -> ModelConfig:
    # For tests: every component present, dropout off so results are deterministic.
    return ModelConfig(
        image=ImageTowerConfig(
            image_size=32, block="basic", layers=(1, 1, 1, 1), width=4, pool_heads=2
        ),
        text=TextTowerConfig(
            vocab_size=800,
            hidden_size=32,
            num_layers=2,
            num_heads=2,
            intermediate_size=64,
            max_position_embeddings=128,
            dropout=0.0,
        ),
        heads=HeadsConfig(
            embed_dim=32,
            report_pool_heads=2,
            num_prototypes=16,
            num_queries=8,
            decoder_layers=1,
            decoder_heads=2,
            decoder_intermediate=64,
            decoder_dropout=0.0,
            decoder_max_positions=32,
            image_decoder_widths=(16, 16, 8, 8, 4),
            feature_dropout=0.0,
        ),
    )


MODEL_CONFIGS = {"paper": _paper, "demo": _demo, "tiny": _tiny}


def model_config(name: str, compat: str | CompatConfig = "default") -> ModelConfig:
    """A named configuration (`paper`, `demo`, `tiny`); `compat="reference"` sets every quirk."""
    if name not in MODEL_CONFIGS:
        raise ValueError(f"model must be one of {sorted(MODEL_CONFIGS)}, got {name!r}")
    config = MODEL_CONFIGS[name]()
    if isinstance(compat, CompatConfig):
        return config.replace(compat=compat)
    if compat not in ("default", "reference"):
        raise ValueError(f"compat must be 'default' or 'reference', got {compat!r}")
    if compat == "default":
        return config
    return config.replace(compat=REFERENCE_COMPAT, heads=reference_heads(config.heads))


def reference_heads(heads: HeadsConfig) -> HeadsConfig:
    """The head switches the reference preset changes besides `compat`: the pooled sentence
    mean, gradients into the generation targets, no conv biases before BatchNorm."""
    return dataclasses.replace(
        heads,
        sentence_loss_mean="pooled",
        detach_generation_targets=False,
        image_decoder_conv_bias=False,
    )
