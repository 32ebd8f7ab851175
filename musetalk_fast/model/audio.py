"""The audio front end: 16 kHz audio -> log-mel at 50 frames/s -> one window of +-context video frames per
video frame -> audio tokens (a small transformer), and a k-means codebook of discrete audio codes (Engram ids).

    audio = load_audio("clip.wav")                      # float32 mono at 16 kHz (librosa; ffmpeg for videos)
    features = audio_features(audio, config.audio)      # [T_mel, n_mels] log-mel (or whisper-tiny features)
    windows = frame_windows(features, num_frames, config.audio)   # [F, window_mels, C]
    tokens = AudioEncoder(config)(windows[None])        # [1, F, window_mels, audio.dim]
    codes = codebook.codes(windows[None])               # [1, F] int64 in [0, audio.codes)

Alignment: video frame i (25 fps) covers samples [640 i, 640 (i + 1)); mel frame j is centred on sample
320 j + 160, so mel frames 2i and 2i + 1 are the two halves of video frame i's audio.
"""
import math
from pathlib import Path

import numpy as np
import torch
from torch import nn

VIDEO_FPS = 25


def load_audio(path, sample_rate=16000):
    """float32 mono audio at `sample_rate` (resampled by librosa). Containers librosa cannot read (mp4 with an
    audio stream) go through the ffmpeg that imageio-ffmpeg ships."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"audio {path} is not a file")
    import librosa

    try:
        audio, _ = librosa.load(str(path), sr=sample_rate, mono=True)
    except Exception:  # noqa: BLE001 - soundfile/audioread raise many kinds; ffmpeg says what is wrong
        from ..data.real import read_audio

        audio = read_audio(path, sample_rate)
    return np.ascontiguousarray(audio, dtype=np.float32)


def log_mel(audio, config):
    """Log-mel spectrogram [ceil(N / hop), n_mels] float32 of mono audio [N] at config.sample_rate: 50 frames/s,
    frame j centred on sample hop * j + hop / 2 (so mel frames 2i, 2i + 1 belong to video frame i). Power
    mel, log10 with a 1e-10 floor, scaled as Whisper does ((x + 4) / 4, values ~[-1, 2])."""
    import librosa

    audio = np.asarray(audio, dtype=np.float32).reshape(-1)
    if audio.size == 0:
        raise ValueError("audio is empty")
    hop, n_fft = config.hop_length, config.n_fft
    frames = math.ceil(audio.size / hop)
    left = (n_fft - hop) // 2  # centre of frame j = hop * j + hop / 2
    right = hop * (frames - 1) + n_fft - left - audio.size
    padded = np.pad(audio, (left, max(right, 0)))
    mel = librosa.feature.melspectrogram(y=padded, sr=config.sample_rate, n_fft=n_fft, hop_length=hop,
                                         center=False, n_mels=config.n_mels, power=2.0)
    mel = mel[:, :frames]
    return ((np.log10(np.maximum(mel, 1e-10)) + 4.0) / 4.0).T.astype(np.float32)


def whisper_features(audio, config):
    """Whisper-tiny encoder states [ceil(N / 320), d_model] at 50 frames/s from a local transformers folder
    (config.whisper), in 30 s chunks. Needs `pip install musetalk_fast[whisper]` (transformers)."""
    encoder, extractor = _whisper(config.whisper)
    audio = np.asarray(audio, dtype=np.float32).reshape(-1)
    frames = math.ceil(audio.size / config.hop_length)
    chunk = extractor.n_samples  # 30 s
    states = []
    with torch.no_grad():
        for start in range(0, audio.size, chunk):
            piece = audio[start:start + chunk]
            inputs = extractor(piece, sampling_rate=config.sample_rate, return_tensors="pt").input_features
            hidden = encoder(inputs.to(encoder.dtype)).last_hidden_state[0]  # 1500 states per 30 s
            states.append(hidden[:math.ceil(piece.size / config.hop_length)].float())
    return torch.cat(states)[:frames].numpy()


_WHISPER = {}


def _whisper(folder):
    folder = Path(folder)
    if str(folder) not in _WHISPER:
        if not folder.is_dir():
            raise ValueError(f"audio.whisper {folder} is not a local folder (a transformers whisper-tiny model; "
                             f"nothing is downloaded)")
        try:
            from transformers import WhisperFeatureExtractor, WhisperModel
        except ImportError as error:
            raise ImportError("audio.whisper needs transformers: pip install 'musetalk_fast[whisper]'") from error
        model = WhisperModel.from_pretrained(folder, local_files_only=True)
        extractor = WhisperFeatureExtractor.from_pretrained(folder, local_files_only=True)
        _WHISPER[str(folder)] = (model.get_encoder().eval(), extractor)
    return _WHISPER[str(folder)]


def audio_features(audio, config):
    """The per-50-fps features the audio encoder reads: log_mel, or whisper_features when config.whisper."""
    return whisper_features(audio, config) if config.whisper else log_mel(audio, config)


def feature_dim(config):
    """Width of audio_features: n_mels, or the whisper model's d_model."""
    if not config.whisper:
        return config.n_mels
    return _whisper(config.whisper)[0].config.d_model


