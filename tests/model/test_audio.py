"""The audio front end (tiny config): loading and resampling, log-mel alignment with the video frames,
per-frame windows with edge padding, the small encoder, the k-means codebook, the optional whisper path."""
import numpy as np
import pytest
import torch

from musetalk_fast.data import synthetic_tensors
from musetalk_fast.data.clips import write_wav
from musetalk_fast.model.audio import (AudioCodebook, AudioEncoder, audio_features, frame_windows, load_audio,
                                       log_mel)
from musetalk_fast.model.config import ModelConfig


@pytest.fixture(scope="module")
def config():
    return ModelConfig.named("tiny")


@pytest.fixture(scope="module")
def clip():
    _, _, tensors = next(synthetic_tensors(1, 1, 3.0, seed=5))
    return tensors


def test_load_audio_resamples_to_16k_mono(tmp_path):
    tone = np.sin(2 * np.pi * 440 * np.arange(8000) / 8000).astype(np.float32) * 0.5
    write_wav(tmp_path / "a.wav", tone, rate=8000)
    audio = load_audio(tmp_path / "a.wav")
    assert audio.dtype == np.float32 and audio.shape == (16000,)
    spectrum = np.abs(np.fft.rfft(audio))
    assert abs(np.argmax(spectrum) * 16000 / audio.size - 440) < 2
    with pytest.raises(ValueError, match="audio .*missing.wav is not a file"):
        load_audio(tmp_path / "missing.wav")


def test_log_mel_frames_2i_and_2i_plus_1_hear_video_frame_i(config):
    frames, k = 10, 6
    audio = np.zeros(640 * frames, np.float32)
    burst = np.random.default_rng(0).standard_normal(560).astype(np.float32)
    audio[640 * k + 40:640 * k + 600] = burst  # inside frame k, clear of the neighbours' mel windows
    mel = log_mel(audio, config.audio)
    assert mel.shape == (2 * frames, config.audio.n_mels) and mel.dtype == np.float32
    loud = np.flatnonzero(mel.max(1) > mel.min() + 1)
    assert loud.tolist() == [2 * k, 2 * k + 1]
    assert log_mel(audio[:-100], config.audio).shape[0] == 2 * frames  # ceil(N / hop)
    with pytest.raises(ValueError, match="audio is empty"):
        log_mel(np.zeros(0), config.audio)


def test_frame_windows_are_edge_padded(config):
    features = torch.arange(20, dtype=torch.float32).view(20, 1).expand(20, 3)
    windows = frame_windows(features, 10, config.audio)
    assert windows.shape == (10, config.audio.window_mels, 3) == (10, 10, 3)
    assert windows[0, :, 0].tolist() == [0, 0, 0, 0, 0, 1, 2, 3, 4, 5]
    assert windows[5, :, 0].tolist() == list(range(6, 16))
    assert windows[9, :, 0].tolist() == [14, 15, 16, 17, 18, 19, 19, 19, 19, 19]
    assert frame_windows(features, 12, config.audio)[11, :, 0].tolist() == [18, 19] + [19] * 8  # audio too short
    with pytest.raises(ValueError, match=r"features must be \[T > 0, C\]"):
        frame_windows(torch.zeros(0, 3), 4, config.audio)


def test_audio_encoder_tokens(config, clip):
    windows = frame_windows(audio_features(clip["audio"].numpy(), config.audio), 75, config.audio)
    encoder = AudioEncoder(config)
    tokens = encoder(windows.view(3, 25, *windows.shape[1:]))
    assert tokens.shape == (3, 25, config.audio.window_mels, config.audio.dim)
    tokens.square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in encoder.parameters())
    with pytest.raises(ValueError, match=r"windows must be \[B, F, 10, 80\] \(got \(25, 10, 80\)\)"):
        encoder(windows[:25])


def test_codebook_separates_clusters_and_saves_as_buffers(config):
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((8, 2, 80)) * 5
    labels = rng.integers(0, 8, 400)
    frames = centres[labels] + rng.standard_normal((400, 2, 80)) * 0.1
    windows = torch.from_numpy(np.repeat(frames, 5, axis=1)).float().view(4, 100, 10, 80)  # same mels per slot
    book = AudioCodebook(config)
    with pytest.raises(RuntimeError, match=r"codes before fit\(\)"):
        book.codes(windows)
    book.fit(windows)
    codes = book.codes(windows)
    assert codes.shape == (4, 100) and codes.dtype == torch.int64 and 0 <= codes.min() and codes.max() < 64
    # every true cluster maps to codes of its own (k-means with 64 centres may split a cluster, never merge two)
    owner = {}
    for code, label in zip(codes.flatten().tolist(), labels.tolist()):
        assert owner.setdefault(code, label) == label
    copy = AudioCodebook(config)
    copy.load_state_dict(book.state_dict())
    assert torch.equal(copy.codes(windows), codes)


def test_codebook_fits_on_the_cpu_whatever_the_device_of_its_buffers(config):
    """A codebook already moved to a GPU fits on the CPU (its k-means++ draws use a CPU generator, which
    torch.multinomial refuses for a CUDA tensor) and copies the result into its buffers; shown here with
    buffers on the meta device, which mixes with CPU tensors as a GPU's do: (points - mean) raised."""
    shape = (2, 30, config.audio.window_mels, config.audio.n_mels)
    windows = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    on_cpu = AudioCodebook(config).fit(windows)
    moved = AudioCodebook(config).to("meta").fit(windows)
    assert moved.centres.device.type == "meta" and moved.centres.shape == on_cpu.centres.shape


def test_codebook_on_speech_gives_silence_its_own_code(config, clip):
    windows = frame_windows(log_mel(clip["audio"].numpy(), config.audio), 75, config.audio)
    codes = AudioCodebook(config).fit(windows).codes(windows[None])[0]
    silent = clip["speaking"] == 0
    assert silent.any() and (~silent).any()
    silent_codes = set(codes[silent].tolist())
    speech_codes = codes[~silent].tolist()
    assert len(set(speech_codes)) > 5  # speech is spread over many codes
    assert sum(code in silent_codes for code in speech_codes) < len(speech_codes) / 2


def test_whisper_path_reads_a_local_folder(tmp_path, config):
    transformers = pytest.importorskip("transformers")
    import dataclasses

    whisper_config = transformers.WhisperConfig(d_model=32, encoder_layers=1, decoder_layers=1,
                                                encoder_attention_heads=2, decoder_attention_heads=2,
                                                encoder_ffn_dim=32, decoder_ffn_dim=32, num_mel_bins=80,
                                                vocab_size=100, max_target_positions=8, pad_token_id=0,
                                                bos_token_id=1, eos_token_id=2, decoder_start_token_id=1)
    transformers.WhisperModel(whisper_config).save_pretrained(tmp_path / "whisper")
    transformers.WhisperFeatureExtractor().save_pretrained(tmp_path / "whisper")
    audio_config = dataclasses.replace(config.audio, whisper=str(tmp_path / "whisper"))
    features = audio_features(np.zeros(640 * 10, np.float32), audio_config)
    assert features.shape == (20, 32)
    whisper_model = dataclasses.replace(config, audio=audio_config)
    windows = frame_windows(features, 10, audio_config)
    assert AudioEncoder(whisper_model)(windows[None]).shape == (1, 10, 10, config.audio.dim)
    assert AudioCodebook(whisper_model).fit(windows).codes(windows[None]).shape == (1, 10)
    with pytest.raises(ValueError, match="audio.whisper .*nowhere is not a local folder"):
        audio_features(np.zeros(640), dataclasses.replace(config.audio, whisper=str(tmp_path / "nowhere")))
