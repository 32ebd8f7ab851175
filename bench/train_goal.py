"""Issue 14's training goal on this machine's device as one command (`make gpu-train` on a GPU): synthetic
data, a VAE and a SyncNet trained once, then stage 1 + stage 2 from scratch twice, each run timed and
evaluated on the held-out identities (the mouth measured in the generated pixels, `musetalk-fast eval`):

    pmf   the trainer's default objective (pixel MeanFlow; docs/train.md)
    l1    the comparison row: MuseTalk 1.5's one-step L1 objective (`--objective l1`) with the same pixel
          losses; "perceptual" is LPIPS with `--perceptual-vgg` (local torchvision vgg16 weights, both
          runs), else the trainer's default MS-SSIM + gradient loss

    python -m musetalk_fast.bench.train_goal [--results bench/results] [--work build/train-goal]
        [--runs pmf l1] [--perceptual-vgg vgg16.pth] [--quick]

Writes <results>/train/<device>-goal.json (the commands, wall seconds of every phase, each stage's own
training seconds from the run's report, the metrics of both runs on the val and test identities, which
goals hold on the worse split) and each run's report.png beside it. Goals (H100): both stages within 8
minutes, opening correlation >= 0.8 and >= 90 % closed mouths on silent frames. The step counts below
are a first guess for an H100 (no GPU has run this yet): the JSON says how long they took, and
`--steps1/--steps2` change them. The pmf run goes first and pays the Triton kernels' first compilation
(cached on disk for the l1 run): compare the stages' own seconds, not only the wall times. `--quick`
(a few steps on little data, results under --work) checks the pipeline on any machine.

The JSON is rewritten after each run, so a command stopped in the l1 run keeps the pmf one. Where one
command may run only so long (a rented GPU's 10-minute calls), `--runs pmf` and `--runs l1` split it in
two: each rebuilds the data, VAE and SyncNet from the same seeds (a GPU's VAE may differ in its last
bits) and, on a fresh machine, compiles the Triton kernels again (in its first stage's seconds); a JSON
already in the results folder made with the same options keeps its other run (each run records its
command and commit).
"""
import argparse
import json
import shutil
import sys
import time
from pathlib import Path

MARKER = ".train-goal"  # the work folder is ours to replace only if it holds this file (or is empty)

RUNS = {"pmf": [], "l1": ["--objective", "l1"]}
GOALS = {"train_seconds": 8 * 60, "opening_correlation": 0.8, "silent_closed_share": 0.9}


def timed(argv):
    """Run `musetalk-fast argv` in this process; its wall seconds (a non-zero exit raises)."""
    from musetalk_fast.cli import main

    start = time.perf_counter()
    code = main([str(a) for a in argv])
    if code:
        raise SystemExit(f"musetalk-fast {' '.join(map(str, argv))} exited with {code}")
    return time.perf_counter() - start


