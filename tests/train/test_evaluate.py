"""The evaluation metrics on stand-in generators whose answers are known."""
import numpy as np
import pytest

from musetalk_fast.train.evaluate import PSNR_CAP, evaluate, mouth_quality, reference_index


def test_ground_truth_generator_scores_perfectly(heldout_clips):
    metrics = evaluate(lambda clip: clip.frames, heldout_clips)
    assert metrics["opening_correlation_min"] > 0.98
    assert metrics["silent_closed_share"] == 1.0 and metrics["silent_frames"] > 5
    assert metrics["mouth_psnr"] == PSNR_CAP and metrics["mouth_ssim"] == pytest.approx(1.0)
    assert metrics["opening_std_ratio"] == pytest.approx(1.0)
    assert metrics["clips"] == 2 and metrics["frames"] == 150 and metrics["fps"] > 0


def copy_reference_mouth(clip):
    """A generator that ignores the audio: the widest-open reference frame, moved to each frame's mouth centre."""
    import cv2

    centres, ref = np.asarray(clip.truth["mouth_centre"]), reference_index(clip, "open")
    size = clip.frames.shape[2], clip.frames.shape[1]
    return np.stack([cv2.warpAffine(clip.frames[ref], np.float32([[1, 0, dx], [0, 1, dy]]), size,
                                    borderMode=cv2.BORDER_REPLICATE) for dx, dy in centres - centres[ref]])


def test_reference_copy_does_not_correlate(heldout_clips):
    closed = evaluate(lambda clip: np.repeat(clip.frames[reference_index(clip, "first")][None], len(clip.frames), 0),
                      heldout_clips)
    assert abs(closed["opening_correlation"]) < 0.1 and closed["opening_std_ratio"] < 0.05
    assert closed["silent_closed_share"] == 1.0  # a closed reference is closed in silence too
    opened = evaluate(copy_reference_mouth, heldout_clips)  # an open mouth in every frame, where the head is
    assert abs(opened["opening_correlation"]) < 0.2 and opened["opening_std_ratio"] < 0.1
    assert opened["silent_closed_share"] == 0.0
    assert opened["mouth_psnr"] < 30 and opened["mouth_ssim"] < 0.9


def test_half_resolution_and_noise_degrade_gracefully(heldout_clips):
    """A generator at 128x128 is resized back; blur and noise lower PSNR/SSIM but keep the mouth readable."""
    import cv2

    rng = np.random.default_rng(0)

    def blurry(clip):
        small = np.stack([cv2.resize(f, (128, 128), interpolation=cv2.INTER_AREA) for f in clip.frames])
        return np.clip(small + rng.normal(0, 3, small.shape), 0, 255).astype(np.uint8)

    metrics = evaluate(blurry, heldout_clips)
    assert metrics["opening_correlation"] > 0.9 and metrics["silent_closed_share"] > 0.9
    assert 20 < metrics["mouth_psnr"] < PSNR_CAP and 0.5 < metrics["mouth_ssim"] < 1


def test_mouth_quality_matches_known_values():
    """Identical crops: PSNR capped, SSIM 1. Flat crops m and m + c: MSE c^2, and SSIM's luminance term alone,
    (2 m (m + c) + C1) / (m^2 + (m + c)^2 + C1) with C1 = (0.01 * 255)^2 on the 8-bit scale."""
    flat = np.full((1, 20, 20, 3), 100, np.uint8)
    psnr, ssim = mouth_quality(flat, flat)
    assert psnr[0] == PSNR_CAP and ssim[0] == pytest.approx(1.0)
    c1 = (0.01 * 255) ** 2
    psnr, ssim = mouth_quality(flat + 20, flat)
    assert psnr[0] == pytest.approx(10 * np.log10(255 ** 2 / 20 ** 2))
    assert ssim[0] == pytest.approx((2 * 100 * 120 + c1) / (100 ** 2 + 120 ** 2 + c1), rel=1e-3)  # float32


def test_bad_generator_output_is_named(heldout_clips):
    with pytest.raises(ValueError, match="generate_fn must return uint8 RGB frames"):
        evaluate(lambda clip: clip.frames.astype(np.float32), heldout_clips)
    with pytest.raises(ValueError, match=r"T=75"):
        evaluate(lambda clip: clip.frames[:-1], heldout_clips)
    with pytest.raises(ValueError, match="at least one clip"):
        evaluate(lambda clip: clip.frames, [])
    with pytest.raises(ValueError, match="reference rule"):
        reference_index(heldout_clips[0], "middle")
