"""Inference: `musetalk-fast generate` on a synthetic clip with the tiny config (random weights: the
pipeline, not the quality), the prepared-avatar stream, the checkpoint file, and bad input refused
with a message naming the argument, exit code 2 and nothing written."""
import numpy as np
import pytest
import torch

from musetalk_fast.cli import main
from musetalk_fast.data import generate_clips
from musetalk_fast.data.clips import SAMPLES_PER_FRAME, write_mp4, write_wav
from musetalk_fast.model.config import ModelConfig
from musetalk_fast.model.inference import Avatar, cycle_indices, feather_mask
from musetalk_fast.model.musetalk import MuseTalk
from musetalk_fast.model.video_io import read_audio, read_video_frames

FRAMES = 20  # 0.8 s at 25 fps


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    """A synthetic 256x256 clip on disk (mp4 + wav) and its frames."""
    folder = tmp_path_factory.mktemp("clip")
    clip = next(generate_clips(1, 1, FRAMES / 25, seed=5))
    write_mp4(folder / "face.mp4", clip.frames)
    write_wav(folder / "speech.wav", clip.audio)
    return folder, clip


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return MuseTalk(ModelConfig.named("tiny")).eval()


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
                 "--out", str(out), "--checkpoint", str(checkpoint), "--batch", "8"]) == 0
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


def test_avatar_stream_cycles_the_frames_and_keeps_the_upper_half_bit_identical(clip, model, capsys):
    _, source = clip
    frames = source.frames[:6]
    avatar = Avatar.prepare(model, frames, batch=5, seed=1)
    chunks = [source.audio[:8 * SAMPLES_PER_FRAME], source.audio[8 * SAMPLES_PER_FRAME:17 * SAMPLES_PER_FRAME]]
    batches = list(avatar.stream(chunks))
    assert [len(b) for b in batches] == [5, 3, 5, 4]  # per chunk, batches of 5
    assert printed_fps_lines(capsys) == 2 and avatar.last_timings["frames"] == 9
    out = np.concatenate(batches)
    expected = frames[cycle_indices(0, 17, len(frames))]  # 0..5, 5..0, 0..4
    assert np.array_equal(out[:, :128], expected[:, :128])
    assert not np.array_equal(out[:, 128:], expected[:, 128:])


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
    ({"--audio": "short.wav"}, "argument --audio: is 0.680 s, the video 0.800 s (20 frames at 25 fps): the audio "
                               "is 3.0 frames shorter than the video"),
    ({"--audio": "long.wav"}, "the audio is 2.5 frames longer than the video"),
    ({"--video": "wide.mp4"}, "argument --video: frames are 256x192; generate needs square face crops"),
    ({"--out": "exists.mp4"}, "argument --out: {tmp}/exists.mp4 already exists; pass --force to overwrite it"),
    ({"--out": "dubbed.avi"}, "argument --out: {tmp}/dubbed.avi must be an .mp4 file"),
    ({"--out": "absent/dubbed.mp4"}, "argument --out: the folder {tmp}/absent does not exist"),
    ({"--checkpoint": "absent.pt"}, "argument --checkpoint: no such file: {tmp}/absent.pt"),
    ({"--config": "huge"}, "argument --config: config must be one of ['default', 'tiny'] (got 'huge')"),
    ({"--batch": "0"}, "argument --batch: must be >= 1 (got 0)"),
])
def test_bad_input_is_refused_and_nothing_is_written(bad_inputs, capsys, change, message):
    folder, tmp = bad_inputs
    arguments = {"--video": str(folder / "face.mp4"), "--audio": str(folder / "speech.wav"),
                 "--out": str(tmp / "dubbed.mp4"), "--config": "tiny"}
    for flag, value in change.items():
        arguments[flag] = value if flag in ("--config", "--batch") else str(tmp / value)
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
