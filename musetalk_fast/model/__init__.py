"""The thin MuseTalk-2.0 model: configs, the 16-channel VAE, the audio front end, the generator U-Net, inference."""
from .config import AudioConfig, ModelConfig, UNetConfig, VAEConfig  # noqa: F401
from .unet import MuseTalkUNet  # noqa: F401
from .vae import LatentStats, build_vae, compute_latent_stats, decode, encode, lower_half_mask, mask_lower_half  # noqa: F401,E501
from .audio import AudioCodebook, AudioEncoder, audio_features, frame_windows, load_audio, log_mel  # noqa: F401
from .musetalk import MuseTalk  # noqa: F401
