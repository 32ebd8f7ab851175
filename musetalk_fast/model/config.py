"""The model's configuration: one dataclass per part, `ModelConfig` holding them, and the named configs.

    ModelConfig.named("default")   sized for real use: 256x256 faces, an SD-sized 16-channel VAE, 8-frame clips
    ModelConfig.named("tiny")      small enough to train and run on a 2-core CPU: 128x128 faces, narrow widths

Shapes, with F frames per clip and the VAE's factor 8 (h = w = image_size // 8):
    latents            [B, F, latent_channels, h, w]
    log-mel windows    [B, F, audio.window_mels, audio.n_mels]   (2 * context + 1 video frames of mels)
    audio tokens       [B, F, audio.window_mels, audio.dim]      (the audio encoder's output)
    audio codes        [B, F] int64 in [0, audio.codes)           (the codebook's ids: Engram's tokens)
"""
import dataclasses
from dataclasses import dataclass, field


@dataclass
class VAEConfig:
    """diffusers AutoencoderKL with 16 latent channels; len(block_channels) - 1 halvings (4 levels: f8)."""
    latent_channels: int = 16
    block_channels: tuple = (128, 256, 512, 512)
    layers_per_block: int = 2
    norm_groups: int = 32
    pretrained: str = None  # a local diffusers folder or .safetensors file; None = random init


@dataclass
class AudioConfig:
    """16 kHz audio, log-mel at 50 frames/s (2 per video frame at 25 fps), a window of +-context video frames."""
    sample_rate: int = 16000
    n_mels: int = 80
    n_fft: int = 400       # 25 ms
    hop_length: int = 320  # 20 ms: 50 mel frames per second
    context: int = 2       # video frames each side (MuseTalk's +-2)
    dim: int = 384         # audio token width (whisper-tiny's width, so either encoder fits)
    layers: int = 2        # transformer layers of the small audio encoder
    codes: int = 512       # codebook size: the Engram's vocabulary
    whisper: str = None    # a local whisper-tiny folder (transformers); None = the small encoder

    @property
    def mels_per_frame(self):
        return self.sample_rate // self.hop_length // 25

    @property
    def window_mels(self):
        return (2 * self.context + 1) * self.mels_per_frame


@dataclass
class UNetConfig:
    """The generator: a U-Net over latents with mHC residual streams, gated spatial self-/audio cross-attention,
    DSA temporal attention across frames and an Engram audio memory at the bottleneck."""
    channels: tuple = (192, 384, 576)   # width per level (one halving between levels)
    blocks_per_level: int = 2
    attention_levels: tuple = (1, 2)    # levels with spatial self-, audio cross- and temporal attention
    head_dim: int = 64
    mhc_streams: int = 4                # n of the mHC residual streams
    temporal_topk: int = 8              # keys per query of the DSA temporal attention
    temporal_index_heads: int = 4
    engram_orders: tuple = (2, 3)       # n-gram orders over the audio codes
    engram_heads: int = 4
    engram_embed_dim: int = 64
    engram_table_size: int = 65521      # rows per (order, head) table (a prime)
    time_dim: int = 256                 # embedding of the flow times (t, t - r)
    norm_groups: int = 32


@dataclass
class ModelConfig:
    image_size: int = 256
    clip_frames: int = 8  # frames per training clip (temporal attention's span); inference runs any F
    vae: VAEConfig = field(default_factory=VAEConfig)
    audio: AudioConfig = field(default_factory=AudioConfig)
    unet: UNetConfig = field(default_factory=UNetConfig)

    @property
    def latent_size(self):
        return self.image_size // 2 ** (len(self.vae.block_channels) - 1)

    @classmethod
    def named(cls, name):
        if name not in CONFIGS:
            raise ValueError(f"config must be one of {sorted(CONFIGS)} (got {name!r})")
        return CONFIGS[name]()

    def to_dict(self):
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values):
        """The inverse of to_dict (e.g. from a checkpoint); lists become the tuples they were."""
        def build(kind, items):
            fields = {f.name: f for f in dataclasses.fields(kind)}
            unknown = set(items) - set(fields)
            if unknown:
                raise ValueError(f"unknown {kind.__name__} fields: {sorted(unknown)}")
            return kind(**{k: tuple(v) if isinstance(v, list) else v for k, v in items.items()})
        values = dict(values)
        parts = {"vae": VAEConfig, "audio": AudioConfig, "unet": UNetConfig}
        for name, kind in parts.items():
            if name in values:
                values[name] = build(kind, values[name])
        return build(cls, values)


def tiny_config():
    return ModelConfig(
        image_size=128, clip_frames=4,
        vae=VAEConfig(block_channels=(32, 64, 64, 64), layers_per_block=1, norm_groups=16),
        audio=AudioConfig(dim=64, layers=1, codes=64),
        unet=UNetConfig(channels=(64, 128), blocks_per_level=1, attention_levels=(1,), head_dim=32, mhc_streams=2,
                        temporal_topk=4, temporal_index_heads=2, engram_heads=2, engram_embed_dim=16,
                        engram_table_size=1021, time_dim=64, norm_groups=16))


CONFIGS = {"default": ModelConfig, "tiny": tiny_config}
