"""What the trainer feeds the U-Net: the reference frame of each target (Informative Frame Sampling),
a random extra margin of the mask in stage 2 (Dynamic Margin Sampling) and the frames it
leaves out (label cleaning). These functions take per-frame arrays: the ground truth of docs/data.md, or
proxies of it (the face box for the pose, a mouth gap measured in the pixels for the opening; speech is
the audio's RMS either way). The trainer passes the ground truth: data.encode_clips refuses a clip without
its <clip>.json, since its evaluation needs the true opening too.

Informative Frame Sampling (MuseTalk 1.5): a reference frame whose head pose is close to the
target's (so the network need not re-pose the face) but whose mouth is far from it (so copying
the reference mouth never solves the task and the mouth must come from the audio), and at least
`min_gap` frames away (neighbours are near copies of the target).
"""
import numpy as np

from ..data.clips import POSE_FIELDS

# The pose pool trades pose match for mouth distance. A head moves with speech, so a silent frame's 8
# closest poses are mostly silent frames: 29 % of the silent training targets of the tiny run's data drew
# a reference opened < 0.1, which copying solves, and the U-Net learned to copy the reference mouth (an open
# reference kept silent mouths open). With 32, none do (docs/train.md).
POSE_POOL = 32


def pose_features(truth):
    """Per-frame pose [T, P] normalised per field by its spread over the clip (radians, scale and
    pixels made comparable): the ground-truth pose fields when present (one per key, or stacked as
    "pose" [T, 6] in POSE_FIELDS order, as model.folder reads them), else the face box's centre and size as
    a proxy (what a face tracker gives for real clips)."""
    if all(name in truth for name in POSE_FIELDS):
        pose = np.stack([np.asarray(truth[name], np.float64) for name in POSE_FIELDS], 1)
    elif "pose" in truth:
        pose = np.asarray(truth["pose"], np.float64)
        if pose.ndim != 2 or pose.shape[1] != len(POSE_FIELDS):
            raise ValueError(f"truth['pose'] must be [T, {len(POSE_FIELDS)}] ({', '.join(POSE_FIELDS)}; got {pose.shape})")
    elif "face_box" in truth:
        box = np.asarray(truth["face_box"], np.float64)
        pose = np.stack([(box[:, 0] + box[:, 2]) / 2, (box[:, 1] + box[:, 3]) / 2,
                         box[:, 2] - box[:, 0], box[:, 3] - box[:, 1]], 1)
    else:
        raise ValueError("truth needs the pose fields (roll, yaw, pitch, scale, tx, ty) or a face_box per frame")
    return (pose - pose.mean(0)) / (pose.std(0) + 1e-6)


def reference_candidates(pose, mouth, min_gap=5, pose_pool=POSE_POOL, choose_from=3):
    """The informative reference candidates of every frame, [T, choose_from] indices: among the frames
    at least `min_gap` away, the `pose_pool` with the closest pose (Euclidean over `pose` [T, P]); of
    those, the `choose_from` whose mouth opening (`mouth` [T]) differs most from the target's. A clip
    too short to have a frame `min_gap` away gets its farthest frame (repeated)."""
    pose, mouth = np.asarray(pose, np.float64), np.asarray(mouth, np.float64)
    count = len(mouth)
    if pose.shape[0] != count:
        raise ValueError(f"pose and mouth must have one row per frame (got {pose.shape[0]} and {count})")
    index = np.arange(count)
    out = np.empty((count, choose_from), np.int64)
    pose_distance = np.linalg.norm(pose[:, None] - pose[None], axis=-1)
    for i in range(count):
        far = np.abs(index - i) >= min_gap
        if not far.any():
            out[i] = int(np.argmax(np.abs(index - i)))
            continue
        candidates = index[far][np.argsort(pose_distance[i, far], kind="stable")[:pose_pool]]
        by_mouth = candidates[np.argsort(-np.abs(mouth[candidates] - mouth[i]), kind="stable")[:choose_from]]
        out[i] = np.resize(by_mouth, choose_from)
    return out


def informative_references(pose, mouth, rng, min_gap=5, pose_pool=POSE_POOL, choose_from=3):
    """One reference index per frame [T]: one of its reference_candidates, drawn with `rng` (numpy Generator)."""
    candidates = reference_candidates(pose, mouth, min_gap, pose_pool, choose_from)
    return candidates[np.arange(len(candidates)), rng.integers(0, candidates.shape[1], len(candidates))]


def sample_margin(rng, max_margin, step=8):
    """Dynamic Margin Sampling (MuseTalk 1.5, stage 2): a random extra margin of the inpainting mask, a
    multiple of `step` pixels in [0, max_margin] (one VAE latent row is 8 pixels): the masked region's top
    moves up by that many rows (musetalk_fast.model.vae.lower_half_mask), so the network learns to fill a
    mouth region whose extent varies, as face crops' do."""
    return int(step * rng.integers(0, int(max_margin) // step + 1)) if max_margin >= step else 0


def speech_energy_db(audio, num_frames, samples_per_frame=640):
    """Each video frame's audio RMS in dB relative to the clip's loud level (its 95th percentile)."""
    from ..data.realism import rms_envelope

    rms = rms_envelope(audio, num_frames, samples_per_frame)
    reference = max(np.percentile(rms, 95), 1e-8)
    return 20 * np.log10(np.maximum(rms, 1e-8) / reference)


def clean_labels(energy_db, mouth_open, speech_db=-20.0, silence_db=-40.0, closed=0.05, opened=0.3):
    """Label cleaning: a boolean keep-mask [T] that drops the frames whose audio and mouth disagree,
    loud speech (energy above `speech_db`) with a closed mouth (opening below `closed`) or silence
    (below `silence_db`) with an open mouth (above `opened`), and the counts of each.
    The thresholds are wide, for clear contradictions (mis-aligned audio, a wrong mouth label). A
    bilabial closure (m, b, p) inside speech is a true closed mouth whose 40 ms window may still hold
    the neighbouring vowel's energy: on synthetic data, which has no label noise, these are what it
    drops (22 of 800 frames, 2.8 %, over 8 clips of 4 s, seed 0).
    """
    energy_db, mouth_open = np.asarray(energy_db, np.float64), np.asarray(mouth_open, np.float64)
    if energy_db.shape != mouth_open.shape:
        raise ValueError(f"energy_db and mouth_open must have one value per frame "
                         f"(got {energy_db.shape} and {mouth_open.shape})")
    loud_closed = (energy_db > speech_db) & (mouth_open < closed)
    silent_open = (energy_db < silence_db) & (mouth_open > opened)
    keep = ~(loud_closed | silent_open)
    return keep, {"speech_closed": int(loud_closed.sum()), "silent_open": int(silent_open.sum()),
                  "kept": int(keep.sum()), "frames": int(keep.size)}
