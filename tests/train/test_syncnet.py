"""The SyncNet: shapes, gradient flow to the frames, the losses, checkpoints and bad input."""
import pytest
import torch

from musetalk_fast.model.config import ModelConfig
from musetalk_fast.train.syncnet import (SyncNet, SyncNetConfig, contrastive_loss, load_syncnet, lower_half,
                                         sync_loss, syncnet_state)

CONFIG = ModelConfig.named("tiny")
SMALL = SyncNetConfig(face_size=(24, 48), visual_channels=(8, 16), audio_channels=16, dim=16, offsets=2)


def inputs(batch=2, frames=4, size=(64, 128), extra=0, seed=0):
    generator = torch.Generator().manual_seed(seed)
    audio = CONFIG.audio
    return (torch.rand(batch, frames, 3, *size, generator=generator) * 2 - 1,
            torch.randn(batch, frames + extra, audio.window_mels, audio.n_mels, generator=generator))


def test_embeddings_are_unit_vectors_of_any_frame_size():
    torch.manual_seed(0)
    net = SyncNet(CONFIG, SMALL)
    for size in [(64, 128), (24, 48), (33, 70)]:
        frames, windows = inputs(size=size)
        visual, audio = net.embed_frames(frames), net.embed_audio(windows)
        assert visual.shape == audio.shape == (2, 4, SMALL.dim)
        torch.testing.assert_close(visual.norm(dim=-1), torch.ones(2, 4))
        assert net(frames, windows).shape == (2, 4)
    assert net.embed_frames(inputs(frames=1)[0]).shape == (2, 1, SMALL.dim)  # one frame: its own context


def test_visual_context_is_the_neighbouring_frames():
    """Frame i's embedding depends on frames i-1..i+1 only (context 1), the end frames repeated at the ends."""
    torch.manual_seed(0)
    net = SyncNet(CONFIG, SMALL)
    frames, _ = inputs(batch=1, frames=5)
    changed = frames.clone()
    changed[0, 4] = -changed[0, 4]
    delta = (net.embed_frames(frames) - net.embed_frames(changed)).abs().amax(-1)[0]
    assert (delta[:3] == 0).all() and (delta[3:] > 0).all()


def test_sync_loss_flows_to_the_frames_only():
    torch.manual_seed(0)
    net = SyncNet(CONFIG, SMALL).requires_grad_(False)
    frames, windows = inputs()
    frames.requires_grad_(True)
    windows.requires_grad_(True)
    loss = sync_loss(net, lower_half(torch.nn.functional.pad(frames, (0, 0, 64, 0))), windows)
    loss.backward()
    assert loss.ndim == 0 and torch.isfinite(loss)
    assert frames.grad is not None and frames.grad.abs().sum() > 0 and windows.grad is None
    # the InfoNCE of each frame over the batch's 8 windows, its own the right one, computed here directly
    visual, audio = net.embed_frames(frames).reshape(8, -1), net.embed_audio(windows).reshape(8, -1)
    expected = -torch.log_softmax(net.scale * visual @ audio.T, dim=1).diagonal().mean()
    torch.testing.assert_close(loss, expected)


def test_identical_windows_are_no_negatives():
    """With every window the same audio there is nothing to tell apart: the loss is 0 (each has one candidate)."""
    torch.manual_seed(0)
    net = SyncNet(CONFIG, SMALL)
    frames, windows = inputs()
    same = windows[:1, :1].expand_as(windows).contiguous()
    assert sync_loss(net, frames, same).item() == pytest.approx(0.0, abs=1e-6)


def test_contrastive_loss_sees_the_in_clip_offsets():
    torch.manual_seed(0)
    net = SyncNet(CONFIG, SMALL)
    frames, windows = inputs(extra=2 * SMALL.offsets)
    loss = contrastive_loss(net, frames, windows)
    loss.backward()
    assert torch.isfinite(loss) and net.log_scale.grad is not None
    assert all(p.grad is not None for p in net.parameters())
    with pytest.raises(ValueError, match=r"windows must have shape \[B, F \+ 2k"):
        contrastive_loss(net, frames, windows[:, 1:])


def test_checkpoint_round_trip_is_frozen(tmp_path):
    torch.manual_seed(0)
    net = SyncNet(CONFIG, SMALL)
    net.fit_audio_stats(inputs()[1] * 3 + 1)
    torch.save(syncnet_state(net, {"accuracy": 0.5}), tmp_path / "s.pt")
    loaded = load_syncnet(tmp_path / "s.pt")
    frames, windows = inputs()
    torch.testing.assert_close(loaded(frames, windows), net(frames, windows))
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    assert loaded.sync == SMALL
    torch.save({"something": 1}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="is not a SyncNet checkpoint"):
        load_syncnet(tmp_path / "other.pt")


def test_bad_input_is_named():
    net = SyncNet(CONFIG, SMALL)
    frames, windows = inputs()
    with pytest.raises(ValueError, match=r"lower_face_frames must have shape \[B, F, 3, h, w\]"):
        sync_loss(net, frames[:, :, :1], windows)
    with pytest.raises(ValueError, match="lower_face_frames must be a floating-point tensor"):
        sync_loss(net, (frames * 100).to(torch.uint8), windows)
    with pytest.raises(ValueError, match=r"windows must have shape \[B, F, 10, 80\]"):
        sync_loss(net, frames, windows[..., :40])
    with pytest.raises(ValueError, match="must have the same \\[B, F\\]"):
        sync_loss(net, frames, windows[:, :3])
    with pytest.raises(ValueError, match="at least two frames"):
        sync_loss(net, frames[:1, :1], windows[:1, :1])
    with pytest.raises(ValueError, match="frames must not be empty"):
        net.embed_frames(frames[:, :0])


def test_short_training_beats_chance(heldout_clips):
    """A few dozen steps on two clips: the offset test on those clips (speaking frames) beats chance
    by far, and the loss falls. (Held-out identities: see docs/train.md for the measured figure.)"""
    from musetalk_fast.train.syncnet_training import offset_accuracy, train_syncnet

    tiny = SyncNetConfig(face_size=(24, 32), visual_channels=(8, 16, 32), audio_channels=32, dim=32, offsets=2)
    net, history = train_syncnet(heldout_clips, CONFIG, tiny, steps=60, batch=16, lr=3e-3, log_every=20)
    assert history["loss"][-1] < history["loss"][0]
    accuracy = offset_accuracy(net, heldout_clips)
    assert accuracy["chance_speaking"] == pytest.approx(0.2, abs=0.02)  # 1 / (2k + 1), a few repeats aside
    assert accuracy["offset_accuracy_speaking"] > 2 * accuracy["chance_speaking"], accuracy
