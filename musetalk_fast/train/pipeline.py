"""`musetalk-fast train`: from a data folder to the trained model, one stage or both.

    musetalk-fast train --config tiny --data D --out RUN                 # both stages, end to end
    musetalk-fast train --stage 1 --config tiny --data D --out RUN [--vae V] [--steps N] [--resume]
    musetalk-fast train --stage 2 --config tiny --data D --out RUN [--init RUN/stage1/model.pt] [--syncnet S]

The data folder is the synthetic layout (docs/data.md; real clips need the same per-frame ground truth):
its `train` identities train, its `val`/`test` identities are the held-out evaluation clips. Stage 1 needs
a VAE (`--vae`, a `musetalk-fast train-vae` folder); without one it trains one into RUN/vae first. Stage 2
starts from RUN/stage1/model.pt (or `--init`) and needs a SyncNet (`--syncnet`, a `musetalk-fast
train-syncnet` file); without one it trains one into RUN/syncnet.pt first.
"""
import json
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from .checkpoint import load_checkpoint
from .report import History, write_report
from .trainer import ResumeMismatchError, TrainOptions, train_stage

DEFAULT_STEPS = {"tiny": {1: 250, 2: 100}, "default": {1: 20000, 2: 5000}}
VAE_STEPS = {"tiny": 300, "default": 20000}
SYNCNET_STEPS = {"tiny": 200, "default": 5000}


class TrainArgumentError(ValueError):
    """Bad input to `train`: `argument` names it (the command-line flag without dashes)."""

    def __init__(self, argument, reason):
        super().__init__(f"{argument} {reason}")
        self.argument, self.reason = argument, reason


def eval_clip(clip):
    """A FolderClip as evaluate.py reads it: truth with `mouth_open` (the first mouth column)."""
    truth = dict(clip.truth)
    truth["mouth_open"] = np.asarray(clip.truth["mouth"])[:, 0]
    return SimpleNamespace(identity=clip.identity, name=clip.name, frames=clip.frames, audio=clip.audio, truth=truth)


def read_data(data, config, eval_clips):
    """(train FolderClips, held-out eval clips) of a data folder at the model's image size."""
    from ..model.folder import read_folder

    try:
        clips = list(read_folder(data, config.image_size))
    except ValueError as error:
        raise TrainArgumentError("data", str(error).removeprefix("data ")) from error
    missing = [f"{c.identity}/{c.name}" for c in clips if not c.truth]
    if missing:
        raise TrainArgumentError("data", f"{data}: clips without ground truth (<clip>.json), e.g. {missing[0]}")
    train = [c for c in clips if c.split == "train"]
    held = [eval_clip(c) for c in clips if c.split != "train"]
    if not train:
        raise TrainArgumentError("data", f"{data} has no clip of a 'train' identity (manifest.json splits)")
    # one clip per held-out identity first, so a few clips cover several identities
    seen = {}
    rank = [seen.__setitem__(c.identity, seen.get(c.identity, -1) + 1) or seen[c.identity] for c in held]
    held = [c for _, _, c in sorted(zip(rank, range(len(held)), held), key=lambda item: item[:2])]
    return train, held[:eval_clips]


def provide_vae(vae, data, config, out, progress):
    """The VAE folder to use: `vae`, or one trained now into out/vae (musetalk-fast train-vae)."""
    if vae is not None:
        if not Path(vae).exists():
            raise TrainArgumentError("vae", f"{vae} does not exist (a `musetalk-fast train-vae` output folder)")
        return Path(vae)
    from .vae import VAETraining, run_train_vae

    folder = Path(out) / "vae"
    if not (folder / "config.json").is_file():
        print(f"no --vae: training one into {folder}")
        run_train_vae(data, config, folder, VAETraining(steps=VAE_STEPS.get(config_name(config), 300)), force=True,
                      progress=progress)
    return folder


def provide_syncnet(syncnet, train_clips, config, out, progress):
    """The frozen SyncNet: loaded from `syncnet`, or trained now into out/syncnet.pt."""
    import torch

    from .syncnet import load_syncnet, syncnet_state

    if syncnet is not None:
        if not Path(syncnet).is_file():
            raise TrainArgumentError("syncnet", f"{syncnet} is not a file (a `musetalk-fast train-syncnet` output)")
        return load_syncnet(syncnet)
    path = Path(out) / "syncnet.pt"
    if not path.is_file():
        from .syncnet_training import train_syncnet

        print(f"no --syncnet: training one into {path}")
        trained, _ = train_syncnet(train_clips, config, steps=SYNCNET_STEPS.get(config_name(config), 200),
                                   progress=progress)
        from ..files import atomic_save

        atomic_save(syncnet_state(trained), path)
    return load_syncnet(path, map_location="cpu" if not torch.cuda.is_available() else "cuda")


