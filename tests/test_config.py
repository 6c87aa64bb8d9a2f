"""Configuration: documented defaults, env < flag precedence, and clean exit 2 on bad values."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import config as config_module
import coordinator
import worker
from config import COORDINATOR_FIELDS, WORKER_FIELDS, Config, ConfigError

ROOT = Path(__file__).resolve().parent.parent


def _parse(names, argv, env, parser=None):
    parser = parser or (coordinator.build_parser() if names is COORDINATOR_FIELDS else worker.build_parser())
    cfg, _ = config_module.parse_config(parser, names, argv, env)
    return cfg


def test_defaults_as_documented():
    cfg = Config()
    assert (cfg.data_dir, cfg.models_dir, cfg.logs_dir, cfg.temp_dir) == ("data", "models", "logs", "temp")
    assert (cfg.host, cfg.port, cfg.server_threads) == ("0.0.0.0", 5000, 64)
    assert (cfg.task, cfg.model, cfg.dataset) == (None, None, "mnist")  # the built-in task of --dataset, its model
    assert (cfg.batch_size, cfg.test_batch_size, cfg.local_epochs) == (32, 128, 1)
    assert (cfg.learning_rate, cfg.momentum) == (0.01, 0.9)
    assert (cfg.communication_rounds, cfg.min_nodes_to_start) == (5, 2)
    assert (cfg.node_timeout, cfg.heartbeat_interval, cfg.round_timeout) == (60.0, 10.0, 600.0)
    assert cfg.max_update_bytes == 64 * 1024 * 1024
    assert cfg.token is None and cfg.no_auth is False and cfg.no_eval is False and cfg.save_model is True
    assert (cfg.device, cfg.coordinator_address, cfg.partition, cfg.alpha) == ("auto", "127.0.0.1:5000", "iid", 0.5)
    assert cfg.partition_id is None and cfg.num_partitions is None and cfg.name is None
    assert (cfg.seed, cfg.cpu_threads, cfg.give_up_after) == (0, 0, 600.0)


def test_parse_without_flags_or_env_gives_defaults():
    assert _parse(COORDINATOR_FIELDS, [], {}) == Config()
    assert _parse(WORKER_FIELDS, [], {}) == Config()


def test_env_overrides_default():
    cfg = _parse(COORDINATOR_FIELDS, [], {"FL_BATCH_SIZE": "64", "FL_LEARNING_RATE": "0.5", "FL_NO_AUTH": "yes",
                                          "FL_TOKEN": "a-long-token-0123456"})
    assert cfg.batch_size == 64 and isinstance(cfg.batch_size, int)
    assert cfg.learning_rate == 0.5 and cfg.no_auth is True and cfg.token == "a-long-token-0123456"
    assert cfg.communication_rounds == 5  # untouched fields keep their defaults


def test_flag_overrides_env():
    cfg = _parse(COORDINATOR_FIELDS, ["--batch-size", "16", "--rounds", "3", "--no-eval"],
                 {"FL_BATCH_SIZE": "64", "FL_COMMUNICATION_ROUNDS": "9", "FL_NO_EVAL": "false"})
    assert cfg.batch_size == 16 and cfg.communication_rounds == 3 and cfg.no_eval is True


def test_on_by_default_bool_is_turned_off_by_its_no_flag():
    assert _parse(COORDINATOR_FIELDS, [], {}).save_model is True
    assert _parse(COORDINATOR_FIELDS, ["--no-save-model"], {}).save_model is False
    assert _parse(COORDINATOR_FIELDS, [], {"FL_SAVE_MODEL": "false"}).save_model is False
    assert _parse(COORDINATOR_FIELDS, ["--no-save-model"], {"FL_SAVE_MODEL": "true"}).save_model is False


@pytest.mark.parametrize("raw", ["maybe", "2", ""])
def test_bad_bool_env_is_refused(raw):
    with pytest.raises(SystemExit) as exc:
        _parse(COORDINATOR_FIELDS, [], {"FL_NO_AUTH": raw})
    assert exc.value.code == 2


def test_worker_flags_and_aliases():
    cfg = _parse(WORKER_FIELDS, ["--cpu", "--partition-id", "1", "--num-partitions", "3", "--partition",
                                 "dirichlet", "--alpha", "0.1"], {"FL_DEVICE": "gpu"})
    assert (cfg.device, cfg.partition_id, cfg.num_partitions, cfg.partition, cfg.alpha) == \
        ("cpu", 1, 3, "dirichlet", 0.1)
    assert _parse(WORKER_FIELDS, ["--gpu"], {}).device == "gpu"
    assert _parse(WORKER_FIELDS, [], {"FL_DEVICE": "cpu"}).device == "cpu"


def test_env_of_other_program_is_ignored():
    # FL_PORT is a coordinator field; a worker does not read it (and Config validation is not bypassed)
    assert _parse(WORKER_FIELDS, [], {"FL_PORT": "-1"}).port == 5000


def test_help_states_default_and_env_variable():
    text = " ".join(coordinator.build_parser().format_help().split())
    assert "(default: 32; env FL_BATCH_SIZE)" in text
    assert "(default: 5000; env FL_PORT)" in text
    assert "(default: ********; env FL_TOKEN)" in text  # the secret's default is not shown


@pytest.mark.parametrize("changes, match", [
    ({"port": -1}, "port"),
    ({"port": 70000}, "port"),
    ({"batch_size": 0}, "batch_size"),
    ({"batch_size": True}, "expected int"),
    ({"learning_rate": float("nan")}, "finite"),
    ({"dataset": "cifar"}, "must be one of mnist, fashion-mnist"),
    ({"token": "short"}, "at least 16"),
    ({"monitor_token": "x" * 15}, "at least 16"),
    ({"certfile": "c.pem"}, "--certfile and --keyfile must be given together"),
    ({"aggregation": "mean"}, "must be one of fedavg, median, trimmed_mean"),
    ({"host": "  "}, "must not be empty"),
    ({"max_update_bytes": 1023}, ">= 1024"),
    ({"partition_id": 0}, "given together"),
    ({"partition_id": 3, "num_partitions": 3}, "must be < --num-partitions"),
])
def test_config_validation(changes, match):
    with pytest.raises(ConfigError, match=match):
        Config(**changes)
    with pytest.raises(ConfigError, match=match):
        Config().replace(**changes)


def test_int_given_to_float_field_normalised():
    cfg = Config(round_timeout=3)
    assert cfg.round_timeout == 3.0 and isinstance(cfg.round_timeout, float)


def test_public_dict_leaves_secret_out():
    public = Config(token="secret-token-1234", monitor_token="monitor-token-1234",
                    admin_token="admin-token-12345").public_dict()
    assert not {"token", "monitor_token", "admin_token"} & set(public) and public["batch_size"] == 32
    assert "token-12" not in repr(public)


# ----------------------------------------------------------------------------- programs exit 2, no traceback

# Each case runs `python <script> <args>` in its own empty directory. The processes are started all at once
# (module fixture) because each spends most of its ~2 s importing torch.
CLI_CASES = {
    "coordinator-negative-port": ("coordinator.py", ["--port", "-5"], {}, "--port"),
    "coordinator-int-abc": ("coordinator.py", ["--batch-size", "abc"], {}, "expected int, got 'abc'"),
    "coordinator-unknown-dataset": ("coordinator.py", ["--dataset", "cifar10"], {},
                                    "must be one of mnist, fashion-mnist"),
    "coordinator-bad-env": ("coordinator.py", [], {"FL_BATCH_SIZE": "abc"}, "FL_BATCH_SIZE"),
    "coordinator-unknown-model": ("coordinator.py", ["--model", "resnet9000", "--no-eval"], {},
                                  "unknown model 'resnet9000'"),
    "worker-partition-id-alone": ("worker.py", ["--partition-id", "0"], {},
                                  "--partition-id and --num-partitions must be given together"),
    "worker-bad-address": ("worker.py", ["--coordinator-address", "no-port-here"], {}, "HOST:PORT"),
    "worker-token-starting-with-a-dash": ("worker.py", ["--token", "-RQK6abcdefghijklmnopqrs"], {},
                                          "--token: this value starts with '-', so write it as --token=VALUE"),
    "worker-ipv6-without-brackets": ("worker.py", ["--coordinator-address", "::1:5000"], {},
                                     "an IPv6 address needs brackets: http://[::1]:5000"),
    "monitor-ipv6-without-brackets": ("text_monitor.py", ["--coordinator-address", "http://::1:5000", "--once"], {},
                                      "an IPv6 address needs brackets: http://[::1]:5000"),
    "worker-gpu-without-cuda": ("worker.py", ["--gpu", "--coordinator-address", "127.0.0.1:9",
                                              "--data-dir", "{tmp}/data", "--logs-dir", "{tmp}/logs"],
                                {"CUDA_VISIBLE_DEVICES": ""}, "CUDA is not available"),  # a GPU machine too
}


@pytest.fixture(scope="module")
def cli_results(tmp_path_factory):
    """{case: (CompletedProcess-like (returncode, stdout, stderr), its working directory)}."""
    base_env = {k: v for k, v in os.environ.items() if not k.startswith("FL_")}
    running = {}
    for case, (script, args, env_extra, _) in CLI_CASES.items():
        cwd = tmp_path_factory.mktemp(case)
        args = [a.replace("{tmp}", str(cwd)) for a in args]
        running[case] = (subprocess.Popen([sys.executable, str(ROOT / script), *args], cwd=cwd,
                                          env={**base_env, **env_extra}, stdout=subprocess.PIPE,
                                          stderr=subprocess.PIPE, text=True), cwd)
    results = {}
    for case, (proc, cwd) in running.items():
        try:
            out, err = proc.communicate(timeout=90)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
        results[case] = (proc.returncode, out, err, cwd)
    return results


@pytest.mark.parametrize("case", [c for c in CLI_CASES if c != "worker-gpu-without-cuda"])
def test_bad_values_exit_2_without_traceback(cli_results, case):
    returncode, out, err, cwd = cli_results[case]
    assert returncode == 2, err
    assert "error:" in err and CLI_CASES[case][3] in err, err
    assert "Traceback" not in err and "Traceback" not in out
    if case != "coordinator-unknown-model":  # the model name is checked after the directories are made
        assert not (cwd / "models").exists() and not (cwd / "temp").exists()  # nothing was started


def test_worker_gpu_without_cuda_exits_2_with_clear_message(cli_results):
    """Run with CUDA_VISIBLE_DEVICES="" (no device visible), so a machine with a GPU checks the message too."""
    returncode, out, err, cwd = cli_results["worker-gpu-without-cuda"]
    assert returncode == 2, err
    assert "error:" in err and "--gpu was given but CUDA is not available" in err
    assert "--cpu" in err  # says what to do instead
    assert "Traceback" not in err and "Traceback" not in out
    data_dir = cwd / "data"
    assert not data_dir.exists() or not any(data_dir.iterdir())  # it stopped before loading any data


def test_a_coordinator_that_cannot_listen_leaves_no_run_behind(tmp_path):
    """The port is bound before any state is made: a start that fails on "address in use" stores nothing."""
    import socket

    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        result = subprocess.run([sys.executable, str(ROOT / "coordinator.py"), "--host", "127.0.0.1", "--port",
                                 str(port), "--no-eval"], cwd=tmp_path, capture_output=True, text=True, timeout=90)
    assert result.returncode == 2 and f"cannot listen on 127.0.0.1:{port}" in result.stderr, result.stderr
    assert "the address is in use" in result.stderr and "--temp-dir" in result.stderr
    assert not (tmp_path / "temp" / "coordinator.sqlite3").exists()
    assert not (tmp_path / "temp" / "join_token").exists()


def test_help_lists_choices_and_says_each_default_once():
    text = " ".join(coordinator.build_parser().format_help().split())
    assert "(one of: mnist, fashion-mnist; default: mnist; env FL_DATASET)" in text
    assert "(default: the system's trust store) (env FL_CA_CERT)" in " ".join(worker.build_parser().format_help()
                                                                              .split())
    assert "default: None" not in text


def test_make_cert_never_replaces_a_key_pair_unless_told(tmp_path, capsys):
    import make_cert

    out = tmp_path / "certs"
    assert make_cert.main(["--out-dir", str(out), "--host", "127.0.0.1"]) == 0
    first = (out / "coordinator.key").read_bytes()
    assert make_cert.main(["--out-dir", str(out)]) == 2
    assert "exists" in capsys.readouterr().err and (out / "coordinator.key").read_bytes() == first
    assert make_cert.main(["--out-dir", str(out), "--force"]) == 0
    assert (out / "coordinator.key").read_bytes() != first
