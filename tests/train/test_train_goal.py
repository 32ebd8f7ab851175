"""bench/train_goal.py (`make gpu-train`) orchestrates the right commands and judges the goals on the worse
split. The commands themselves are the CLI's (tested elsewhere); a real --quick run takes ~4 minutes on a
CPU, so here the CLI is replaced by a recorder that writes what each command would."""
import json

from musetalk_fast.bench import train_goal


def test_train_goal_runs_both_objectives_and_judges_the_worse_split(tmp_path, monkeypatch):
    commands = []

    def fake_main(argv):
        commands.append(argv)
        if argv[0] == "train":
            out = argv[argv.index("--out") + 1]
            (tmp_path / out).mkdir(parents=True, exist_ok=True)
            (tmp_path / out / "report.png").write_bytes(b"png")
        if argv[0] == "eval":
            l1 = "/l1/" in argv[argv.index("--checkpoint") + 1]
            split = argv[argv.index("--split") + 1]
            metrics = {"opening_correlation": 0.85 if split == "val" else (0.5 if l1 else 0.9),
                       "silent_closed_share": 0.95}
            (tmp_path / argv[argv.index("--json") + 1]).write_text(json.dumps(metrics))
        return 0

    monkeypatch.setattr("musetalk_fast.cli.main", fake_main)
    monkeypatch.chdir(tmp_path)
    summary = train_goal.main(["--results", "res", "--work", "work", "--steps1", "7", "--steps2", "3"])
    kinds = [c[0] for c in commands]
    assert kinds == ["make-data", "train-vae", "train-syncnet", "train", "train", "eval", "eval",
                     "train", "train", "eval", "eval"]
    trains = [c for c in commands if c[0] == "train"]
    assert [(c[c.index("--stage") + 1], c[c.index("--steps") + 1]) for c in trains] == [("1", "7"), ("2", "3")] * 2
    assert ["--objective", "l1"] == trains[2][trains[2].index("--objective"):][:2]
    assert "--objective" not in trains[0] and all("--vae" in c and "--syncnet" in c for c in trains)
    assert summary["runs"]["pmf"]["goals_met"]["opening_correlation"]
    assert not summary["runs"]["l1"]["goals_met"]["opening_correlation"]  # its test split is at 0.5
    written = json.loads((tmp_path / "res" / "train" / f"{summary['device']}-goal.json").read_text())
    assert written["runs"]["l1"]["metrics"]["test"]["opening_correlation"] == 0.5
    assert (tmp_path / "res" / "train" / f"{summary['device']}-goal-l1.png").read_bytes() == b"png"