def build_image_loss(options):
    """The image loss of options.perceptual_vgg/perceptual_lpips (image_losses.trainer_image_loss), loaded
    before any training so a bad weights file is named at once."""
    from .image_losses import trainer_image_loss

    try:
        return trainer_image_loss(options.perceptual_vgg, options.perceptual_lpips)
    except ValueError as error:  # "vgg_path ..." / "lpips_path ...": the flags are --perceptual-vgg/-lpips
        what, _, reason = str(error).partition(" ")
        flag = {"vgg_path": "perceptual-vgg", "lpips_path": "perceptual-lpips"}.get(what)
        if flag is None:
            raise
        raise TrainArgumentError(flag, reason) from error


def config_name(config):
    from ..model.config import CONFIGS

    return next((name for name, make in CONFIGS.items() if make() == config), "custom")


def build_stage1_model(config, vae_folder, train_clips, device):
    from ..model.musetalk import MuseTalk
    from ..model.vae import load_vae
    from .data import fit_codebook

    model = MuseTalk(config)
    vae, stats = load_vae(vae_folder, config)
    model.vae = vae
    model.latent_stats.load_state_dict(stats.state_dict())
    fit_codebook(model, train_clips)
    return model.to(device)


def run_train(data, out, config, stages=(1, 2), steps=None, resume=False, vae=None, syncnet=None, init=None,
              options=None, progress=True, device=None, callback=None):
    """The train command (module docstring). Returns the History of the run (also RUN/report.json/.png)."""
    import torch

    from .data import add_margins, encode_clips

    options = options or TrainOptions()
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    name = config_name(config)
    train_clips, eval_clips = read_data(data, config, options.eval_clips)
    image_loss = build_image_loss(options)
    history = History()
    started = time.perf_counter()
    encoded = None  # (TrainClips, label-cleaning counts) of the last stage
    for stage in stages:
        stage_steps = steps or DEFAULT_STEPS.get(name, DEFAULT_STEPS["tiny"])[stage]
        if stage == 1:
            vae_folder = provide_vae(vae, data, config, out, progress)
            # the random init, seeded after any VAE training here (which seeds itself): the same run twice is
            # the same run, with or without --vae
            torch.manual_seed(options.seed)
            model = build_stage1_model(config, vae_folder, train_clips, device)
            frozen_syncnet = None
        else:
            from ..model.musetalk import MuseTalk

            source = Path(init) if init else out / "stage1" / "model.pt"
            if not source.is_file():
                raise TrainArgumentError("init", f"{source} is not a file: stage 2 starts from a stage-1 model "
                                                 f"(run --stage 1 first, or pass --init)")
            model = MuseTalk.load(source).to(device)
            frozen_syncnet = provide_syncnet(syncnet, train_clips, config, out, progress).to(device)
            stage1 = out / "stage1" / "checkpoint.pt"
            if not history.steps and stage1.is_file():  # the report shows both stages' curves
                history.load_state_dict(load_checkpoint(stage1)["extra"]["history"])
                report = out / "report.json"  # and stage 1's timings, set after its last checkpoint
                if report.is_file():
                    info = json.loads(report.read_text()).get("info", {})
                    history.info.update({k: v for k, v in info.items() if k.startswith("stage1_")})
        tick = time.perf_counter()
        if stage == 2 and encoded is not None and not init:  # stage 1's latents, same VAE: add the margins
            clips = add_margins(model, encoded[0], options.margins)
            counts = encoded[1]
        else:
            clips, counts = encode_clips(model, train_clips, margins=options.margins if stage == 2 else (0,),
                                         pose_pool=options.reference_pose_pool)
        encoded = (clips, counts)
        history.info[f"stage{stage}_label_cleaning"] = counts
        history.info[f"stage{stage}_encode_seconds"] = time.perf_counter() - tick
        print(f"stage {stage}: {len(clips)} training clips, label cleaning dropped "
              f"{counts['frames'] - counts['kept']} of {counts['frames']} frames "
              f"({counts['speech_closed']} speech with a closed mouth, "
              f"{counts['silent_open']} silence with an open one)")
        tick = time.perf_counter()
        try:
            train_stage(model, stage, clips, eval_clips, out, stage_steps, options, resume_run=resume,
                        syncnet=frozen_syncnet, image_loss=image_loss, progress=progress, history=history,
                        callback=callback)
        except ResumeMismatchError as error:
            raise TrainArgumentError("resume", str(error)) from error
        history.info[f"stage{stage}_train_seconds"] = time.perf_counter() - tick
    history.info["total_seconds"] = time.perf_counter() - started
    history.info["config"] = name
    write_report(history, out, title=f"musetalk-fast train --config {name}")
    (out / "options.json").write_text(json.dumps(options.to_dict(), indent=1) + "\n")
    return history
