"""Inference: dub a face video with new audio, offline (`generate`) or as a prepared avatar (`Avatar`).

MuseTalk's recipe, in our latent space:
  - the video's frames are square face crops; each is resized to config.image_size;
  - output frame k uses video frame c(k) of the cycle forward then backward through the video
    (0, 1, ..., N-1, N-1, ..., 0, 0, 1, ...), so any length of audio plays on a short video without a jump;
  - that frame's latent with its lower half masked (in pixels, before the VAE) is the masked target,
    the unmasked frame's latent the reference (MuseTalk inference uses the frame itself);
  - one step: x = unet(noise, masked, reference, audio tokens, audio codes, t=1, r=0), then VAE decode;
  - the generated face is resized back to the video's resolution and pasted over the lower half only,
    with a feathered seam: rows above the middle stay the input's pixels exactly.
The noise is drawn once per avatar (`seed`) and shared by every frame, not drawn fresh per frame:
with one-step generation, independent noise per frame adds frame-to-frame variation that the audio does
not explain (jitter); a fixed noise leaves the audio and the reference as the only things that change.

`Avatar.prepare(model, frames)` does the per-video work once (resizing, VAE encoding of the masked and
reference frames, the paste-back mask); `avatar.stream(audio_chunks)` then turns each chunk of audio
into frames: batched log-mel (or whisper) windows -> audio encoder and codes -> U-Net -> VAE decode ->
paste-back, and prints the frames per second. Each chunk is one utterance: its audio context is edge-padded at the
chunk's ends (as MuseTalk's real-time path does per audio clip), the frame cycle runs on across chunks.
"""
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from ..data.visemes import FPS
from .config import AudioConfig


class GenerateArgumentError(ValueError):
    """Bad input to `generate`: `argument` names it (the command-line flag without dashes)."""

    def __init__(self, argument, reason):
        super().__init__(f"{argument}: {reason}")
        self.argument, self.reason = argument, reason


def cycle_indices(start, count, num_frames):
    """Video frame of output frames start .. start + count - 1: forward then backward through the
    video, repeated (MuseTalk's frame_list + frame_list[::-1])."""
    position = np.arange(start, start + count) % (2 * num_frames)
    return np.where(position < num_frames, position, 2 * num_frames - 1 - position)