def frame_windows(features, num_frames, config):
    """[num_frames, window_mels, C]: for video frame i, the feature frames of video frames i - context ..
    i + context (mels_per_frame each), the first/last feature frame repeated beyond the ends. `features`
    [T, C] (numpy or torch) shorter or longer than num_frames * mels_per_frame is edge-padded / cut."""
    per = config.mels_per_frame
    tensor = torch.as_tensor(np.asarray(features) if not torch.is_tensor(features) else features)
    if tensor.dim() != 2 or tensor.shape[0] == 0:
        raise ValueError(f"features must be [T > 0, C] (got {tuple(tensor.shape)})")
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1 (got {num_frames})")
    start = torch.arange(num_frames).view(-1, 1) * per - config.context * per
    index = (start + torch.arange(config.window_mels).view(1, -1)).clamp(0, tensor.shape[0] - 1)
    return tensor[index]


class AudioEncoder(nn.Module):
    """Audio tokens [B, F, W, dim] from feature windows [B, F, W, C] (C = feature_dim): a linear input projection,
    a learned position per window slot, `config.audio.layers` pre-norm transformer layers over the W slots of
    each frame's window, a final LayerNorm."""

    def __init__(self, config, input_dim=None):
        super().__init__()
        audio = config.audio
        self.input_dim = input_dim or (feature_dim(audio) if audio.whisper else audio.n_mels)
        self.window = audio.window_mels
        heads = max(1, audio.dim // 64)
        self.project = nn.Linear(self.input_dim, audio.dim)
        self.position = nn.Parameter(torch.randn(self.window, audio.dim) * 0.02)
        layer = nn.TransformerEncoderLayer(audio.dim, heads, 4 * audio.dim, dropout=0.0, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.layers = nn.TransformerEncoder(layer, audio.layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(audio.dim)

    def forward(self, windows):
        if windows.dim() != 4 or windows.shape[-2:] != (self.window, self.input_dim):
            raise ValueError(f"windows must be [B, F, {self.window}, {self.input_dim}] (got {tuple(windows.shape)})")
        batch, frames = windows.shape[:2]
        x = self.project(windows.flatten(0, 1).to(self.project.weight.dtype)) + self.position
        return self.norm(self.layers(x)).unflatten(0, (batch, frames))


class AudioCodebook(nn.Module):
    """Discrete audio codes, one per video frame: k-means (k = config.audio.codes) on the frame's own features
    (the centre mels_per_frame feature frames of its window, flattened and standardised). Buffers: the
    standardisation and the centres, so it is saved with the model."""

    def __init__(self, config, input_dim=None):
        super().__init__()
        audio = config.audio
        self.codes_count, self.per, self.context = audio.codes, audio.mels_per_frame, audio.context
        dim = self.per * (input_dim or (feature_dim(audio) if audio.whisper else audio.n_mels))
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("std", torch.ones(dim))
        self.register_buffer("centres", torch.zeros(audio.codes, dim))
        self.register_buffer("fitted", torch.zeros((), dtype=torch.bool))

    def frame_features(self, windows):
        """[..., W, C] windows -> [N, per * C] standardised centre features."""
        centre = windows[..., self.context * self.per:(self.context + 1) * self.per, :]
        flat = centre.flatten(-2).reshape(-1, self.mean.numel()).float()
        return (flat - self.mean) / self.std

    @torch.no_grad()
    def fit(self, windows, iterations=25, seed=0):
        """k-means++ then Lloyd iterations on the frames of `windows` [..., W, C]; empty clusters are re-seeded at
        the points farthest from their centres. With fewer distinct frames than codes, some codes stay unused."""
        # on the CPU whatever the windows' device: the k-means++ draws use a CPU generator (torch.multinomial
        # refuses a CPU generator for a CUDA tensor), and the codes come out the same on every machine
        windows = torch.as_tensor(windows).detach().cpu()
        if windows.dim() < 2 or windows.shape[-1] * self.per != self.mean.numel():
            raise ValueError(f"windows must be [..., W, {self.mean.numel() // self.per}] (got {tuple(windows.shape)})")
        centre = windows[..., self.context * self.per:(self.context + 1) * self.per, :]
        points = centre.flatten(-2).reshape(-1, self.mean.numel()).float()
        if points.shape[0] == 0:
            raise ValueError("windows has no frames to fit the codebook on")
        mean, std = points.mean(0), points.std(0, unbiased=False).clamp_min(1e-4)
        self.mean.copy_(mean)  # the buffers may live on a GPU: the fit itself stays on the CPU
        self.std.copy_(std)
        points = (points - mean) / std
        generator = torch.Generator().manual_seed(seed)
        centres = self._plus_plus(points, generator)
        for _ in range(iterations):
            distance = torch.cdist(points, centres)
            assign = distance.argmin(1)
            sums = torch.zeros_like(centres).index_add_(0, assign, points)
            counts = torch.bincount(assign, minlength=self.codes_count).float()
            empty = counts == 0
            centres = torch.where(empty[:, None], centres, sums / counts.clamp_min(1)[:, None])
            if empty.any():
                far = distance.gather(1, assign[:, None])[:, 0].argsort(descending=True)
                centres[empty] = points[far[torch.arange(int(empty.sum())) % far.numel()]]
        self.centres.copy_(centres)
        self.fitted.fill_(True)
        return self

    def _plus_plus(self, points, generator):
        centres = [points[torch.randint(points.shape[0], (1,), generator=generator)][0]]
        nearest = (points - centres[0]).square().sum(1)
        for _ in range(1, self.codes_count):
            total = nearest.sum()
            if total <= 0:  # every point is already a centre: repeat random ones
                pick = torch.randint(points.shape[0], (1,), generator=generator)
            else:
                pick = torch.multinomial(nearest / total, 1, generator=generator)
            centres.append(points[pick][0])
            nearest = torch.minimum(nearest, (points - centres[-1]).square().sum(1))
        return torch.stack(centres)

    def codes(self, windows):
        """[B, F] int64 codes of windows [B, F, W, C] (the nearest centre of each frame's features)."""
        if not bool(self.fitted):
            raise RuntimeError("AudioCodebook.codes before fit(): fit it on training windows first")
        if windows.dim() != 4:
            raise ValueError(f"windows must be [B, F, W, C] (got {tuple(windows.shape)})")
        features = self.frame_features(windows.to(self.mean.device))
        return torch.cdist(features, self.centres).argmin(1).view(windows.shape[:2])
