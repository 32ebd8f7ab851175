"""The thin MuseTalk-2.0 model: configs, the 16-channel VAE, the audio front end, the generator U-Net, inference."""
from .config import AudioConfig, ModelConfig, UNetConfig, VAEConfig  # noqa: F401
from .unet import MuseTalkUNet  # noqa: F401
