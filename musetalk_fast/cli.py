"""The `musetalk-fast` command line: one subcommand per job.

    musetalk-fast make-data --identities 8 --clips 4 --out data/synthetic [--seconds 4] [--seed 0]
        [--force] [--contact-sheets] [--snr-db 20] [--reverb 0.3]
    musetalk-fast check-data --data DIR      # a real (or synthetic) folder: clips, identities, length mismatches
    musetalk-fast train-vae --data DIR --out VAE [--config tiny] [--steps N]   # the 16-channel VAE (docs/model.md)
    musetalk-fast prepare --data DIR --vae VAE --out SHARDS [--config tiny]   # latents + audio to .npy shards
    musetalk-fast generate --video V --audio A --out O.mp4 (--checkpoint C | --config tiny) [--force] [--batch 20]
    musetalk-fast train --data D --out RUN [--config tiny] [--stage 1|2] [--steps N] [--resume] [--vae V] [--syncnet S] [--seed N]
        [--objective pmf|l1] [--perceptual-vgg VGG16.pth [--perceptual-lpips LPIPS.pth]] [--fp8]
    musetalk-fast train-syncnet --data D --out SYNCNET [--config tiny] [--steps N]  # the lip-sync expert (docs/train.md)
    musetalk-fast eval --checkpoint C --data D [--split test]   # mouth measured in generated pixels (docs/train.md)
"""
import argparse
import sys


