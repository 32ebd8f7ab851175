"""bench/train_goal.py (`make gpu-train`) orchestrates the right commands and judges the goals on the worse
split. The commands themselves are the CLI's (tested elsewhere); a real --quick run takes ~4 minutes on a
CPU, so here the CLI is replaced by a recorder that writes what each command would."""
import json

import pytest

from musetalk_fast.bench import train_goal
from musetalk_fast.cli import build_parser


def record_commands(tmp_path, monkeypatch):
    """Replace the CLI by a recorder whose train/eval commands write what the real ones would."""
    commands = []

    def fake_main(argv):
        build_parser()[0].parse_args(argv)  # the real command line accepts it
        commands.append(argv)
        if argv[0] == "train":
            out = tmp_path / argv[argv.index("--out") + 1]
            out.mkdir(parents=True, exist_ok=True)
            (out / "report.png").write_bytes(b"png")
            stage = argv[argv.index("--stage") + 1]  # as run_train: only this command's stage's timings
            info = {f"stage{stage}_train_seconds": float(stage), "total_seconds": 9.0}
            (out / "report.json").write_text(json.dumps({"info": info}))
        if argv[0] == "eval":
            l1 = "/l1/" in argv[argv.index("--checkpoint") + 1]
            split = argv[argv.index("--split") + 1]
            metrics = {"opening_correlation": 0.85 if split == "val" else (0.5 if l1 else 0.9),
                       "silent_closed_share": 0.95}
            (tmp_path / argv[argv.index("--json") + 1]).write_text(json.dumps(metrics))
        return 0

    monkeypatch.setattr("musetalk_fast.cli.main", fake_main)
    monkeypatch.chdir(tmp_path)
    return commands


def test_train_goal_runs_both_objectives_and_judges_the_worse_split(tmp_path, monkeypatch):
    commands = record_commands(tmp_path, monkeypatch)
    summary = train_goal.main(["--results", "res", "--work", "work", "--steps1", "7", "--steps2", "3",
                               "--perceptual-vgg", "vgg16.pth"])
    kinds = [c[0] for c in commands]
    assert kinds == ["make-data", "train-vae", "train-syncnet", "train", "train", "eval", "eval",
                     "train", "train", "eval", "eval"]
    trains = [c for c in commands if c[0] == "train"]
    assert [(c[c.index("--stage") + 1], c[c.index("--steps") + 1]) for c in trains] == [("1", "7"), ("2", "3")] * 2
    assert ["--objective", "l1"] == trains[2][trains[2].index("--objective"):][:2]
    assert "--objective" not in trains[0] and all("--vae" in c and "--syncnet" in c for c in trains)
    assert all(c[c.index("--perceptual-vgg") + 1] == "vgg16.pth" for c in trains)  # LPIPS in both runs
    assert summary["runs"]["l1"]["stage_seconds"] == {"stage1_train_seconds": 1.0, "stage2_train_seconds": 2.0}
    assert summary["runs"]["pmf"]["goals_met"]["opening_correlation"]
    assert not summary["runs"]["l1"]["goals_met"]["opening_correlation"]  # its test split is at 0.5
    written = json.loads((tmp_path / "res" / "train" / f"{summary['device']}-goal.json").read_text())
    assert written["runs"]["l1"]["metrics"]["test"]["opening_correlation"] == 0.5
    assert (tmp_path / "res" / "train" / f"{summary['device']}-goal-l1.png").read_bytes() == b"png"


def test_a_goal_split_in_two_commands_keeps_both_runs(tmp_path, monkeypatch):
    """--runs pmf then --runs l1 into one results folder: one JSON with both runs, each with its command;
    a later --runs l1 with other step counts does not keep the pmf run made with the old ones."""
    commands = record_commands(tmp_path, monkeypatch)
    common = ["--results", "res", "--work", "work", "--steps1", "7", "--steps2", "3"]
    train_goal.main([*common, "--runs", "pmf"])
    assert [c[0] for c in commands] == ["make-data", "train-vae", "train-syncnet", "train", "train", "eval", "eval"]
    assert all("--objective" not in c for c in commands)
    summary = train_goal.main([*common, "--runs", "l1"])
    assert sorted(summary["runs"]) == ["l1", "pmf"]
    assert "--runs pmf" in summary["runs"]["pmf"]["command"] and "--runs l1" in summary["runs"]["l1"]["command"]
    written = json.loads((tmp_path / "res" / "train" / f"{summary['device']}-goal.json").read_text())
    assert written["runs"].keys() == {"pmf", "l1"}
    summary = train_goal.main([*common[:-1], "4", "--runs", "l1"])
    assert list(summary["runs"]) == ["l1"]


def test_quick_halves_keep_each_other_and_a_broken_json_is_refused_first(tmp_path, monkeypatch, capsys):
    """--quick keeps its results under --work, which each command replaces: the earlier JSON is read
    before. A JSON cut short is refused before any training, naming it."""
    commands = record_commands(tmp_path, monkeypatch)
    train_goal.main(["--quick", "--work", "work", "--runs", "pmf"])
    summary = train_goal.main(["--quick", "--work", "work", "--runs", "l1", "l1"])  # a repeated run runs once
    assert sorted(summary["runs"]) == ["l1", "pmf"] and summary["runs"]["l1"]["commit"]
    assert sum(c[0] == "train" for c in commands) == 4
    path = tmp_path / "work" / "results" / "train" / f"{summary['device']}-goal.json"
    path.write_text(path.read_text()[:50])
    commands.clear()
    with pytest.raises(SystemExit) as exit_info:
        train_goal.main(["--quick", "--work", "work", "--runs", "l1"])
    assert exit_info.value.code == 2 and "not a JSON file" in capsys.readouterr().err and commands == []
    for broken in (b"[]", b"\xff\xfe not text"):
        path.write_bytes(broken)
        with pytest.raises(SystemExit) as exit_info:
            train_goal.main(["--quick", "--work", "work", "--runs", "l1"])
        assert exit_info.value.code == 2 and "not a JSON file" in capsys.readouterr().err and commands == []


def test_train_goal_refuses_a_work_folder_it_did_not_make(tmp_path, monkeypatch, capsys):
    (tmp_path / "keep.txt").write_text("mine")
    monkeypatch.setattr("musetalk_fast.cli.main", lambda argv: pytest.fail("nothing may run"))
    with pytest.raises(SystemExit) as exit_info:
        train_goal.main(["--work", str(tmp_path)])
    assert exit_info.value.code == 2 and "did not make" in capsys.readouterr().err
    assert (tmp_path / "keep.txt").read_text() == "mine"
    nan = {"opening_correlation": float("nan"), "silent_closed_share": 1.0}
    assert not train_goal.goals_met(1.0, {"val": nan, "test": {**nan, "opening_correlation": 0.9}})[
        "opening_correlation"]
