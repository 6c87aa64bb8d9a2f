"""Start a coordinator and N workers on this machine, follow the rounds, print a summary.

    python launch.py --workers 3 --rounds 5 --cpu

Each process is a separate ``python coordinator.py`` / ``python worker.py`` on 127.0.0.1 with a free
port and a fresh join token, all started at once; their output goes to LOGS_DIR/launch_<name>.out.
``--cpu-threads`` (default: cores / workers) is each worker's; the coordinator evaluates on every core.
Settings reach them as FL_* environment variables (see config.py). Its run state, checkpoints and logs are in
temp/demo, models/demo and logs/demo (unless --temp-dir, --models-dir, --logs-dir say otherwise), apart from
those of a coordinator started by hand; each launch sets the previous one's run aside into TEMP_DIR/archive/.
Ctrl-C stops every process started here.
Exit status: 0 when the run completed, 1 when a process failed, 130 on Ctrl-C.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import config as config_module
from fedrest.client import CoordinatorClient, CoordinatorError, CoordinatorUnreachable, make_session
from fedrest.monitoring import node_counts
from config import COORDINATOR_FIELDS, WORKER_FIELDS, Config
from fedrest.server.credentials import new_token
from fedrest.server.state_dir import StartRefused, StateDirLock, archive_run, new_archive_dir
from utils import program_command

HERE = Path(__file__).resolve().parent
# launch's run state, checkpoints and logs, apart from those of a coordinator started by hand
DEMO_DIRS = {"temp_dir": os.path.join("temp", "demo"), "models_dir": os.path.join("models", "demo"),
             "logs_dir": os.path.join("logs", "demo")}
LAUNCH_FIELDS = (
    "dataset", "data_dir", "models_dir", "logs_dir", "temp_dir", "communication_rounds", "local_epochs",
    "batch_size", "learning_rate", "momentum", "round_timeout", "partition", "alpha", "seed", "device",
    "cpu_threads", "task", "model", "image_size", "image_channels", "normalize_mean", "normalize_std",
    "data_workers", "eval_fraction", "no_eval", "client_fraction", "strategy", "server_learning_rate",
    "server_momentum", "beta1", "beta2", "tau", "proximal_mu", "aggregation", "trim_fraction", "clip_norm",
    "max_share", "dp_noise_multiplier", "dp_delta", "dp_epsilon_budget", "tensorboard_dir", "mlflow_uri",
    "mlflow_experiment",
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_min_nodes(num_workers: int, client_fraction: float, private: bool = False) -> int:
    """MIN_NODES_TO_START of a launch: every worker (C = 1, or differential privacy, whose Poisson sampling has
    no smallest sample and whose accounting wants every client there), else the round's sample, ceil(C * N),
    which is also the smallest sample the coordinator takes (so that C, not the start, sets how many train)."""
    if client_fraction >= 1 or private:
        return num_workers
    return max(1, math.ceil(client_fraction * num_workers))


def set_logs_aside(logs: Path, temp_dir: str, archived: Path | None) -> Path | None:
    """Move the previous launch's log files (``*.log``, ``*.out`` in ``logs``) to ``<archived>/logs/``, beside
    the run :func:`archive_run` set aside (or to a new ``TEMP_DIR/archive/<time>-logs/`` when there was none, as
    after a coordinator that did not start): the programs append to their log files, and each launch's logs are
    its own. Returns where they went, None when there were none."""
    old = sorted(p for p in logs.glob("*") if p.is_file() and p.suffix in (".log", ".out"))
    if not old:
        return None
    target = archived if archived is not None else new_archive_dir(temp_dir, "-logs")
    (target / "logs").mkdir(parents=True, exist_ok=True)
    for path in old:
        os.replace(path, target / "logs" / path.name)
    return target / "logs"


def child_env(cfg: Config, names, extra: dict) -> dict:
    """The environment of a child: ours plus FL_<FIELD> for each of ``names`` and ``extra``."""
    env = dict(os.environ)
    for name in names:
        value = getattr(cfg, name)
        if value is not None:
            env[config_module.env_name(name)] = str(value).lower() if isinstance(value, bool) else str(value)
    for name, value in extra.items():
        env[config_module.env_name(name)] = str(value)
    env["PYTHONUNBUFFERED"] = "1"
    return env


class Launch:
    """The processes of one local run and their output files."""

    def __init__(self, cfg: Config, num_workers: int, port: int) -> None:
        self.cfg, self.num_workers, self.port = cfg, num_workers, port
        self.token = new_token()  # join token of the workers
        self.monitor_token = new_token()  # read-only: status for this launcher and the monitors
        self.address = f"127.0.0.1:{port}"
        self.procs: dict[str, subprocess.Popen] = {}
        self.logs = Path(cfg.logs_dir)

    noun = "workers"  # what follow() counts as they register
    keep_serving = False  # after the summary, the coordinator serves the finished run until Ctrl-C

    def serve_finished_run(self) -> None:
        """Keep the coordinator serving the finished run to monitors until Ctrl-C (KeyboardInterrupt)."""
        print(f"\nthe coordinator serves the finished run on {self.address} until Ctrl-C; draw it with\n"
              f"  {program_command('monitor.py')} --coordinator-address {self.address} --token={self.monitor_token} "
              "--once --save run.png", flush=True)
        coordinator = self.procs["coordinator"]
        while coordinator.poll() is None:
            time.sleep(0.5)
        print(f"the coordinator exited with status {coordinator.returncode}")

    def _spawn(self, name: str, args: list, env: dict) -> None:
        """Start ``python *args`` (a program of this checkout) as ``name``; its output goes to launch_<name>.out."""
        out = open(self.logs / f"launch_{name}.out", "wb")
        self.procs[name] = subprocess.Popen([sys.executable, *map(str, args)], env=env, stdout=out,
                                            stderr=subprocess.STDOUT, cwd=os.getcwd())
        out.close()

    def coordinator_settings(self) -> dict:
        """The FL_* settings of the coordinator beyond LAUNCH_FIELDS'."""
        return {"host": "127.0.0.1", "port": self.port, "token": self.token, "monitor_token": self.monitor_token,
                "min_nodes_to_start": launch_min_nodes(self.num_workers, self.cfg.client_fraction,
                                                       self.cfg.dp_noise_multiplier > 0),
                "node_timeout": self.cfg.node_timeout, "heartbeat_interval": self.cfg.heartbeat_interval,
                "keep_serving": "true", "cpu_threads": 0}  # --cpu-threads is the workers': it evaluates on every core

    def start_workers(self) -> None:
        """Start the worker processes (their coordinator may still be starting: each waits for it)."""
        worker_fields = [f for f in LAUNCH_FIELDS if f in WORKER_FIELDS]
        for i in range(self.num_workers):
            self._spawn(f"worker{i}", [HERE / "worker.py"], child_env(self.cfg, worker_fields, {
                "coordinator_address": self.address, "token": self.token, "name": f"worker-{i}",
                "partition_id": i, "num_partitions": self.num_workers, "quiet": "true"}))

    def start(self) -> bool:
        """Set the previous launch's run aside, start the coordinator and the workers together (a worker waits
        for its coordinator to answer: the start-up of both overlaps), then wait until the coordinator answers
        with our token.

        Returns False (after printing why) when the coordinator does not come up; the caller stops the workers."""
        lock = StateDirLock(self.cfg.temp_dir)  # a coordinator still running there keeps its run: say so, stop
        try:
            self.logs.mkdir(parents=True, exist_ok=True)
            lock.acquire(f"launch.py pid {os.getpid()}, setting the previous run aside")
        except StartRefused as exc:
            print(f"error: {exc}")
            return False
        except OSError as exc:  # --logs-dir or --temp-dir under a file, read-only, ...
            print(f"error: cannot use --logs-dir {self.cfg.logs_dir} and --temp-dir {self.cfg.temp_dir}: {exc}")
            return False
        try:
            archived = archive_run(self.cfg.temp_dir, self.cfg.models_dir)  # each launch is a new run
            set_logs_aside(self.logs, self.cfg.temp_dir, archived)  # with logs of its own
        except OSError as exc:
            print(f"error: cannot set the previous run aside in {self.cfg.temp_dir}: {exc}")
            return False
        finally:
            lock.release()
        coord_fields = [f for f in LAUNCH_FIELDS if f in COORDINATOR_FIELDS]
        self._spawn("coordinator", [HERE / "coordinator.py"],
                    child_env(self.cfg, coord_fields, self.coordinator_settings()))
        self.start_workers()
        client = CoordinatorClient(self.address, token=self.monitor_token, session=make_session(total_retries=0))
        deadline = time.monotonic() + 120
        while True:
            if self.procs["coordinator"].poll() is not None:
                out = (self.logs / "launch_coordinator.out").read_text(errors="replace").strip().splitlines()
                print("the coordinator did not start:\n  " + "\n  ".join(out[-5:]))
                return False
            try:
                client.status()
                break
            except (CoordinatorUnreachable, CoordinatorError) as exc:
                if isinstance(exc, CoordinatorError) or time.monotonic() > deadline:
                    print(f"the coordinator on {self.address} does not answer as expected ({exc}); is another "
                          "program using that port?")
                    return False
                time.sleep(0.3)
        return True

    def stop(self, timeout: float = 10.0) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for proc in self.procs.values():
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def _last_error(self, name: str) -> str:
        """The last line of ``name``'s output after ": " when it is an error line (a worker's ``error: ...``)."""
        try:
            lines = (self.logs / f"launch_{name}.out").read_text(errors="replace").strip().splitlines()
        except OSError:
            return ""
        return f": {lines[-1].strip()}" if lines and "error" in lines[-1].lower() else ""

    def follow(self) -> tuple[dict | None, int]:
        """Print each finished round until the run is finished and every worker has exited.

        Returns (last status, exit status: 0 for a completed run, 1 if a process failed)."""
        client = CoordinatorClient(self.address, token=self.monitor_token, session=make_session(total_retries=0))
        printed, last, nodes_seen, said_at = 0, None, 0, 0.0
        coordinator = self.procs["coordinator"]
        while coordinator.poll() is None:
            for name, proc in self.procs.items():
                if name != "coordinator" and proc.poll() not in (None, 0):
                    print(f"{name} {_ended(proc.returncode)}{self._last_error(name)}; see "
                          f"{self.logs}/launch_{name}.out")
                    return last, 1
            try:
                last = client.status()
            except (CoordinatorUnreachable, CoordinatorError):
                time.sleep(0.5)
                continue
            counts = node_counts(last)
            online = counts["total"] - counts["offline"] - counts["banned"]
            if online != nodes_seen and not last["history"] and (
                    online == self.num_workers or time.monotonic() - said_at >= 2):  # a line a change, 2 s apart
                nodes_seen, said_at = online, time.monotonic()
                print(f"{online}/{self.num_workers} {self.noun} registered")
            # a round is printed once evaluated: by the nodes (state "evaluating") and by the coordinator
            settled = len(last["history"]) - (last["state"] == "evaluating")
            while settled and last["history"][settled - 1].get("evaluation_pending"):
                settled -= 1
            for r in last["history"][printed:settled]:
                print(round_line(r, last["total_rounds"]))
            printed = max(printed, settled)
            workers = [p for name, p in self.procs.items() if name != "coordinator"]
            if last["state"] == "finished" and all(p.poll() == 0 for p in workers):
                return last, 0
            time.sleep(0.5)
        print(f"the coordinator exited with status {coordinator.returncode}; see {self.logs}/launch_coordinator.out")
        return last, 1