def _add_make_data(subcommands):
    parser = subcommands.add_parser(
        "make-data", help="write synthetic talking-head clips (mp4 + wav + ground truth)",
        description="Write N identities x M clips of synthetic talking heads to --out: <identity>/<clip>.mp4, "
                    ".wav and .json (per-frame ground truth), and manifest.json with the train/val/test split by "
                    "identity (docs/data.md). Same --seed, same bytes.")
    parser.add_argument("--identities", type=int, required=True, help="number of identities (faces + voices)")
    parser.add_argument("--clips", type=int, required=True, help="clips per identity")
    parser.add_argument("--out", required=True, help="output folder (must be empty or new, unless --force)")
    parser.add_argument("--seconds", type=float, default=4.0, help="length of each clip (default 4)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--force", action="store_true",
                        help="write into a non-empty --out, replacing an earlier data set there")
    parser.add_argument("--contact-sheets", action="store_true", help="also write a contact-sheet PNG per clip")
    parser.add_argument("--snr-db", type=float, default=None, help="add background noise at this SNR (dB)")
    parser.add_argument("--reverb", type=float, default=None, help="add room reverb with this RT60 (seconds)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(run=_make_data)
    return parser


def _make_data(args, parser):
    from .data import DataArgumentError, write_dataset

    flag = {"identities": "--identities", "clips_per_identity": "--clips", "seconds": "--seconds", "out": "--out",
            "snr_db": "--snr-db", "reverb_rt60": "--reverb", "seed": "--seed"}
    try:
        manifest = write_dataset(args.out, args.identities, args.clips, args.seconds, seed=args.seed, force=args.force,
                                 contact_sheets=args.contact_sheets, snr_db=args.snr_db, reverb_rt60=args.reverb,
                                 progress=not args.no_progress)
    except DataArgumentError as error:
        parser.error(f"argument {flag.get(error.argument, error.argument)}: {error.reason}")
    splits = ", ".join(f"{name} {len(members)}" for name, members in manifest["splits"].items())
    print(f"wrote {len(manifest['clips'])} clips of {args.identities} identities to {args.out} "
          f"(identities per split: {splits})")
    return 0


def _add_check_data(subcommands):
    parser = subcommands.add_parser(
        "check-data", help="list the clips of a data folder and report audio/video length mismatches",
        description="Scan a folder of <identity>/<clip>.mp4 (+ .wav, or audio inside the mp4): count clips and "
                    "identities, and list every clip whose audio and video lengths differ by more than one frame "
                    "at 25 fps (exit code 1 if there is one; such clips are not trimmed).")
    parser.add_argument("--data", required=True, help="the data folder")
    parser.set_defaults(run=_check_data)
    return parser


def _check_data(args, parser):
    import warnings

    from .data.real import scan_folder

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the mismatches are printed below
            clips, mismatched = scan_folder(args.data)
    except ValueError as error:
        parser.error(f"argument --data: {error}")
    identities = len({clip.identity for clip in clips})
    print(f"{len(clips)} clips of {identities} identities in {args.data}")
    for clip in mismatched:
        print(f"length mismatch: {clip.video} video {clip.video_seconds:.3f} s, audio {clip.audio_seconds:.3f} s "
              f"({clip.mismatch_frames():+.1f} frames)")
    return 1 if mismatched else 0


def _add_train_vae(subcommands):
    from .model.config import CONFIGS

    parser = subcommands.add_parser(
        "train-vae", help="train the 16-channel VAE on the frames of a data folder",
        description="Train the VAE (L1 + mouth-weighted L1 + MS-SSIM + gradient loss + small KL) on the frames of "
                    "--data, measure its reconstruction PSNR on held-out frames (whole image and mouth box) and "
                    "the per-channel latent statistics, and save it as a diffusers folder at --out "
                    "(docs/model.md).")
    parser.add_argument("--data", required=True, help="data folder (musetalk-fast make-data, or real clips)")
    parser.add_argument("--out", required=True, help="output folder (must be empty or new, unless --force)")
    parser.add_argument("--config", default="tiny", choices=sorted(CONFIGS), help="model config (default tiny)")
    parser.add_argument("--steps", type=int, default=800, help="optimiser steps (default 800)")
    parser.add_argument("--batch", type=int, default=8, help="crops per step (default 8)")
    parser.add_argument("--crop", type=int, default=None, help="crop size in pixels (default half the image)")
    parser.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (default 1e-3)")
    parser.add_argument("--color-jitter", type=float, default=None,
                        help="strength s of a random colour cast per training crop: channel gains e^U(-s,s), "
                             "offsets U(-s/2,s/2); 0 = off (default 0.4, train/vae.py VAETraining; docs/model.md)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--max-minutes", type=float, default=None, help="stop after this many minutes")
    parser.add_argument("--force", action="store_true", help="write into a non-empty --out")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(run=_train_vae)
    return parser


def _train_vae(args, parser):
    from .data import DataArgumentError
    from .model.config import ModelConfig
    from .train.vae import VAETraining, run_train_vae

    for flag, value, low in (("--steps", args.steps, 1), ("--batch", args.batch, 1), ("--seed", args.seed, 0)):
        if value < low:
            parser.error(f"argument {flag}: must be >= {low} (got {value})")
    if not args.lr > 0:
        parser.error(f"argument --lr: must be positive (got {args.lr})")
    cast = VAETraining.color_jitter if args.color_jitter is None else args.color_jitter
    training = VAETraining(steps=args.steps, batch=args.batch, crop_size=args.crop, lr=args.lr, seed=args.seed,
                           max_minutes=args.max_minutes, color_jitter=cast)
    try:
        report = run_train_vae(args.data, ModelConfig.named(args.config), args.out, training, force=args.force,
                               progress=not args.no_progress)
    except DataArgumentError as error:
        flag = {"crop_size": "--crop", "color_jitter": "--color-jitter"}.get(error.argument, f"--{error.argument}")
        parser.error(f"argument {flag}: {error.reason}")
    metrics = report["eval"]
    mouth = f", mouth {metrics['mouth_psnr_db']:.2f} dB" if "mouth_psnr_db" in metrics else ""
    print(f"trained the VAE for {report['steps']} steps in {report['train_seconds']:.0f} s; held-out PSNR "
          f"{metrics['psnr_db']:.2f} dB{mouth}, MS-SSIM {metrics['ms_ssim']:.4f}; saved to {args.out}")
    return 0


def _add_prepare(subcommands):
    from .model.config import CONFIGS

    parser = subcommands.add_parser(
        "prepare", help="precompute latents, audio windows and codes of a data folder to .npy shards",
        description="Encode every clip of --data with the VAE of --vae (a train-vae folder): latents of the "
                    "frames and of the lower-half-masked frames, audio feature windows, audio codes (a k-means "
                    "codebook fitted on the train split), the frames and per-frame ground truth, as .npy files "
                    "under --out with manifest.json (docs/model.md).")
    parser.add_argument("--data", required=True, help="data folder (musetalk-fast make-data, or real clips)")
    parser.add_argument("--vae", required=True, help="the VAE folder written by musetalk-fast train-vae")
    parser.add_argument("--out", required=True, help="output folder (must be empty or new, unless --force)")
    parser.add_argument("--config", default="tiny", choices=sorted(CONFIGS), help="model config (default tiny)")
    parser.add_argument("--force", action="store_true", help="write into a non-empty --out, replacing earlier shards")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(run=_prepare)
    return parser


def _prepare(args, parser):
    from .model.config import ModelConfig
    from .data import DataArgumentError
    from .model.shards import prepare_shards

    try:
        manifest = prepare_shards(args.data, args.vae, args.out, ModelConfig.named(args.config), force=args.force,
                                  progress=not args.no_progress)
    except DataArgumentError as error:
        parser.error(f"argument --{error.argument}: {error.reason}")
    frames = sum(entry["num_frames"] for entry in manifest["clips"])
    print(f"wrote shards of {len(manifest['clips'])} clips ({frames} frames) to {args.out}")
    return 0


def _add_generate(subcommands):
    parser = subcommands.add_parser(
        "generate", help="dub a face video with new audio (lower half of the face regenerated)",
        description="Regenerate the lower half of every frame of --video (square face crops, any size) so the "
                    "mouth follows --audio, and write --out (H.264 + AAC, 25 fps, the video's resolution). The audio "
                    "must be as long as the video, give or take one frame. docs/model.md, Inference.")
    parser.add_argument("--video", required=True, help="the face video (square frames)")
    parser.add_argument("--audio", required=True, help="the new audio (wav, mp3, or any file with an audio stream)")
    parser.add_argument("--out", required=True, help="the output .mp4 (not overwritten without --force)")
    weights = parser.add_mutually_exclusive_group(required=True)
    weights.add_argument("--checkpoint", help="a model checkpoint (MuseTalk.save)")
    weights.add_argument("--config", help="a named config (tiny, default) with random weights: tests the pipeline")
    parser.add_argument("--force", action="store_true", help="overwrite an existing --out")
    parser.add_argument("--batch", type=int, default=20, help="frames per U-Net/VAE batch (default 20)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the avatar's fixed noise (default 0)")
    parser.add_argument("--reference-frame", type=int, default=None,
                        help="use this video frame as every frame's reference (default: each frame its own, MuseTalk)")
    parser.add_argument("--device", default=None,
                        help="torch device (default cuda when available, else cpu); bf16 autocast on cuda")
    parser.set_defaults(run=_generate)
    return parser


def _generate(args, parser):
    import time

    from .model.inference import (GenerateArgumentError, check_batch, check_device, check_paths,
                                  check_reference_frame, dub, load_inputs)
    from .model.musetalk import MuseTalk

    started = time.perf_counter()
    try:
        check_paths(args.video, args.audio, args.out, args.force, args.checkpoint)
        check_batch(args.batch)
        device = check_device(args.device)
        if args.config is not None:
            from .model.config import ModelConfig

            try:
                config = ModelConfig.named(args.config)
            except ValueError as error:
                raise GenerateArgumentError("config", str(error)) from error
        frames, samples = load_inputs(args.video, args.audio)
        check_reference_frame(args.reference_frame, len(frames))
        if args.checkpoint is not None:
            try:
                model = MuseTalk.load(args.checkpoint)
            except ValueError as error:
                raise GenerateArgumentError("checkpoint", str(error)) from error
        else:
            import torch

            from .model.audio import audio_features, frame_windows

            torch.manual_seed(args.seed)
            model = MuseTalk(config)
            # an untrained codebook has no centres: fit it on this audio so that the pipeline runs end to end
            model.codebook.fit(frame_windows(audio_features(samples, config.audio), len(frames), config.audio))
            print(f"--config {args.config}: random weights, codebook fitted on --audio (for testing the pipeline: "
                  f"the lower half of the face will be noise)", file=sys.stderr)
        dub(model.to(device), frames, samples, args.audio, args.out, args.batch, args.seed, started=started,
            reference_frame=args.reference_frame)
    except GenerateArgumentError as error:
        parser.error(f"argument --{error.argument}: {error.reason}")
    return 0


def _add_train(subcommands):
    parser = subcommands.add_parser(
        "train", help="train the model: stage 1 (pixel MeanFlow reconstruction), stage 2 (Engram + lip sync), or both",
        description="Train on the 'train' identities of --data (the synthetic layout, with ground truth), evaluate "
                    "on its val/test identities, write RUN/stage<k>/checkpoint.pt (resume), RUN/stage<k>/model.pt "
                    "(EMA weights) and RUN/report.json/.png. Without --stage: both stages. docs/train.md.")
    parser.add_argument("--data", required=True, help="the data folder (musetalk-fast make-data)")
    parser.add_argument("--out", required=True, help="the run folder")
    parser.add_argument("--config", default="tiny", help="named model config: tiny (default) or default")
    parser.add_argument("--stage", type=int, choices=(1, 2), help="one stage (default: 1 then 2)")
    parser.add_argument("--steps", type=int, help="steps per stage (default: per config and stage)")
    parser.add_argument("--resume", action="store_true", help="continue from RUN/stage<k>/checkpoint.pt")
    parser.add_argument("--vae", help="a train-vae folder (default: train one into RUN/vae)")
    parser.add_argument("--syncnet", help="a train-syncnet file for stage 2 (default: train one into RUN/syncnet.pt)")
    parser.add_argument("--init", help="stage 2's starting model (default RUN/stage1/model.pt)")
    parser.add_argument("--batch", type=int, default=None, help="clips per step (default 4)")
    parser.add_argument("--lr", type=float, default=None, help="AdamW learning rate (default 1e-3)")
    parser.add_argument("--eval-every", type=int, default=None, help="evaluate every N steps (default: at the end)")
    parser.add_argument("--seed", type=int, default=None,
                        help="the U-Net's init, batches, times and noise (default 0; a VAE or SyncNet trained here keeps 0)")
    parser.add_argument("--no-bf16", action="store_true", help="train in float32 (no bf16 autocast)")
    parser.add_argument("--fp8", action="store_true", help="Transformer Engine fp8 linears (GPU, when installed; turns gradient checkpointing off)")
    parser.add_argument("--objective", choices=("pmf", "l1"), default="pmf",
                        help="pmf: pixel MeanFlow (default); l1: MuseTalk 1.5's one-step L1 + perceptual "
                             "regression, the comparison row (docs/train.md)")
    parser.add_argument("--perceptual-vgg", metavar="PATH",
                        help="local torchvision vgg16 weights (.pth/.safetensors): LPIPS replaces the default "
                             "MS-SSIM + gradient image loss; nothing is downloaded")
    parser.add_argument("--perceptual-lpips", metavar="PATH",
                        help="the LPIPS project's vgg.pth (learned channel weights; with --perceptual-vgg)")
    parser.add_argument("--device", default=None, help="torch device (default cuda when available, else cpu)")
    _add_threads(parser)
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(run=_train)
    return parser


def _train(args, parser):
    from dataclasses import replace

    from .model.config import ModelConfig
    from .train.pipeline import TrainArgumentError, run_train
    from .train.trainer import MAX_SEED, TrainOptions

    try:
        config = ModelConfig.named(args.config)
    except ValueError as error:
        parser.error(f"argument --config: {error}")
    for flag, value, low in (("--steps", args.steps, 1), ("--batch", args.batch, 1), ("--eval-every", args.eval_every, 0),
                             ("--seed", args.seed, 0)):
        if value is not None and value < low:
            parser.error(f"argument {flag}: must be >= {low} (got {value})")
    if args.seed is not None and args.seed > MAX_SEED:
        parser.error(f"argument --seed: must be <= {MAX_SEED} (got {args.seed})")
    if args.perceptual_lpips and not args.perceptual_vgg:
        parser.error("argument --perceptual-lpips: needs --perceptual-vgg (the VGG16 its channel weights apply to)")
    _set_threads(args, parser)
    options = TrainOptions(bf16=not args.no_bf16, fp8=args.fp8, objective=args.objective,
                           perceptual_vgg=args.perceptual_vgg, perceptual_lpips=args.perceptual_lpips)
    overrides = {"batch": args.batch, "lr": args.lr, "eval_every": args.eval_every, "seed": args.seed}
    options = replace(options, **{k: v for k, v in overrides.items() if v is not None})
    try:
        history = run_train(args.data, args.out, config, stages=(args.stage,) if args.stage else (1, 2),
                            steps=args.steps, resume=args.resume, vae=args.vae, syncnet=args.syncnet, init=args.init,
                            options=options, progress=not args.no_progress, device=args.device)
    except TrainArgumentError as error:
        parser.error(f"argument --{error.argument}: {error.reason}")
    last = history.evals[-1] if history.evals else {}
    print(f"wrote {args.out}/report.json and report.png" + (
        f"; held-out opening correlation {last['opening_correlation']:.3f}, silent frames closed "
        f"{last['silent_closed_share']:.1%}" if "opening_correlation" in last else ""))
def _add_threads(parser):
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads for torch (on a shared machine 1 can be far faster than the default)")


def _set_threads(args, parser):
    if args.threads is not None:
        if args.threads < 1:
            parser.error(f"argument --threads: must be >= 1 (got {args.threads})")
        import torch

        torch.set_num_threads(args.threads)


def _add_train_syncnet(subcommands):
    parser = subcommands.add_parser(
        "train-syncnet", help="train the SyncNet (lower face vs audio window) that stage 2's lip-sync loss uses",
        description="Train a SyncNet on the 'train' identities of --data (contrastive: each frame's lower face "
                    "picks its own log-mel window among the batch's, in-clip offsets as hard negatives), report its "
                    "accuracy of picking the right audio offset among +-k on held-out identities, write --out. "
                    "docs/train.md.")
    parser.add_argument("--data", required=True, help="the data folder (musetalk-fast make-data)")
    parser.add_argument("--out", required=True, help="the SyncNet checkpoint file to write")
    parser.add_argument("--config", default="tiny", help="named model config: tiny (default) or default")
    parser.add_argument("--steps", type=int, default=300, help="training steps (default 300)")
    parser.add_argument("--batch", type=int, default=16, help="pieces of clip_frames frames per step (default 16)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--heldout", default="val", choices=("val", "test"), help="split measured (default val)")
    _add_threads(parser)
    parser.add_argument("--force", action="store_true", help="overwrite an existing --out")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(run=_train_syncnet)
    return parser


def _train_syncnet(args, parser):
    from .model.config import ModelConfig
    from .train.pipeline import TrainArgumentError
    from .train.syncnet_training import run_train_syncnet

    _set_threads(args, parser)
    try:
        config = ModelConfig.named(args.config)
    except ValueError as error:
        parser.error(f"argument --config: {error}")
    try:
        report = run_train_syncnet(args.data, args.out, config, args.steps, args.batch, args.seed, args.heldout,
                                   args.force, progress=not args.no_progress)
    except TrainArgumentError as error:
        parser.error(f"argument --{error.argument}: {error.reason}")
    print(f"wrote {args.out}: {args.heldout} offset accuracy {report['offset_accuracy']:.1%} (chance "
          f"{report['chance']:.1%}), speaking frames {report['offset_accuracy_speaking']:.1%} (chance "
          f"{report['chance_speaking']:.1%}), offsets +-{report['offsets']}, {report['frames']} frames; "
          f"{report['train_seconds']:.0f} s of training")
    return 0


def _add_eval(subcommands):
    parser = subcommands.add_parser(
        "eval", help="measure a model on held-out clips: mouth opening vs truth, closed in silence, PSNR/SSIM, FPS",
        description="Generate every clip of --split in --data with the checkpoint (one fixed reference frame per "
                    "clip) and measure the mouth in the generated pixels against the ground truth. docs/train.md.")
    parser.add_argument("--checkpoint", required=True, help="a model checkpoint (MuseTalk.save; train's model.pt)")
    parser.add_argument("--data", required=True, help="the data folder (musetalk-fast make-data)")
    parser.add_argument("--split", default="test", choices=("train", "val", "test"), help="clips measured (default test)")
    parser.add_argument("--reference", default="open", choices=("open", "first"),
                        help="each clip's reference frame: its widest-open mouth (default) or its first frame")
    parser.add_argument("--seed", type=int, default=0, help="seed of the generation noise (default 0)")
    parser.add_argument("--device", default=None, help="torch device (default cuda when available, else cpu)")
    parser.add_argument("--json", help="also write the metrics to this JSON file")
    _add_threads(parser)
    parser.set_defaults(run=_eval)
    return parser


def _eval(args, parser):
    import json

    from .train.evaluate import run_eval
    from .train.pipeline import TrainArgumentError

    _set_threads(args, parser)
    try:
        metrics = run_eval(args.checkpoint, args.data, args.split, args.reference, args.seed, args.device)
    except TrainArgumentError as error:
        parser.error(f"argument --{error.argument}: {error.reason}")
    text = json.dumps(metrics, indent=1, sort_keys=True)
    print(text)
    if args.json:
        with open(args.json, "w") as out:
            out.write(text + "\n")
    return 0


def build_parser():
    parser = argparse.ArgumentParser(prog="musetalk-fast", description="musetalk_fast: data, training and evaluation")
    subcommands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    parsers = {"make-data": _add_make_data(subcommands), "check-data": _add_check_data(subcommands),
               "train-vae": _add_train_vae(subcommands), "prepare": _add_prepare(subcommands),
               "generate": _add_generate(subcommands), "train": _add_train(subcommands),
               "train-syncnet": _add_train_syncnet(subcommands), "eval": _add_eval(subcommands)}
    return parser, parsers


def main(argv=None):
    """Entry point of the `musetalk-fast` console script; returns the exit code (argparse exits 2 on bad input)."""
    parser, parsers = build_parser()
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    return args.run(args, parsers[args.command])


if __name__ == "__main__":
    sys.exit(main())
