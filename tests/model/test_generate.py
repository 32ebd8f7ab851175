"""Inference: `musetalk-fast generate` on a synthetic clip with the tiny config (random weights: the
pipeline, not the quality), the prepared-avatar stream, the checkpoint file, and bad input refused
with a message naming the argument, exit code 2 and nothing written."""
import numpy as np
import pytest
import torch

from musetalk_fast.cli import main
from musetalk_fast.data import generate_clips
from musetalk_fast.data.clips import SAMPLES_PER_FRAME, write_mp4, write_wav
from musetalk_fast.model.audio import audio_features, frame_windows
from musetalk_fast.model.config import ModelConfig
from musetalk_fast.model.inference import Avatar, cycle_indices, feather_mask
from musetalk_fast.model.musetalk import MuseTalk
from musetalk_fast.model.video_io import read_audio, read_video_frames

FRAMES = 12  # 0.48 s at 25 fps


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    """A synthetic 256x256 clip on disk (mp4 + wav) and its frames."""
    folder = tmp_path_factory.mktemp("clip")
    clip = next(generate_clips(1, 1, FRAMES / 25, seed=5))
    write_mp4(folder / "face.mp4", clip.frames)
    write_wav(folder / "speech.wav", clip.audio)
    return folder, clip


@pytest.fixture(scope="module")
def model(clip):
    """Random weights; the codebook fitted on the clip's audio (an untrained codebook has no centres)."""
    torch.manual_seed(0)
    model = MuseTalk(ModelConfig.named("tiny")).eval()
    audio = model.config.audio
    model.codebook.fit(frame_windows(audio_features(clip[1].audio, audio), FRAMES, audio))
    return model


@pytest.fixture(scope="module")
def checkpoint(model, tmp_path_factory):
    path = tmp_path_factory.mktemp("checkpoint") / "tiny.pt"
    model.save(path)
    return path


def test_checkpoint_round_trip(model, checkpoint):
    assert [p.name for p in checkpoint.parent.iterdir()] == ["tiny.pt"]  # no temporary file left behind
    loaded = MuseTalk.load(checkpoint)
    assert loaded.config == model.config
    state, loaded_state = model.state_dict(), loaded.state_dict()
    assert state.keys() == loaded_state.keys()
    assert all(torch.equal(state[k], loaded_state[k]) for k in state)
    not_a_checkpoint = checkpoint.parent / "other.pt"
    torch.save({"weights": torch.zeros(1)}, not_a_checkpoint)
    with pytest.raises(ValueError, match="is not a MuseTalk checkpoint"):
        MuseTalk.load(not_a_checkpoint)


def test_generate_writes_a_playable_mp4_that_changes_only_the_lower_half(clip, checkpoint, tmp_path, capsys):
    import imageio_ffmpeg

    folder, source = clip
    out = tmp_path / "dubbed.mp4"
    assert main(["generate", "--video", str(folder / "face.mp4"), "--audio", str(folder / "speech.wav"),
                 "--out", str(out), "--checkpoint", str(checkpoint), "--batch", "12"]) == 0
    printed = capsys.readouterr().out
    assert "FPS" in printed and f"wrote {out}: {FRAMES} frames" in printed
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dubbed.mp4"]
    frames, seconds = imageio_ffmpeg.count_frames_and_secs(str(out))
    assert frames == FRAMES and seconds == pytest.approx(FRAMES / 25, abs=0.01)
    audio = read_audio(out)
    assert audio.size / 16000 == pytest.approx(FRAMES / 25, abs=1 / 25)  # within one frame (AAC's priming)
    assert np.corrcoef(audio[:source.audio.size - 2048], source.audio[:source.audio.size - 2048])[0, 1] > 0.9
    # The upper half is the input's pixels, re-encoded: it differs by codec noise only; the lower half
    # (random weights: noise) differs far more.
    before, after = read_video_frames(folder / "face.mp4"), read_video_frames(out)
    assert after.shape == before.shape == (FRAMES, 256, 256, 3)
    difference = np.abs(after.astype(np.int16) - before.astype(np.int16)).astype(np.float32)
    codec_tolerance = 4.0  # mean absolute difference per frame, 0..255 levels
    upper = difference[:, :128 - 8].mean(axis=(1, 2, 3))  # 8 rows: x264 deblocking across the seam
    lower = difference[:, 128 + 16:].mean(axis=(1, 2, 3))  # below the feathered seam
    assert upper.max() < codec_tolerance < lower.min()