def plural(n: int, noun: str, nouns: str | None = None) -> str:
    """A count and its noun: "1 round", "5 rounds" (``nouns``: the plural when it is not noun + "s")."""
    return f"{n} {noun if n == 1 else nouns or noun + 's'}"


def _ended(returncode: int) -> str:
    """How a child ended: "exited with status 2", or "was killed by SIGKILL" for a negative status."""
    if returncode < 0:
        try:
            return f"was killed by {signal.Signals(-returncode).name}"
        except ValueError:
            pass
    return f"exited with status {returncode}"


def round_line(r: dict, total_rounds: int) -> str:
    """One finished round as launch prints it: test metrics (and the federated evaluation's), counts, seconds."""
    acc = "n/a" if r["test_accuracy"] is None else f"{r['test_accuracy']:.4f}"
    loss = "n/a" if r["test_loss"] is None else f"{r['test_loss']:.4f}"
    federated = "".join(f", federated {k} {v:.4f}" for k, v in (r.get("federated_metrics") or {}).items())
    return (f"round {r['round']}/{total_rounds}: test accuracy {acc}, test loss {loss}{federated}, "
            f"{r['num_updates']} updates, {r['num_samples']} samples, {r['duration_s']:.1f}s")


def print_summary(cfg: Config, last: dict, wall: float) -> None:
    """The summary of a completed run from its last status."""
    history, privacy = last["history"], last.get("privacy") or {}
    final = history[-1]
    acc = "n/a" if final["test_accuracy"] is None else f"{final['test_accuracy']:.4f}"
    print("\nsummary")
    print(f"  rounds:              {len(history)}" + (f" (the privacy budget's {privacy['rounds_allowed']} of "
                                                     f"{cfg.communication_rounds})" if len(history) <
                                                     cfg.communication_rounds else ""))
    strategy = dict(last["strategy"])
    print(f"  strategy:            {strategy.pop('strategy')} ("
          + ", ".join(f"{k} {v}" for k, v in sorted(strategy.items())) + ")")
    print(f"  final test accuracy: {acc}")
    for name, value in (final.get("federated_metrics") or {}).items():
        print(f"  final federated {name}: {value:.4f} ({final['federated_num_nodes']} workers' held-out data)")
    if final.get("epsilon") is not None:
        print(f"  privacy spent:       epsilon {final['epsilon']:.3f} at delta {cfg.dp_delta:g} "
              "(DP-FedAvg, of one client)")
    print("  accuracy per round:  " + ", ".join(
        "n/a" if r["test_accuracy"] is None else f"{r['test_accuracy']:.4f}" for r in history))
    print(f"  wall time:           {wall:.1f}s")
    print(f"  global model:        {Path(cfg.models_dir) / 'global_model.pt'}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        allow_abbrev=False, description="Run a coordinator and N workers on this machine.")
    parser.add_argument("--workers", type=int, default=3, help="number of worker processes (default: 3)")
    add_run_arguments(parser, LAUNCH_FIELDS, "workers")
    return parser


def add_run_arguments(parser: argparse.ArgumentParser, fields, who: str) -> None:
    """The flags of ``fields`` and those launch.py and simulate.py share: --port, --keep-serving, --gpu/--cpu."""
    config_module.add_arguments(parser, fields)
    parser.add_argument("--port", type=int, default=0, help="coordinator port (default: a free one)")
    parser.add_argument("--keep-serving", action="store_true",
                        help="after the run, keep the coordinator serving it to monitors until Ctrl-C")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--gpu", dest="device", action="store_const", const="gpu", help=f"{who} train on CUDA")
    group.add_argument("--cpu", dest="device", action="store_const", const="cpu", help=f"{who} train on the CPU")


def main(argv=None) -> int:
    parser = build_parser()
    cfg, args = config_module.parse_config(parser, LAUNCH_FIELDS, argv)
    if not 1 <= args.workers <= 64:
        parser.error("--workers must be in 1..64")
    cfg = dataclasses.replace(cfg, node_timeout=30.0, heartbeat_interval=2.0)
    given = config_module.given_fields(args, LAUNCH_FIELDS)
    cfg = dataclasses.replace(cfg, **{k: v for k, v in DEMO_DIRS.items() if k not in given})
    if cfg.cpu_threads == 0 and cfg.device != "gpu":
        # N processes sharing this machine's cores: one torch pool each of cores/N avoids oversubscription
        cfg = dataclasses.replace(cfg, cpu_threads=max(1, (os.cpu_count() or 1) // args.workers))
    launch = Launch(cfg, args.workers, args.port or free_port())
    launch.keep_serving = args.keep_serving
    print(f"starting a coordinator on {launch.address} and {args.workers} workers ({cfg.device}, "
          f"{cfg.task or cfg.dataset}, {cfg.strategy}, {plural(cfg.communication_rounds, 'round')}); logs in "
          f"{launch.logs}/launch_*.out")
    return run(launch)


def run(launch: Launch) -> int:
    """Print how to watch, start ``launch``, follow it to its end, stop its processes and print the summary;
    returns the exit status (see the module's text). SIGTERM and SIGHUP stop it as Ctrl-C does."""
    cfg = launch.cfg
    print(f"watch it live: open http://{launch.address}/#token={launch.monitor_token} in a browser, or run\n"
          f"  {program_command('text_monitor.py')} --coordinator-address {launch.address} "
          f"--token={launch.monitor_token}\n"
          f"  {program_command('monitor.py')} --coordinator-address {launch.address} --token={launch.monitor_token}")
    started = time.monotonic()

    def on_sigterm(_signum, _frame):
        raise KeyboardInterrupt  # the same clean-up as Ctrl-C

    signal.signal(signal.SIGTERM, on_sigterm)
    if hasattr(signal, "SIGHUP"):
        signal.signal(signal.SIGHUP, on_sigterm)  # the terminal closed: stop the children too
    completed = False
    try:
        if not launch.start():
            return 1
        last, status = launch.follow()
        wall = time.monotonic() - started
        history = (last or {}).get("history", [])
        privacy = (last or {}).get("privacy") or {}
        if status != 0 or not history or len(history) < privacy.get("rounds_allowed", cfg.communication_rounds):
            print(f"run failed after {wall:.1f}s; see {launch.logs}/launch_coordinator.out")
            return 1
        print_summary(cfg, last, wall)
        completed = True
        if launch.keep_serving:
            launch.serve_finished_run()
        return 0
    except KeyboardInterrupt:
        if completed:
            return 0
        print("\ninterrupted; stopping every process")
        return 130
    finally:  # whatever ends the launch stops what it started
        launch.stop()


if __name__ == "__main__":
    sys.exit(main())
