"""launch.py without processes: what a new launch does with the previous one's run and logs."""

from __future__ import annotations

from pathlib import Path

import launch
from conftest import make_config
from fedrest.server.state_dir import StateDirLock


def test_each_launch_sets_the_previous_runs_logs_aside_with_its_run(tmp_path):
    """The programs append to their log files: a launch moves the previous one's beside its archived run (or to
    an archive folder of their own when no run was stored), so logs/demo holds only this launch's."""
    logs = tmp_path / "logs"
    logs.mkdir()
    for name in ("coordinator.log", "worker_worker-2.log", "launch_worker2.out"):
        (logs / name).write_text(f"the previous launch's {name}\n")
    (logs / "notes.txt").write_text("not a log of ours")
    archived = tmp_path / "temp" / "archive" / "20261206-100000-abcdef"
    moved = launch.set_logs_aside(logs, str(tmp_path / "temp"), archived)
    assert moved == archived / "logs"
    assert sorted(p.name for p in moved.iterdir()) == ["coordinator.log", "launch_worker2.out",
                                                        "worker_worker-2.log"]
    assert (moved / "coordinator.log").read_text() == "the previous launch's coordinator.log\n"
    assert [p.name for p in logs.iterdir()] == ["notes.txt"]
    (logs / "coordinator.log").write_text("a launch whose coordinator never stored a run\n")
    alone = launch.set_logs_aside(logs, str(tmp_path / "temp"), None)
    assert alone.parent.parent == tmp_path / "temp" / "archive" and alone.parent.name.endswith("-logs")
    assert [p.name for p in alone.iterdir()] == ["coordinator.log"]
    assert launch.set_logs_aside(logs, str(tmp_path / "temp"), None) is None  # nothing left to move


def test_a_launch_into_the_directory_of_a_running_coordinator_leaves_its_run_alone(tmp_path, capsys):
    """A second launch.py in the same folder while the first one's coordinator runs: it must not set that live
    run aside (its coordinator would go on writing into the archive); it says who holds it and starts nothing."""
    cfg = make_config(tmp_path)
    temp = Path(cfg.temp_dir)
    holder = StateDirLock(temp)
    holder.acquire("pid 4242 on this host, listening on 127.0.0.1:5000")
    try:
        (temp / "coordinator.sqlite3").write_bytes(b"the live run")
        second = launch.Launch(cfg, 2, 5001)
        assert second.start() is False
        assert second.procs == {}
        assert (temp / "coordinator.sqlite3").read_bytes() == b"the live run" and not (temp / "archive").exists()
        out = capsys.readouterr().out
        assert out.startswith("error: ") and "pid 4242 on this host, listening on 127.0.0.1:5000" in out
    finally:
        holder.release()