class RecordingUNet(torch.nn.Module):
    """Stands in for the U-Net: records its inputs, returns the reference latents."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def forward(self, z_t, masked, reference, audio, codes, t, r):
        self.calls.append({"z_t": z_t, "masked": masked, "reference": reference, "audio": audio, "codes": codes,
                           "t": t, "r": r})
        return reference


@pytest.fixture
def recorder(model):
    """The model with a RecordingUNet for the test's duration (monkeypatch would delete a submodule on undo)."""
    unet, model.unet = model.unet, RecordingUNet()
    yield model.unet
    model.unet = unet


def test_avatar_stream_cycles_the_frames_and_keeps_the_upper_half_bit_identical(clip, model, recorder, capsys):
    """(With the recording U-Net: the VAE, audio, batching and paste-back around it are under test.)"""
    _, source = clip
    frames = source.frames[:3]
    avatar = Avatar.prepare(model, frames, batch=4, seed=1)
    chunks = [source.audio[:5 * SAMPLES_PER_FRAME], source.audio[:100],  # under half a frame: no frames
              source.audio[5 * SAMPLES_PER_FRAME:8 * SAMPLES_PER_FRAME]]
    batches = []
    for frames_batch in avatar.stream(chunks):
        assert torch.is_grad_enabled() and not torch.is_inference_mode_enabled()  # no mode leaks between batches
        batches.append(frames_batch)
    assert [len(b) for b in batches] == [4, 1, 3]  # per chunk, batches of 4
    assert printed_fps_lines(capsys) == 2 and avatar.last_timings["frames"] == 3
    out = np.concatenate(batches)
    expected = frames[cycle_indices(0, 8, len(frames))]  # 0 1 2 2 1 0 0 1
    assert np.array_equal(out[:, :128], expected[:, :128])
    assert not np.array_equal(out[:, 128:], expected[:, 128:])


def test_each_frame_gets_its_audio_window_its_cycled_latents_and_the_one_fixed_noise(clip, model, recorder):
    _, source = clip
    avatar = Avatar.prepare(model, source.frames[:3], batch=5, seed=2)
    audio = source.audio[:7 * SAMPLES_PER_FRAME]
    list(avatar.stream([audio], report=False))
    # clips of config.clip_frames (4) consecutive frames, then the rest: [1, 4] + [1, 1], then [1, 2]
    assert [tuple(call["z_t"].shape[:2]) for call in recorder.calls] == [(1, 4), (1, 1), (1, 2)]
    seen = {name: torch.cat([call[name].flatten(0, 1) for call in recorder.calls])
            for name in ("z_t", "masked", "reference", "audio", "codes")}
    windows = frame_windows(audio_features(audio, model.config.audio), 7, model.config.audio)[None]
    with torch.no_grad():
        assert torch.allclose(seen["audio"], model.audio_encoder(windows)[0], atol=1e-5)
    assert torch.equal(seen["codes"], model.codebook.codes(windows)[0])
    assert torch.equal(seen["masked"], avatar.masked_latents[cycle_indices(0, 7, 3)])
    assert torch.equal(seen["reference"], avatar.reference_latents[cycle_indices(0, 7, 3)])  # each frame its own
    assert all(torch.equal(noise, avatar.noise) for noise in seen["z_t"])  # one noise for every frame
    assert all(bool((call["t"] == 1).all() and (call["r"] == 0).all()) for call in recorder.calls)


def test_generate_latents_is_one_step_from_the_given_noise(model, recorder):
    masked = torch.randn(2, 3, 16, 16, 16)
    reference, noise = torch.randn_like(masked), torch.randn(16, 16, 16)
    windows = torch.randn(2, 3, model.config.audio.window_mels, model.config.audio.n_mels)
    with torch.no_grad():
        assert torch.equal(model.generate_latents(masked, reference, windows, noise), reference)
        (call,) = recorder.calls
        assert torch.equal(call["z_t"], noise.expand_as(masked)) and torch.equal(call["masked"], masked)
        assert call["t"].tolist() == [1, 1] and call["r"].tolist() == [0, 0]
        assert torch.equal(call["codes"], model.codebook.codes(windows))
        assert torch.equal(call["audio"], model.audio_encoder(windows))


def test_one_reference_frame_for_every_frame(clip, model, recorder):
    _, source = clip
    own = Avatar.prepare(model, source.frames[:3], batch=5)
    avatar = Avatar.prepare(model, source.frames[:3], batch=5, reference_frame=2)
    assert torch.equal(avatar.masked_latents, own.masked_latents)
    list(avatar.stream([source.audio[:4 * SAMPLES_PER_FRAME]], report=False))
    (call,) = recorder.calls
    assert all(torch.equal(reference, own.reference_latents[2]) for reference in call["reference"][0])


def printed_fps_lines(capsys):
    return sum(line.startswith("stream:") and "FPS" in line for line in capsys.readouterr().out.splitlines())