def evaluate(model, data, split, out):
    timed(["eval", "--checkpoint", model, "--data", data, "--split", split, "--json", out])
    return json.loads(Path(out).read_text())


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", default=None,
                        help="results folder (default bench/results, the committed one; --quick: under --work)")
    parser.add_argument("--work", default="build/train-goal", help="data and runs (replaced)")
    parser.add_argument("--config", default="tiny")
    parser.add_argument("--identities", type=int, default=24)
    parser.add_argument("--clips", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--vae-steps", type=int, default=1500)
    parser.add_argument("--syncnet-steps", type=int, default=600)
    parser.add_argument("--steps1", type=int, default=2000, help="stage 1 steps")
    parser.add_argument("--steps2", type=int, default=600, help="stage 2 steps")
    parser.add_argument("--runs", nargs="+", choices=list(RUNS), default=list(RUNS), help="which runs (default both)")
    parser.add_argument("--perceptual-vgg", metavar="PATH", help="local vgg16 weights: LPIPS in both runs")
    parser.add_argument("--quick", action="store_true", help="a few steps on little data (checks the pipeline)")
    args = parser.parse_args(argv)
    if args.quick:
        args.identities, args.clips, args.seconds = 6, 1, 1.5
        args.vae_steps, args.syncnet_steps, args.steps1, args.steps2 = 2, 2, 2, 2
    work = Path(args.work)
    if work.exists() and any(work.iterdir()) and not (work / MARKER).is_file():
        parser.error(f"argument --work: {work} is a non-empty folder this script did not make (no {MARKER})")
    args.results = args.results or str(work / "results" if args.quick else "bench/results")
    args.runs = list(dict.fromkeys(args.runs))  # each once, in the order given

    import torch

    from musetalk_fast.files import atomic_write_text

    from .gpu_check import source_commit
    from .run import device_name

    device = "cuda" if torch.cuda.is_available() else "cpu"
    name = f"{device_name(device)}-goal"
    path = Path(args.results) / "train" / f"{name}.json"
    options = {k: v for k, v in vars(args).items() if k not in SPLIT_OPTIONS}
    try:  # read now: --quick keeps its results under --work, which is replaced below
        earlier = json.loads(path.read_text()) if path.exists() else {}
        if not isinstance(earlier, dict) or not isinstance(earlier.get("runs", {}), dict):
            raise ValueError("no runs in it")
    except ValueError as error:  # not JSON, not text, not ours
        parser.error(f"argument --results: {path} is not a JSON file this script wrote ({error}); move it away")
    runs = {k: v for k, v in earlier.get("runs", {}).items() if k not in args.runs
            and earlier.get("shared_options") == options}  # the other run of a split goal

    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    (work / MARKER).write_text("made by musetalk_fast.bench.train_goal: replaced by its next run\n")
    data, vae, syncnet = work / "data", work / "vae", work / "syncnet.pt"
    progress = ["--no-progress"]
    perceptual = ["--perceptual-vgg", args.perceptual_vgg] if args.perceptual_vgg else []
    seconds = {"data": timed(["make-data", "--identities", args.identities, "--clips", args.clips, "--seconds",
                              args.seconds, "--seed", 7, "--out", data, *progress])}
    seconds["vae"] = timed(["train-vae", "--data", data, "--out", vae, "--config", args.config,
                            "--steps", args.vae_steps, *progress])
    seconds["syncnet"] = timed(["train-syncnet", "--data", data, "--out", syncnet, "--config", args.config,
                                "--steps", args.syncnet_steps, *progress])
    results = path.parent
    results.mkdir(parents=True, exist_ok=True)
    summary = {"command": "python -m musetalk_fast.bench.train_goal " + " ".join(sys.argv[1:] if argv is None
                                                                                  else map(str, argv)),
               "device": device_name(device), "torch": torch.__version__, "options": vars(args),
               "shared_options": options, "seconds": seconds, "runs": runs, "goals": GOALS}
    for run in args.runs:
        out = work / run
        base = ["train", "--config", args.config, "--data", data, "--out", out, "--vae", vae, "--syncnet", syncnet,
                *RUNS[run], *perceptual, *progress]
        train, stage_seconds = 0.0, {}
        for stage, steps in ((1, args.steps1), (2, args.steps2)):
            train += timed([*base, "--stage", stage, "--steps", steps])
            # the stage's timings from its command's report.json
            info = json.loads((out / "report.json").read_text())["info"]
            stage_seconds.update({k: v for k, v in info.items() if k.startswith(f"stage{stage}_") and
                                  k.endswith("_seconds")})
        metrics = {split: evaluate(out / "stage2" / "model.pt", data, split, work / f"{run}-{split}.json")
                   for split in ("val", "test")}
        runs[run] = {"train_seconds": train, "metrics": metrics, "report": f"{name}-{run}.png",
                     "stage_seconds": stage_seconds, "command": summary["command"], "command_seconds": seconds,
                     "commit": source_commit(),
                     "goals_met": goals_met(train, metrics)}
        shutil.copy(out / "report.png", results / f"{name}-{run}.png")
        print(f"{run}: both stages {train:.0f} s; " + "; ".join(
            f"{split} correlation {m['opening_correlation']:.3f}, closed {m['silent_closed_share']:.1%}"
            for split, m in metrics.items()), flush=True)
        atomic_write_text(path, json.dumps(summary, indent=1) + "\n")  # after each run: a stopped command keeps it
        print(f"wrote {path}", flush=True)
    return summary


SPLIT_OPTIONS = ("runs", "results", "work")  # options two halves of one goal may differ in


def goals_met(train_seconds, metrics):
    """Each goal on every split (the worse one decides; a NaN metric fails)."""
    return {"train_seconds": train_seconds <= GOALS["train_seconds"],
            **{key: all(m[key] >= GOALS[key] for m in metrics.values())
               for key in ("opening_correlation", "silent_closed_share")}}


if __name__ == "__main__":
    main()