def feather_mask(height, width, feather=None):
    """float32 [H, W, 1] paste-back weight of the generated face: 0 in the upper half (rows < H // 2),
    rising with a smoothstep over `feather` rows (default H // 16) below the middle, then 1."""
    feather = max(1, height // 16) if feather is None else feather
    rows = np.arange(height, dtype=np.float32) - height // 2
    ramp = np.clip((rows + 1) / (feather + 1), 0, 1)
    weight = np.where(rows < 0, 0.0, ramp * ramp * (3 - 2 * ramp)).astype(np.float32)
    return np.broadcast_to(weight[:, None, None], (height, width, 1))


def resize(frames, size):
    """uint8 [N, H, W, 3] -> [N, size, size, 3] (area when shrinking, cubic when growing)."""
    import cv2

    if frames.shape[1] == size and frames.shape[2] == size:
        return frames
    interpolation = cv2.INTER_AREA if size < frames.shape[1] else cv2.INTER_CUBIC
    return np.stack([cv2.resize(frame, (size, size), interpolation=interpolation) for frame in frames])


def check_frames(frames, argument="video"):
    """Frames must be square face crops (any side; they are resized to the model's size and back)."""
    if frames.ndim != 4 or len(frames) == 0:
        raise GenerateArgumentError(argument, "has no video frames")
    height, width = frames.shape[1:3]
    if height != width:
        raise GenerateArgumentError(argument, f"frames are {width}x{height}; generate needs square face crops "
                                              f"(crop the face to a square first)")
    if height % 2:
        raise GenerateArgumentError(argument, f"frames are {width}x{height}; the side must be even (H.264 yuv420p)")


def check_device(name):
    """The torch device `generate` runs on: `name`, or CUDA when there is one, else the CPU."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise GenerateArgumentError("device", f"not a torch device: {name!r} ({error})") from error
    if device.type == "cuda" and not torch.cuda.is_available():
        raise GenerateArgumentError("device", f"{name} asked for, but this torch has no usable CUDA GPU")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise GenerateArgumentError("device", f"{name}: there are {torch.cuda.device_count()} CUDA GPU(s)")
    if device.type not in ("cpu", "cuda"):
        raise GenerateArgumentError("device", f"must be cpu or cuda[:index] (got {name!r})")
    return device


def check_reference_frame(reference_frame, num_frames):
    if reference_frame is not None and not 0 <= reference_frame < num_frames:
        raise GenerateArgumentError("reference-frame", f"must be a frame of the video, 0 .. {num_frames - 1} "
                                                       f"(got {reference_frame})")


def fit_audio(audio, num_frames, sample_rate=AudioConfig.sample_rate, fps=FPS, argument="audio"):
    """The audio cut or padded (with silence) to exactly num_frames video frames; more than one frame of
    difference is an error that says by how much."""
    samples = num_frames * sample_rate // fps
    difference = (audio.size - samples) * fps / sample_rate  # in video frames
    if abs(difference) > 1:
        relation = "longer" if difference > 0 else "shorter"
        raise GenerateArgumentError(
            argument, f"is {audio.size / sample_rate:.3f} s, the video {num_frames / fps:.3f} s ({num_frames} frames "
                      f"at {fps} fps): the audio is {abs(difference):.1f} frames {relation} than the video (at most 1 "
                      f"frame of difference is accepted; trim or pad one of them)")
    return np.pad(audio[:samples], (0, max(0, samples - audio.size)))


class Avatar:
    """A video prepared once for dubbing (reference latents, masked latents, paste-back mask, noise)."""

    def __init__(self, model, frames, masked_latents, reference_latents, noise, batch, device):
        self.model, self.frames, self.batch, self.device = model, frames, batch, device
        self.masked_latents, self.reference_latents, self.noise = masked_latents, reference_latents, noise
        self.paste_weight = feather_mask(*frames.shape[1:3])
        self.position = 0          # the next output frame's place in the frame cycle
        self.last_timings = None   # seconds per stage of the last stream() chunk, and the FPS

    @classmethod
    @torch.inference_mode()
    def prepare(cls, model, frames, batch=20, seed=0, device=None, reference_frame=None):
        """Cache what does not depend on the audio: frames uint8 [N, H, W, 3], square. The reference of
        each output frame is its own video frame (MuseTalk), or video frame `reference_frame` for all."""
        from .vae import encode, mask_lower_half, to_model_images

        check_frames(frames)
        check_reference_frame(reference_frame, len(frames))
        device = torch.device(device or next(model.parameters()).device)
        size = model.config.image_size
        model.vae.to(memory_format=torch.channels_last)  # same weights; ~25 % less CPU time (oneDNN NHWC)
        masked, reference = [], []
        for start in range(0, len(frames), batch):
            images = to_model_images(resize(frames[start:start + batch], size)).to(device)
            both = torch.cat([images, mask_lower_half(images)]).contiguous(memory_format=torch.channels_last)
            with _autocast(device):
                latents = encode(model.vae, model.latent_stats, both).float()
            reference.append(latents[:len(images)])
            masked.append(latents[len(images):])
        masked, reference = torch.cat(masked), torch.cat(reference)
        if reference_frame is not None:
            reference = reference[reference_frame:reference_frame + 1].expand_as(reference)
        noise = torch.randn(masked.shape[1:], generator=torch.Generator().manual_seed(seed)).to(device)
        return cls(model, frames, masked, reference, noise, batch, device)

    def stream(self, audio_chunks, report=True):
        """For each chunk of 16 kHz mono audio (float32 arrays, one utterance each), yield the dubbed
        frames uint8 [n, H, W, 3] in batches of `batch`, round(len(chunk) / 640) frames per chunk at 16 kHz
        (a chunk shorter than half a frame gives none); prints (report=True) and keeps in `last_timings` the
        frames per second of each chunk."""
        for chunk in audio_chunks:
            chunk = np.asarray(chunk, np.float32).reshape(-1)
            if chunk.size * FPS >= self.model.config.audio.sample_rate / 2:  # rounds to at least one frame
                yield from self._stream_chunk(chunk, report)

    def _stream_chunk(self, audio, report):
        from .audio import audio_features, frame_windows

        config = self.model.config
        num_frames = int(round(audio.size * FPS / config.audio.sample_rate))
        timings = dict.fromkeys(("audio features", "U-Net", "VAE decode", "paste-back"), 0.0)
        start_time = time.perf_counter()
        features = audio_features(audio, config.audio)
        windows = frame_windows(features, num_frames, config.audio).to(self.device)
        timings["audio features"] += time.perf_counter() - start_time
        for start in range(0, num_frames, self.batch):
            count = min(self.batch, num_frames - start)
            index = cycle_indices(self.position, count, len(self.frames))
            self.position += count
            # computed here, yielded outside: no inference or autocast mode leaks to the caller between batches
            yield self._batch(windows[None, start:start + count], index, timings)
        total = time.perf_counter() - start_time
        self.last_timings = {**timings, "frames": num_frames, "seconds": total, "fps": num_frames / total}
        if report:
            stages = ", ".join(f"{name} {seconds:.2f} s" for name, seconds in timings.items())
            print(f"stream: {num_frames} frames in {total:.2f} s = {num_frames / total:.1f} FPS ({stages}; batch "
                  f"{self.batch}, {self.device.type})", flush=True)

    @torch.inference_mode()
    def _batch(self, windows, index, timings):
        """Frames uint8 [n, H, W, 3] for feature windows [1, n, W, C] on video frames `index` [n]."""
        from .vae import decode, to_uint8

        latent_index = torch.from_numpy(index).to(self.device)
        with _autocast(self.device):
            tick = time.perf_counter()
            audio_tokens, codes = self.model.audio_features(windows)
            timings["audio features"] += _elapsed(tick, self.device)
            tick = time.perf_counter()
            latents = self._denoise(self.masked_latents[latent_index], self.reference_latents[latent_index],
                                    audio_tokens[0], codes[0])
            timings["U-Net"] += _elapsed(tick, self.device)
            tick = time.perf_counter()
            images = decode(self.model.vae, self.model.latent_stats,
                            latents.contiguous(memory_format=torch.channels_last))
            generated = to_uint8(images)
            timings["VAE decode"] += time.perf_counter() - tick
        tick = time.perf_counter()
        frames = self._paste(generated, index)
        timings["paste-back"] += time.perf_counter() - tick
        return frames

    def _denoise(self, masked, reference, audio, codes):
        """x = unet(noise, masked, reference, audio, codes, t=1, r=0) over frames [n, ...], as clips of
        config.clip_frames consecutive frames (the temporal attention's span in training) and the rest."""
        frames_per_clip, count = self.model.config.clip_frames, masked.shape[0]
        whole = count // frames_per_clip * frames_per_clip
        outputs = []
        for part, span in ((slice(0, whole), frames_per_clip), (slice(whole, count), count - whole)):
            if part.stop == part.start:
                continue

            def clips(x):
                return x[part].reshape(-1, span, *x.shape[1:])

            x = self.model.one_step(self.noise, clips(masked), clips(reference), clips(audio), clips(codes))
            outputs.append(x.flatten(0, 1))
        return torch.cat(outputs)

    def _paste(self, generated, index):
        """Generated faces resized to the video's size, pasted over the lower half of frames `index`."""
        originals = self.frames[index]
        generated = resize(generated, originals.shape[1])
        top = originals.shape[1] // 2
        out = originals.copy()
        weight = self.paste_weight[top:]
        out[:, top:] = np.round(originals[:, top:] * (1 - weight) + generated[:, top:] * weight).astype(np.uint8)
        return out


def _autocast(device):
    """bfloat16 autocast on CUDA; full precision elsewhere."""
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")


def _elapsed(tick, device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - tick


def check_paths(video, audio, out, force, checkpoint=None):
    """Input files exist, the output is a new .mp4 in an existing folder (or --force): nothing is read yet."""
    for argument, path in (("video", video), ("audio", audio), ("checkpoint", checkpoint)):
        if path is not None and not Path(path).is_file():
            raise GenerateArgumentError(argument, f"{path} is not a file" if Path(path).exists()
                                        else f"no such file: {path}")
    out = Path(out)
    if out.suffix.lower() != ".mp4":
        raise GenerateArgumentError("out", f"{out} must be an .mp4 file")
    if not out.parent.is_dir():
        raise GenerateArgumentError("out", f"the folder {out.parent} does not exist")
    if not os.access(out.parent, os.W_OK | os.X_OK):
        raise GenerateArgumentError("out", f"the folder {out.parent} is not writable")
    if out.exists() and (out.is_dir() or not force):
        raise GenerateArgumentError("out", f"{out} is a folder" if out.is_dir()
                                    else f"{out} already exists; pass --force to overwrite it")


def load_inputs(video, audio, sample_rate=AudioConfig.sample_rate):
    """(frames uint8 [N, H, W, 3] at 25 fps, audio float32 [N * 640]), checked: square frames, audio
    within one frame of the video's length."""
    from .video_io import read_audio, read_video_frames

    try:
        frames = read_video_frames(video)
    except ValueError as error:
        raise GenerateArgumentError("video", str(error)) from error
    check_frames(frames)
    try:
        samples = read_audio(audio, sample_rate)
    except ValueError as error:
        detail = str(error).strip().splitlines()[-1]
        raise GenerateArgumentError("audio", f"{audio} has no readable audio stream ({detail})") from error
    if samples.size == 0:
        raise GenerateArgumentError("audio", f"{audio} has no audio samples")
    return frames, fit_audio(samples, len(frames), sample_rate)


def generate(model, video, audio, out, force=False, batch=20, seed=0, report=True, reference_frame=None):
    """Dub `video` with `audio` into the mp4 `out` (the audio muxed in, 25 fps, the video's resolution).
    Every check runs before anything is written. Returns the stream's timings (and 'total seconds')."""
    started = time.perf_counter()
    check_paths(video, audio, out, force)
    check_batch(batch)
    frames, samples = load_inputs(video, audio, model.config.audio.sample_rate)
    return dub(model, frames, samples, audio, out, batch, seed, report, started, reference_frame)


def check_batch(batch):
    if batch < 1:
        raise GenerateArgumentError("batch", f"must be >= 1 (got {batch})")


def dub(model, frames, samples, audio_path, out, batch=20, seed=0, report=True, started=None, reference_frame=None):
    """The checked inputs of `generate` (load_inputs) -> the mp4 `out`, written to a temporary file beside
    it and renamed over it at the end (nothing is left behind on an error)."""
    from .video_io import write_video

    started = time.perf_counter() if started is None else started
    model.eval()
    avatar = Avatar.prepare(model, frames, batch=batch, seed=seed, reference_frame=reference_frame)
    out = Path(out)
    handle, temporary = tempfile.mkstemp(dir=out.parent, prefix=f".{out.stem}.", suffix=".partial.mp4")
    os.close(handle)
    try:
        write_video(temporary, avatar.stream([samples], report=report), audio_path, len(frames) / FPS)
        os.replace(temporary, out)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    timings = dict(avatar.last_timings, **{"total seconds": time.perf_counter() - started,
                                           "process cpu seconds": time.process_time()})
    if report:
        print(f"wrote {out}: {len(frames)} frames ({len(frames) / FPS:.2f} s) in {timings['total seconds']:.1f} s "
              f"(CPU time of the process so far, all threads: {timings['process cpu seconds']:.1f} s)",
              flush=True)
    return timings