def test_cycle_indices_go_forward_then_backward():
    assert cycle_indices(0, 10, 3).tolist() == [0, 1, 2, 2, 1, 0, 0, 1, 2, 2]
    assert cycle_indices(4, 3, 3).tolist() == [1, 0, 0]
    assert cycle_indices(0, 3, 1).tolist() == [0, 0, 0]


def test_feather_mask_is_zero_above_the_middle_and_rises_to_one():
    weight = feather_mask(64, 32)[:, 0, 0]
    assert weight.shape == (64,) and weight.dtype == np.float32
    assert (weight[:32] == 0).all() and (weight[32:36] > 0).all() and (weight[36:] == 1).all()
    assert (np.diff(weight) >= 0).all()


@pytest.fixture
def bad_inputs(clip, tmp_path):
    """A non-square video and audio one tenth of a second too short / too long beside the clip."""
    folder, source = clip
    write_mp4(tmp_path / "wide.mp4", source.frames[:, 32:224])  # 256 wide, 192 high
    write_wav(tmp_path / "short.wav", source.audio[:(FRAMES - 3) * SAMPLES_PER_FRAME])
    write_wav(tmp_path / "long.wav", np.pad(source.audio, (0, int(2.5 * SAMPLES_PER_FRAME))))
    write_wav(tmp_path / "one_more.wav", np.pad(source.audio, (0, SAMPLES_PER_FRAME)))
    (tmp_path / "exists.mp4").write_bytes(b"keep me")
    return folder, tmp_path


@pytest.mark.parametrize("change, message", [
    ({"--video": "absent.mp4"}, "argument --video: no such file: {tmp}/absent.mp4"),
    ({"--audio": "absent.wav"}, "argument --audio: no such file: {tmp}/absent.wav"),
    ({"--audio": "short.wav"}, "argument --audio: is 0.360 s, the video 0.480 s (12 frames at 25 fps): the audio "
                               "is 3.0 frames shorter than the video"),
    ({"--audio": "long.wav"}, "the audio is 2.5 frames longer than the video"),
    ({"--audio": "wide.mp4"}, "argument --audio: {tmp}/wide.mp4 has no readable audio stream"),
    ({"--video": "wide.mp4"}, "argument --video: frames are 256x192; generate needs square face crops"),
    ({"--out": "exists.mp4"}, "argument --out: {tmp}/exists.mp4 already exists; pass --force to overwrite it"),
    ({"--out": "dubbed.avi"}, "argument --out: {tmp}/dubbed.avi must be an .mp4 file"),
    ({"--out": "absent/dubbed.mp4"}, "argument --out: the folder {tmp}/absent does not exist"),
    ({"--checkpoint": "absent.pt"}, "argument --checkpoint: no such file: {tmp}/absent.pt"),
    ({"--config": "huge"}, "argument --config: config must be one of ['default', 'tiny'] (got 'huge')"),
    ({"--batch": "0"}, "argument --batch: must be >= 1 (got 0)"),
    ({"--reference-frame": "12"}, "argument --reference-frame: must be a frame of the video, 0 .. 11 (got 12)"),
    ({"--device": "gpu0"}, "argument --device: not a torch device: 'gpu0'"),
    ({"--device": "meta"}, "argument --device: must be cpu or cuda[:index] (got 'meta')"),
    *([] if torch.cuda.is_available() else [
        ({"--device": "cuda"}, "argument --device: cuda asked for, but this torch has no usable CUDA GPU")]),
])
def test_bad_input_is_refused_and_nothing_is_written(bad_inputs, capsys, change, message):
    folder, tmp = bad_inputs
    arguments = {"--video": str(folder / "face.mp4"), "--audio": str(folder / "speech.wav"),
                 "--out": str(tmp / "dubbed.mp4"), "--config": "tiny"}
    for flag, value in change.items():
        arguments[flag] = value if flag in ("--config", "--batch", "--reference-frame", "--device") else str(tmp / value)
    if "--checkpoint" in change:
        del arguments["--config"]
    before = {p.name: p.read_bytes() for p in tmp.iterdir()}
    with pytest.raises(SystemExit) as exit_info:
        main(["generate"] + [x for item in arguments.items() for x in item])
    assert exit_info.value.code == 2
    assert message.format(tmp=tmp) in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in tmp.iterdir()} == before


def test_audio_within_one_frame_is_accepted(bad_inputs):
    from musetalk_fast.model.inference import load_inputs

    folder, tmp = bad_inputs
    frames, audio = load_inputs(folder / "face.mp4", tmp / "one_more.wav")
    assert frames.shape == (FRAMES, 256, 256, 3) and audio.shape == (FRAMES * SAMPLES_PER_FRAME,)
