"""The `musetalk-fast` command line: one subcommand per job (make-data, check-data; train and eval to come).

    musetalk-fast make-data --identities 8 --clips 4 --out data/synthetic [--seconds 4] [--seed 0]
        [--force] [--contact-sheets] [--snr-db 20] [--reverb 0.3]
    musetalk-fast check-data --data DIR      # a real (or synthetic) folder: clips, identities, length mismatches
    musetalk-fast train-vae --data DIR --out VAE [--config tiny] [--steps N]   # the 16-channel VAE (docs/model.md)
    musetalk-fast prepare --data DIR --vae VAE --out SHARDS [--config tiny]   # latents + audio to .npy shards
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
    training = VAETraining(steps=args.steps, batch=args.batch, crop_size=args.crop, lr=args.lr, seed=args.seed,
                           max_minutes=args.max_minutes)
    try:
        report = run_train_vae(args.data, ModelConfig.named(args.config), args.out, training, force=args.force,
                               progress=not args.no_progress)
    except DataArgumentError as error:
        flag = {"crop_size": "--crop"}.get(error.argument, f"--{error.argument}")
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


def build_parser():
    parser = argparse.ArgumentParser(prog="musetalk-fast", description="musetalk_fast: data, training and evaluation")
    subcommands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    parsers = {"make-data": _add_make_data(subcommands), "check-data": _add_check_data(subcommands),
               "train-vae": _add_train_vae(subcommands), "prepare": _add_prepare(subcommands)}
    return parser, parsers


def main(argv=None):
    """Entry point of the `musetalk-fast` console script; returns the exit code (argparse exits 2 on bad input)."""
    parser, parsers = build_parser()
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    return args.run(args, parsers[args.command])


if __name__ == "__main__":
    sys.exit(main())
