"""One typed configuration for the coordinator, the workers and the launcher.

Every field has a default here, can be overridden by an environment variable ``FL_<FIELD NAME IN UPPER CASE>``
(for example ``FL_BATCH_SIZE=32``), and by a command-line flag ``--<field-name-with-dashes>`` (for example
``--batch-size 32``). Precedence, lowest to highest: default, environment, command line.

Each program exposes only the flags that concern it (see ``COORDINATOR_FIELDS`` and ``WORKER_FIELDS``); the
environment variables are read for the same fields. Bad values end the program with ``error: ...`` and exit
status 2, never a traceback (:class:`ConfigError` is turned into an argparse error). The checks every Config
passes (types, ranges, the rules between fields) are in :mod:`fedrest.config_rules`.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from dataclasses import dataclass, field, fields
from typing import Mapping, Sequence

from fedrest.config_rules import (ENV_PREFIX, ConfigError, env_name, field_type, flag_name,  # noqa: F401 - re-exported
                                  validate)

DATASETS = ("mnist", "fashion-mnist")
AGGREGATIONS = ("fedavg", "median", "trimmed_mean")
# fedrest.aggregation.STRATEGIES
STRATEGIES = ("fedavg", "fedavgm", "fedadagrad", "fedadam", "fedyogi", "fedprox", "scaffold")
PARTITIONS = ("iid", "dirichlet")


def _meta(help_text: str, *, lo: float | None = None, hi: float | None = None, choices=None, secret=False) -> dict:
    return {"help": help_text, "lo": lo, "hi": hi, "choices": choices, "secret": secret}


@dataclass(frozen=True)
class Config:
    """Settings of a federation run.

    Units are in the field help: seconds, bytes, counts. ``None`` means "not
    set" for the optional fields (token, partition).
    """

    # --- directories (created on start) ---
    data_dir: str = field(default="data", metadata=_meta("directory of the IDX dataset files"))
    models_dir: str = field(default="models", metadata=_meta("directory of saved global models"))
    logs_dir: str = field(default="logs", metadata=_meta("directory of log files"))
    temp_dir: str = field(default="temp", metadata=_meta(
        "directory of run state (coordinator: join token, received updates; worker: its scaffold control variate)"))
    # --- network ---
    host: str = field(default="0.0.0.0", metadata=_meta("address the coordinator listens on"))
    port: int = field(default=5000, metadata=_meta("TCP port of the coordinator", lo=0, hi=65535))
    certfile: str | None = field(default=None, metadata=_meta(
        "PEM certificate (chain) of the coordinator: serve HTTPS (with --keyfile; see make_cert.py)"))
    keyfile: str | None = field(default=None, metadata=_meta("PEM private key of --certfile"))
    ca_cert: str | None = field(default=None, metadata=_meta(
        "PEM certificate(s) to trust for an https:// coordinator (default: the system's trust store)"))
    client_timeout: float = field(default=30.0, metadata=_meta(
        "seconds a connection may stay silent while sending a request before it is cut", lo=1, hi=3600))
    server_threads: int = field(default=64, metadata=_meta(
        "request threads of the coordinator (they run the views; a waiting worker holds none)", lo=4, hi=1024))
    max_uploads: int = field(default=16, metadata=_meta(
        "update uploads received at once (each holds a request thread, and its decoded update while it is "
        "checked; at most half of --server-threads); more are answered 503 busy and sent again by their workers",
        lo=1, hi=512))
    # --- training (sent to workers with each round) ---
    task: str | None = field(default=None, metadata=_meta(
        "what to train: mnist, fashion-mnist, image-folder, a task file (my_task.py) or module (package.module); "
        "the same on the coordinator and every worker (default: --dataset)"))
    model: str | None = field(default=None, metadata=_meta(
        "model architecture (default: the task's; simple_cnn, or for image-folder resnet18 or any torchvision "
        "classification model)"))
    dataset: str = field(default="mnist", metadata=_meta("built-in task when --task is not given", choices=DATASETS))
    image_size: int = field(default=224, metadata=_meta("image-folder: images resized to this many pixels squared",
                                                        lo=8, hi=4096))
    image_channels: int = field(default=3, metadata=_meta("image-folder: 3 (RGB) or 1 (grayscale)", lo=1, hi=3))
    normalize_mean: str = field(default="0.5", metadata=_meta(
        "image-folder: mean subtracted from pixels in [0, 1] (one value, or one per channel, comma-separated)"))
    normalize_std: str = field(default="0.5", metadata=_meta(
        "image-folder: standard deviation pixels are divided by (one value, or one per channel)"))
    classes: str | None = field(default=None, metadata=_meta(
        "image-folder: comma-separated class names, for a coordinator without a test folder (--no-eval)"))
    eval_fraction: float = field(default=0.0, metadata=_meta(
        "fraction of a worker's data held out to evaluate global models on (0: none)", lo=0.0, hi=0.9))
    data_workers: int | None = field(default=None, metadata=_meta(
        "DataLoader processes for Datasets such as image folders (default: cores - 1, at most 4)", lo=0, hi=256))
    cache_bytes: int = field(default=2 * 1024**3, metadata=_meta(
        "most bytes of decoded examples kept in memory after the first pass (0: never)", lo=0, hi=2**44))
    batch_size: int = field(default=32, metadata=_meta("local mini-batch size B", lo=1, hi=65536))
    test_batch_size: int = field(default=128, metadata=_meta(
        "batch size of evaluation (on a CPU, batches of about 128 are 3x faster than 1000: they stay in cache)",
        lo=1, hi=65536))
    learning_rate: float = field(default=0.01, metadata=_meta("SGD learning rate", lo=1e-12, hi=10.0))
    momentum: float = field(default=0.9, metadata=_meta("SGD momentum, reset every round", lo=0.0, hi=0.999))
    local_epochs: int = field(default=1, metadata=_meta("local epochs E per round", lo=1, hi=1000))
    # --- rounds ---
    communication_rounds: int = field(default=5, metadata=_meta("number of rounds", lo=1, hi=1_000_000))
    min_nodes_to_start: int = field(default=2, metadata=_meta(
        "online nodes needed to open a round, and the fewest sampled into one", lo=1, hi=100_000))
    min_sample: int = field(default=0, metadata=_meta(
        "the fewest nodes sampled into a round, when not MIN_NODES_TO_START (0): a simulation waits for all N "
        "clients with MIN_NODES_TO_START=N and samples max(MIN_SAMPLE, C*N) of them", lo=0, hi=100_000))
    node_timeout: float = field(default=60.0, metadata=_meta(
        "seconds without any request before a node counts as offline", lo=0.1, hi=86400))
    heartbeat_interval: float = field(default=10.0, metadata=_meta(
        "seconds between worker heartbeats", lo=0.05, hi=3600))
    round_timeout: float = field(default=600.0, metadata=_meta(
        "seconds a round waits for updates before aggregating what arrived", lo=0.1, hi=7 * 86400))
    client_fraction: float = field(default=1.0, metadata=_meta(
        "fraction C of online nodes sampled for each round (at least MIN_NODES_TO_START)", lo=1e-6, hi=1.0))
    min_updates: int = field(default=1, metadata=_meta(
        "updates a round needs to be aggregated; with fewer at its deadline it starts again", lo=1, hi=100_000))
    seed: int = field(default=0, metadata=_meta("seed of data partitioning and shuffling", lo=0, hi=2**32 - 1))
    # --- resources and limits ---
    cpu_threads: int = field(default=0, metadata=_meta(
        "torch CPU threads for training and evaluation (0: torch's default, one per core)", lo=0, hi=4096))
    save_model: bool = field(default=True, metadata=_meta("save the global model after every round"))
    max_update_bytes: int = field(default=64 * 1024 * 1024, metadata=_meta(
        "largest accepted update upload, bytes", lo=1024, hi=2**40))
    max_nodes: int = field(default=1000, metadata=_meta(
        "most registered nodes; further registrations get 403", lo=1, hi=1_000_000))
    rate_limit: float = field(default=20.0, metadata=_meta(
        "requests per second allowed per credential (node, monitor) on average, bursts of 5x (0: no limit)",
        lo=0, hi=1e6))
    address_rate_limit: float = field(default=200.0, metadata=_meta(
        "requests per second allowed per client IP address, bursts of 5x (0: no limit)", lo=0, hi=1e6))
    # --- experiment tracking (fedrest/server/tracking.py) ---
    tensorboard_dir: str | None = field(default=None, metadata=_meta(
        "log each round's metrics as TensorBoard scalars into this folder (needs the tensorboard package)"))
    mlflow_uri: str | None = field(default=None, metadata=_meta(
        "log each round's metrics to MLflow: a tracking server (http://HOST:5000), a database (sqlite:///mlflow.db) "
        "or a folder (MLflow's file store); needs mlflow-skinny or mlflow"))
    mlflow_experiment: str = field(default="fedrest", metadata=_meta("the MLflow experiment of --mlflow-uri's runs"))
    # --- strategy (README "Strategies"; FedAvg, McMahan et al. 2017, by default) ---
    strategy: str = field(default="fedavg", metadata=_meta(
        "what workers do and how the global model moves: fedavg, fedavgm (server momentum), fedadagrad, fedadam, "
        "fedyogi (adaptive server optimizers), fedprox (proximal term), scaffold (control variates)",
        choices=STRATEGIES))
    server_learning_rate: float | None = field(default=None, metadata=_meta(
        "server optimizers: learning rate eta of the step along the round's change (default: fedavgm 1.0, "
        "fedadagrad 0.1, fedadam and fedyogi 0.01)", lo=1e-9, hi=100.0))
    server_momentum: float = field(default=0.9, metadata=_meta("fedavgm: server momentum beta", lo=0.0, hi=0.999))
    beta1: float = field(default=0.9, metadata=_meta(
        "fedadagrad, fedadam, fedyogi: decay of the first moment", lo=0.0, hi=0.999))
    beta2: float = field(default=0.99, metadata=_meta("fedadam, fedyogi: decay of the second moment", lo=0.0,
                                                      hi=0.99999))
    tau: float = field(default=1e-3, metadata=_meta(
        "fedadagrad, fedadam, fedyogi: adaptivity tau added to the root of the second moment", lo=1e-12, hi=10.0))
    proximal_mu: float = field(default=0.01, metadata=_meta(
        "fedprox: coefficient mu of the proximal term mu/2 * ||w - w_global||^2 of local training", lo=0.0,
        hi=1e4))
    max_share: float = field(default=0.5, metadata=_meta(
        "largest share of a round's FedAvg weight one node may take (1: no bound; a node's samples are also "
        "bounded by the number it registered with)", lo=0.01, hi=1.0))
    # --- central differential privacy (DP-FedAvg, McMahan et al. 2018; README "Differential privacy") ---
    dp_noise_multiplier: float = field(default=0.0, metadata=_meta(
        "DP-FedAvg: noise multiplier z, Gaussian noise of std z * CLIP_NORM on the sum of the clipped changes "
        "(0: off; on: clients sampled with probability CLIENT_FRACTION)", lo=0.0, hi=1000.0))
    dp_delta: float = field(default=1e-5, metadata=_meta(
        "DP-FedAvg: the delta at which the epsilon spent is reported", lo=1e-15, hi=0.1))
    dp_epsilon_budget: float = field(default=0.0, metadata=_meta(
        "DP-FedAvg: the run stops before a round would spend more than this epsilon (0: no budget)",
        lo=0.0, hi=1e6))
    # --- robust aggregation ---
    aggregation: str = field(default="fedavg", metadata=_meta(
        "how a round's updates are combined: fedavg (sample-weighted mean), median (coordinate-wise) or "
        "trimmed_mean", choices=AGGREGATIONS))
    trim_fraction: float = field(default=0.1, metadata=_meta(
        "trimmed_mean: fraction of updates dropped at each end of every coordinate", lo=0.0, hi=0.49))
    clip_norm: float = field(default=0.0, metadata=_meta(
        "clip each update's change from the global model to this L2 norm before aggregating (0: off)",
        lo=0.0, hi=1e12))
    max_update_norm: float = field(default=1e4, metadata=_meta(
        "refuse an update whose change from the global model has an L2 norm above this (0: no check)",
        lo=0.0, hi=1e15))
    # --- security ---
    token: str | None = field(default=None, metadata=_meta(
        "join token; the coordinator generates one and keeps it in TEMP_DIR/join_token when none is given, "
        "workers pass the coordinator's (it is never logged)", secret=True))
    monitor_token: str | None = field(default=None, metadata=_meta(
        "read-only token of monitors and the dashboard (status, metrics); generated into "
        "TEMP_DIR/monitor_token when none is given", secret=True))
    admin_token: str | None = field(default=None, metadata=_meta(
        "operator token of admin.py (rotate tokens, ban nodes); generated into TEMP_DIR/admin_token when "
        "none is given", secret=True))
    no_auth: bool = field(default=False, metadata=_meta("accept registrations and monitors without a token"))
    no_eval: bool = field(default=False, metadata=_meta("do not evaluate the global model (no test data here)"))
    debug: bool = field(default=False, metadata=_meta("serve with Flask's development server"))
    fresh: str | None = field(default=None, metadata=_meta(
        "RUN_ID: set the stored run with this id aside (to TEMP_DIR/archive/) and start a new run; the coordinator "
        "prints the id when it is needed, and a later start with the same --fresh resumes the new run"))
    keep_serving: bool = field(default=False, metadata=_meta(
        "keep serving the status after the last round, until Ctrl-C (default: exit once workers are told)"))
    # --- worker ---
    device: str = field(default="auto", metadata=_meta(
        "training device: gpu (CUDA, required), cpu, or auto (CUDA when available); --gpu / --cpu set it",
        choices=("auto", "gpu", "cpu")))
    coordinator_address: str = field(default="127.0.0.1:5000", metadata=_meta(
        "HOST:PORT (or http://HOST:PORT) of the coordinator"))
    name: str | None = field(default=None, metadata=_meta(
        "node name, unique in the federation (default: host name and partition or process id)"))
    partition_id: int | None = field(default=None, metadata=_meta(
        "this worker's part of the data, 0..num_partitions-1 (default: all of it)", lo=0, hi=1_000_000))
    num_partitions: int | None = field(default=None, metadata=_meta(
        "number of parts the training data is split into", lo=1, hi=1_000_000))
    partition: str = field(default="iid", metadata=_meta("how data is split", choices=PARTITIONS))
    alpha: float = field(default=0.5, metadata=_meta(
        "Dirichlet concentration of label skew (smaller: more skewed)", lo=1e-6, hi=1e6))
    give_up_after: float = field(default=600.0, metadata=_meta(
        "seconds a worker keeps retrying an unreachable coordinator before exiting", lo=1, hi=7 * 86400))
    quiet: bool = field(default=False, metadata=_meta("no progress bar"))

    def __post_init__(self) -> None:
        validate(self)

    def replace(self, **changes) -> "Config":
        """Return a copy with ``changes`` applied (validated)."""
        return dataclasses.replace(self, **changes)

    def public_dict(self) -> dict:
        """The settings as a JSON-ready dict, secrets left out."""
        return {f.name: getattr(self, f.name) for f in fields(self) if not f.metadata.get("secret")}


# What a task is (the same on the coordinator and every worker: the fingerprint checks it at registration).
TASK_FIELDS = ("task", "model", "dataset", "image_size", "image_channels", "normalize_mean", "normalize_std")
COORDINATOR_FIELDS = (
    "data_dir", "models_dir", "logs_dir", "temp_dir", "host", "port", "certfile", "keyfile", "client_timeout",
    "server_threads", "max_uploads", *TASK_FIELDS, "classes", "data_workers", "cache_bytes",
    "batch_size", "test_batch_size", "learning_rate", "momentum", "local_epochs", "communication_rounds",
    "min_nodes_to_start", "min_sample", "client_fraction", "min_updates", "node_timeout", "heartbeat_interval",
    "round_timeout",
    "seed", "cpu_threads", "save_model", "max_update_bytes", "max_nodes", "rate_limit", "address_rate_limit",
    "strategy", "server_learning_rate", "server_momentum", "beta1", "beta2", "tau", "proximal_mu", "max_share",
    "dp_noise_multiplier", "dp_delta", "dp_epsilon_budget",
    "aggregation", "trim_fraction", "clip_norm", "max_update_norm", "token", "monitor_token", "admin_token",
    "no_auth", "no_eval", "debug", "fresh", "keep_serving", "tensorboard_dir", "mlflow_uri", "mlflow_experiment",
)
MONITOR_FIELDS = ("coordinator_address", "ca_cert", "monitor_token")
ADMIN_FIELDS = ("coordinator_address", "ca_cert", "admin_token", "temp_dir")
WORKER_FIELDS = (
    "coordinator_address", "ca_cert", "device", "token", "name", "data_dir", *TASK_FIELDS, "eval_fraction",
    "data_workers", "cache_bytes", "partition_id", "num_partitions", "partition", "alpha", "seed", "cpu_threads",
    "logs_dir", "temp_dir", "give_up_after", "quiet",
)
# Settings that define a run: on resume the stored values win over new flags (a warning names the ignored ones).
RUN_FIELDS = (
    *TASK_FIELDS, "classes", "batch_size", "test_batch_size", "learning_rate", "momentum", "local_epochs",
    "communication_rounds", "min_nodes_to_start", "min_sample", "client_fraction", "min_updates", "seed", "no_eval",
    "strategy", "server_learning_rate", "server_momentum", "beta1", "beta2", "tau", "proximal_mu", "max_share",
    "aggregation", "trim_fraction", "clip_norm", "dp_noise_multiplier", "dp_delta", "dp_epsilon_budget",
)
# Short spellings users expect from the README and the issue text.
ALIASES = {"communication_rounds": ["--rounds"], "min_nodes_to_start": ["--min-nodes"], "learning_rate": ["--lr"],
           "cpu_threads": ["--cpu-workers"]}  # --cpu-workers: the seed's name
# Flags that may be given without a value, and the value they then have ("--fresh" alone: the coordinator
# answers with the id it needs).
BARE_FLAG_VALUES = {"fresh": "?"}
# Flags whose values are random tokens (which may start with "-" when a user chose them).
SECRET_FLAGS = ("--token", "--monitor-token", "--admin-token")
# Older environment variables still read (after the field's own FL_ name).
ENV_ALIASES = {"cpu_threads": ["FL_CPU_WORKERS"]}


def parse_value(f: dataclasses.Field, raw: str, source: str):
    """Convert the text ``raw`` given for field ``f`` into its typed value.

    Raises
    ------
    ConfigError
        When ``raw`` is not a valid value of the field's type; the message names ``source``.
    """
    typ = field_type(f)
    text = raw.strip()
    if typ is bool:
        low = text.lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{source}: expected true/false, got {raw!r}")
    if text.lower() in ("", "none") and f.default is None:
        return None
    try:
        return typ(text)
    except ValueError:
        raise ConfigError(f"{source}: expected {typ.__name__}, got {raw!r}") from None


def env_names(name: str) -> list[str]:
    """The environment variables read for field ``name``, in order: ``FL_<NAME>``, then older spellings."""
    return [env_name(name)] + ENV_ALIASES.get(name, [])


def add_arguments(parser: argparse.ArgumentParser, names: Sequence[str],
                  extra_flags: Mapping[str, Sequence[str]] | None = None) -> None:
    """Add one flag per config field in ``names``; defaults are left to :func:`from_args`.

    ``extra_flags`` gives a program's own spellings of a field beside ``--field-name`` (the monitors' ``--token``
    for ``monitor_token``).
    """
    extra_flags = extra_flags or {}
    defaults = Config()
    by_name = {f.name: f for f in fields(Config)}
    for name in names:
        f = by_name[name]
        default = getattr(defaults, name)
        shown = "********" if f.metadata["secret"] else ("none" if default is None else default)
        notes = [f"one of: {', '.join(f.metadata['choices'])}"] if f.metadata["choices"] else []
        if "default" not in f.metadata["help"]:  # the help may say the default in words already
            notes.append(f"default: {shown}")
        help_text = f"{f.metadata['help']} ({'; '.join(notes + [f'env {env_name(name)}'])})"
        flags = [flag_name(name)] + ALIASES.get(name, []) + list(extra_flags.get(name, []))
        if field_type(f) is bool and default:  # on by default: the flag turns it off
            parser.add_argument("--no-" + name.replace("_", "-"), dest=name, action="store_const", const="false",
                                default=None, help=f"do not: {help_text}")
        elif field_type(f) is bool:
            parser.add_argument(*flags, dest=name, action="store_const", const="true", default=None,
                                help=help_text)
        elif name in BARE_FLAG_VALUES:
            parser.add_argument(*flags, dest=name, default=None, metavar="RUN_ID", nargs="?",
                                const=BARE_FLAG_VALUES[name], help=help_text)
        else:
            parser.add_argument(*flags, dest=name, default=None, metavar=name.upper(), help=help_text)


def from_args(args: argparse.Namespace, names: Sequence[str],
              env: Mapping[str, str] | None = None) -> Config:
    """Build a :class:`Config` from parsed flags, the environment and the defaults.

    Raises
    ------
    ConfigError
        For a malformed or out-of-range value, naming its flag or variable.
    """
    env = os.environ if env is None else env
    by_name = {f.name: f for f in fields(Config)}
    values = {}
    for name in names:
        f = by_name[name]
        raw_flag = getattr(args, name, None)
        env_key = next((k for k in env_names(name) if k in env), None)
        if raw_flag is not None:
            values[name] = parse_value(f, raw_flag, flag_name(name))
        elif env_key is not None:
            values[name] = parse_value(f, env[env_key], env_key)
    return Config(**values)


def given_fields(args: argparse.Namespace, names: Sequence[str], env: Mapping[str, str] | None = None) -> set[str]:
    """The fields of ``names`` that the command line or the environment set (not left to their defaults)."""
    env = os.environ if env is None else env
    return {name for name in names if getattr(args, name, None) is not None
            or any(k in env for k in env_names(name))}


def parse_config(parser: argparse.ArgumentParser, names: Sequence[str], argv: Sequence[str] | None = None,
                 env: Mapping[str, str] | None = None) -> tuple[Config, argparse.Namespace]:
    """Parse ``argv`` with ``parser`` (already holding the fields' flags) into a Config.

    A bad value ends the program with one line, ``<prog>: error: <message>``, and exit status 2 (argparse's own
    errors, an unknown flag for instance, come with its usage text as usual).
    """
    words = list(sys.argv[1:] if argv is None else argv)
    for flag, value in zip(words, words[1:]):
        if flag in SECRET_FLAGS and value.startswith("-") and len(value) > 2:  # argparse reads it as a flag
            parser.error(f"{flag}: this value starts with '-', so write it as {flag}=VALUE (no space)")
    args = parser.parse_args(argv)
    try:
        return from_args(args, names, env), args
    except ConfigError as exc:
        parser.exit(2, f"{parser.prog}: error: {exc}\n")
        raise  # pragma: no cover - parser.exit exits


def ensure_dirs(cfg: Config, names: Sequence[str] = ("data_dir", "models_dir", "logs_dir", "temp_dir")) -> None:
    """Create the run-time directories named in ``names`` (no error if they exist)."""
    for name in names:
        os.makedirs(getattr(cfg, name), exist_ok=True)
