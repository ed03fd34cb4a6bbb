"""Typed model configuration: one dataclass per component, composed into `ModelConfig`.

Paper values are the defaults. `model_config("paper" | "demo" | "tiny", compat=...)` returns a
named configuration; `compat="reference"` turns on every reference-quirk switch of
`../shared/spec/prior-method.md` at once.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal

ImageArch = Literal["resnet", "vit"]
BlockKind = Literal["bottleneck", "basic"]
AttentionImpl = Literal["auto", "flash", "sdpa"]
LocalAttentionImpl = Literal["auto", "triton", "torch"]


def _choice(owner: str, name: str, value, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"{owner}.{name} must be one of {list(allowed)}, got {value!r}")


def _positive(owner: str, **values) -> None:
    for name, value in values.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{owner}.{name} must be a positive integer, got {value!r}")


def _probability(owner: str, name: str, value: float) -> None:
    if not 0.0 <= value < 1.0:
        raise ValueError(f"{owner}.{name} must be in [0, 1), got {value!r}")


@dataclass(frozen=True)
class ImageTowerConfig:
    arch: ImageArch = "resnet"
    image_size: int = 224
    # ResNet: torchvision layout; (bottleneck, [3, 4, 6, 3], width 64) is ResNet-50.
    block: BlockKind = "bottleneck"
    layers: tuple[int, ...] = (3, 4, 6, 3)
    width: int = 64
    pool_heads: int = 8
    # ViT: patch size, depth, width, heads (ViT-B/16 when arch="vit").
    patch_size: int = 16
    vit_depth: int = 12
    vit_width: int = 768
    vit_heads: int = 12
    vit_mlp_ratio: float = 4.0
    attention_impl: AttentionImpl = "auto"
    activation_checkpointing: bool = False
    # A torchvision-layout ImageNet state dict (local file); RGB conv1 is summed to 1 channel.
    pretrained: str | None = None

    def __post_init__(self) -> None:
        owner = "image"
        _choice(owner, "arch", self.arch, ("resnet", "vit"))
        _choice(owner, "block", self.block, ("bottleneck", "basic"))
        _choice(owner, "attention_impl", self.attention_impl, ("auto", "flash", "sdpa"))
        _positive(
            owner,
            image_size=self.image_size,
            width=self.width,
            pool_heads=self.pool_heads,
            patch_size=self.patch_size,
            vit_depth=self.vit_depth,
            vit_width=self.vit_width,
            vit_heads=self.vit_heads,
        )
        object.__setattr__(self, "layers", tuple(self.layers))
        if len(self.layers) != 4 or any(n < 1 for n in self.layers):
            raise ValueError(f"image.layers must be four positive block counts, got {self.layers}")
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


@dataclass(frozen=True)
class TextTowerConfig:
    """BERT-base shapes of Bio_ClinicalBERT by default."""

    vocab_size: int = 28996
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    intermediate_size: int = 3072
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    dropout: float = 0.1
    pad_token_id: int = 0
    attention_impl: AttentionImpl = "auto"
    activation_checkpointing: bool = False
    # A Hugging Face BERT checkpoint: a local directory or a hub id.
    pretrained: str | None = None

    def __post_init__(self) -> None:
        owner = "text"
        _positive(
            owner,
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            num_layers=self.num_layers,
            num_heads=self.num_heads,
            intermediate_size=self.intermediate_size,
            max_position_embeddings=self.max_position_embeddings,
            type_vocab_size=self.type_vocab_size,
        )
        _choice(owner, "attention_impl", self.attention_impl, ("auto", "flash", "sdpa"))
        _probability(owner, "dropout", self.dropout)
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"text.hidden_size ({self.hidden_size}) must be divisible by "
                f"text.num_heads ({self.num_heads})"
            )


@dataclass(frozen=True)
class HeadsConfig:
    """Everything after the two encoders: projections, alignment, SPB and the decoders."""

    embed_dim: int = 768
    report_pool_heads: int = 8
    logit_scale_init: float = 100.0
    logit_scale_max: float | None = None  # None: unclamped, as in the reference; CLIP uses 100
    local_attention_impl: LocalAttentionImpl = "auto"
    num_prototypes: int = 512
    gumbel_tau: float = 0.9
    # `normal`: W ~ N(0, 1), as in the paper. `sentences`: at the start of stage 2, W is set to
    # the most spread-out sentence embeddings of the first global batch (farthest-point
    # sampling), a standard remedy for codebook collapse (docs/model.md).
    prototype_init: Literal["normal", "sentences"] = "normal"
    num_queries: int = 16
    decoder_layers: int = 8
    decoder_heads: int = 12
    decoder_intermediate: int = 3072
    decoder_dropout: float = 0.1
    decoder_max_positions: int = 512
    image_decoder_widths: tuple[int, ...] = (768, 384, 192, 96, 48)
    feature_dropout: float = 0.5  # Dropout2d over the image token map (stage 3)
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
        owner = "heads"
        _positive(
            owner,
            embed_dim=self.embed_dim,
            report_pool_heads=self.report_pool_heads,
            num_prototypes=self.num_prototypes,
            num_queries=self.num_queries,
            decoder_layers=self.decoder_layers,
            decoder_heads=self.decoder_heads,
            decoder_intermediate=self.decoder_intermediate,
        )
        _choice(
            owner, "local_attention_impl", self.local_attention_impl, ("auto", "triton", "torch")
        )
        _probability(owner, "decoder_dropout", self.decoder_dropout)
        _choice(owner, "prototype_init", self.prototype_init, ("normal", "sentences"))
        _choice(owner, "sentence_loss_mean", self.sentence_loss_mean, ("per_report", "pooled"))
        _probability(owner, "feature_dropout", self.feature_dropout)
        object.__setattr__(self, "image_decoder_widths", tuple(self.image_decoder_widths))
        if len(self.image_decoder_widths) != 5 or min(self.image_decoder_widths) < 1:
            raise ValueError(
                "heads.image_decoder_widths must be five positive widths (one per "
                f"2x upsampling from stride 32), got {self.image_decoder_widths}"
            )
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
        if self.gumbel_tau <= 0:
            raise ValueError(f"heads.gumbel_tau must be > 0, got {self.gumbel_tau}")
        if self.logit_scale_init <= 0:
            raise ValueError(f"heads.logit_scale_init must be > 0, got {self.logit_scale_init}")
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


@dataclass(frozen=True)
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

    def __post_init__(self) -> None:
        owner = "compat"
        _choice(owner, "token_layout", self.token_layout, ("spatial", "reference_view"))
        _choice(owner, "decoder_mask", self.decoder_mask, ("none", "causal"))
        _choice(owner, "matching", self.matching, ("correct", "reference"))
        if not isinstance(self.eval_gumbel, bool):
            raise ValueError(f"compat.eval_gumbel must be true or false, got {self.eval_gumbel!r}")


REFERENCE_COMPAT = CompatConfig(
    token_layout="reference_view",
    decoder_mask="causal",
    matching="reference",
    eval_gumbel=True,
    reference_unused_params=True,
)


@dataclass(frozen=True)
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
    def from_dict(cls, data: dict) -> ModelConfig:
        parts = {
            "image": ImageTowerConfig,
            "text": TextTowerConfig,
            "heads": HeadsConfig,
            "compat": CompatConfig,
        }
        unknown = set(data) - set(parts)
        if unknown:
            raise ValueError(
                f"model config: unknown section(s) {sorted(unknown)}; allowed: {sorted(parts)}"
            )
        built = {}
        for name, kind in parts.items():
            values = dict(data.get(name) or {})
            allowed = {f.name for f in dataclasses.fields(kind)}
            bad = set(values) - allowed
            if bad:
                raise ValueError(
                    f"model config: unknown field(s) {sorted(bad)} in [{name}]; "
                    f"allowed: {sorted(allowed)}"
                )
            built[name] = kind(**values)
        return cls(**built)


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
