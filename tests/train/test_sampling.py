"""Informative Frame Sampling, Dynamic Margin Sampling and label cleaning (musetalk_fast/train/sampling.py)."""
import numpy as np
import pytest

from musetalk_fast.train.sampling import clean_labels, informative_references, pose_features, sample_margin


def test_informative_references_are_far_in_time_close_in_pose_far_in_mouth():
    rng = np.random.default_rng(0)
    count = 60
    pose = np.cumsum(rng.normal(size=(count, 3)), 0)  # a drifting head
    mouth = rng.uniform(0, 1, count)
    refs = informative_references(pose, mouth, np.random.default_rng(1), min_gap=5, pose_pool=8, choose_from=3)
    index = np.arange(count)
    assert refs.shape == (count,) and np.abs(refs - index).min() >= 5
    pose_distance = np.linalg.norm(pose[refs] - pose, axis=1)
    random_refs = np.array([rng.choice(index[np.abs(index - i) >= 5]) for i in index])
    assert pose_distance.mean() < 0.5 * np.linalg.norm(pose[random_refs] - pose, axis=1).mean()
    assert np.abs(mouth[refs] - mouth).mean() > np.abs(mouth[random_refs] - mouth).mean()
    # the same generator state gives the same references
    again = informative_references(pose, mouth, np.random.default_rng(1), min_gap=5, pose_pool=8, choose_from=3)
    assert (again == refs).all()
    # a clip shorter than the gap falls back to the farthest frame
    assert list(informative_references(pose[:3], mouth[:3], rng, min_gap=5)) == [2, 0, 0]
    with pytest.raises(ValueError, match="one row per frame"):
        informative_references(pose[:4], mouth[:5], rng)


def test_pose_features_from_truth_or_face_box():
    truth = {name: np.linspace(0, k + 1, 10) for k, name in enumerate(("roll", "yaw", "pitch", "scale", "tx", "ty"))}
    features = pose_features(truth)
    assert features.shape == (10, 6) and np.allclose(features.std(0), 1, atol=1e-3)
    boxes = np.stack([np.arange(10), np.zeros(10), np.arange(10) + 50, np.full(10, 60.0)], 1)
    assert pose_features({"face_box": boxes}).shape == (10, 4)
    stacked = {"pose": np.stack([truth[name] for name in ("roll", "yaw", "pitch", "scale", "tx", "ty")], 1),
               "face_box": boxes}  # as model.folder reads it: the pose fields win over the box
    assert np.array_equal(pose_features(stacked), features)
    with pytest.raises(ValueError, match=r"truth\['pose'\] must be \[T, 6\]"):
        pose_features({"pose": np.zeros((10, 4))})
    with pytest.raises(ValueError, match="face_box"):
        pose_features({})


def test_dynamic_margin_is_a_random_multiple_of_a_latent_row():
    rng = np.random.default_rng(0)
    margins = [sample_margin(rng, 16) for _ in range(200)]
    assert sorted(set(margins)) == [0, 8, 16]
    assert sample_margin(rng, 0) == 0 and sample_margin(rng, 7) == 0


def test_label_cleaning_drops_contradictions_and_counts_them():
    energy = np.array([-5.0, -5, -50, -50, -30])
    mouth = np.array([0.5, 0.0, 0.0, 0.6, 0.0])
    keep, counts = clean_labels(energy, mouth)
    assert keep.tolist() == [True, False, True, False, True]
    assert counts == {"speech_closed": 1, "silent_open": 1, "kept": 3, "frames": 5}
    with pytest.raises(ValueError, match="one value per frame"):
        clean_labels(energy[:2], mouth)


def test_pose_pool_bounds_how_far_the_reference_mouth_can_be():
    """The pose pool trades pose match for mouth distance. A head that moves with speech puts a silent
    frame's closest poses among silent frames: a small pool gives it closed references (which copying
    solves), a pool of the whole clip its most open frames (as an open reference at inference)."""
    from musetalk_fast.train.sampling import reference_candidates

    count = 80
    speaking = (np.arange(count) // 20) % 2 == 1
    rng = np.random.default_rng(2)
    mouth = np.where(speaking, rng.uniform(0.3, 1.0, count), 0.0)
    pose = np.stack([speaking * 2.0 + rng.normal(0, 0.1, count), rng.normal(0, 0.1, count)], 1)
    small = reference_candidates(pose, mouth, pose_pool=8)
    whole = reference_candidates(pose, mouth, pose_pool=count)
    assert mouth[small[~speaking]].max() == 0.0
    index = np.arange(count)
    for i in np.flatnonzero(~speaking):
        far = index[np.abs(index - i) >= 5]
        assert sorted(mouth[whole[i]]) == sorted(np.sort(mouth[far])[-3:])
