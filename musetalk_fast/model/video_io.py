"""Video and audio in and out for inference, through the ffmpeg binary that imageio-ffmpeg ships.

    read_video_frames(path)        uint8 RGB [T, H, W, 3] at 25 fps, at the video's own resolution
    read_audio(path)               float32 mono at 16 kHz (from a wav, or the audio stream of any container)
    write_video(path, frames, audio_path, seconds)
                                   H.264 (yuv420p) at 25 fps with the audio of `audio_path` as AAC, cut or
                                   padded with silence to exactly `seconds`
"""
import os
import subprocess
from fractions import Fraction

import numpy as np

from ..data.real import read_audio  # noqa: F401  (re-exported: ffmpeg decodes wav, mp3, m4a, mp4, ...)
from ..data.visemes import FPS

CRF = 16  # x264 quality: visually lossless, so the unchanged upper half stays close to the input


def _ffmpeg_exe():
    import imageio_ffmpeg

    return imageio_ffmpeg.get_ffmpeg_exe()


def probe_video(path):
    """(width, height) of the first video stream of `path`; ValueError when there is none."""
    import imageio_ffmpeg

    try:
        reader = imageio_ffmpeg.read_frames(os.fspath(path))
        meta = next(reader)
        reader.close()
    except (OSError, RuntimeError, StopIteration) as error:
        raise ValueError(f"{path} has no readable video stream ({str(error).strip().splitlines()[-1]})") from error
    return tuple(meta["size"])


def read_video_frames(path, fps=FPS):
    """uint8 RGB frames [T, H, W, 3] at `fps` (ffmpeg's fps filter drops or repeats frames of other
    rates), at the video's own resolution."""
    width, height = probe_video(path)
    command = [_ffmpeg_exe(), "-nostdin", "-v", "error", "-i", os.fspath(path), "-vf", f"fps={fps}",
               "-f", "rawvideo", "-pix_fmt", "rgb24", "-"]
    result = subprocess.run(command, capture_output=True)
    if result.returncode != 0:
        raise ValueError(f"ffmpeg could not read {path}: {result.stderr.decode(errors='replace').strip()}")
    return np.frombuffer(result.stdout, np.uint8).reshape(-1, height, width, 3)


def write_video(path, frames, audio_path, seconds, fps=FPS):
    """Encode uint8 RGB frames [T, H, W, 3] (H, W even) to an H.264 mp4 with the audio of `audio_path`
    (AAC), cut or padded with silence to exactly `seconds`. `frames` may be any iterable of frames
    or of [n, H, W, 3] batches (first one fixes the size), so a long video streams through."""
    import imageio_ffmpeg

    frames = iter(frames)
    first = np.asarray(next(frames))
    batch = first if first.ndim == 4 else first[None]
    height, width = batch.shape[1:3]
    output_params = ["-preset", "veryfast", "-crf", str(CRF), "-af", "apad", "-t", f"{seconds:.6f}",
                     "-movflags", "+faststart", "-f", "mp4"]
    writer = imageio_ffmpeg.write_frames(os.fspath(path), (width, height), fps=Fraction(fps), codec="libx264",
                                         pix_fmt_out="yuv420p", quality=None, macro_block_size=2,
                                         output_params=output_params, ffmpeg_log_level="error",
                                         audio_path=os.fspath(audio_path), audio_codec="aac")
    writer.send(None)
    try:
        while batch is not None:
            for frame in batch:
                writer.send(np.ascontiguousarray(frame))
            batch = next(frames, None)
            if batch is not None:
                batch = np.asarray(batch)
                batch = batch if batch.ndim == 4 else batch[None]
    finally:
        writer.close()
