"""Small helpers shared by the programs: devices, torch CPU threads, logging and program start-up."""

from __future__ import annotations

import logging
import os
import shlex
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported where it is used: launch.py and the monitors start without it (~1.3 s)
    import torch

log = logging.getLogger("fl.utils")


class DeviceUnavailable(RuntimeError):
    """The requested device (``--gpu``) is not usable on this machine."""



# ----------------------------------------------------------------------------- devices


def select_device(prefer: str | None) -> torch.device:
    """The torch device for ``prefer``: "gpu" (CUDA, required), "cpu", or None (CUDA when available).

    Raises
    ------
    DeviceUnavailable
        For "gpu" when CUDA is not available; the message says what torch reports.
    """
    import torch

    if prefer == "cpu":
        return torch.device("cpu")
    if prefer == "gpu":
        if not torch.cuda.is_available():
            raise DeviceUnavailable(
                f"--gpu was given but CUDA is not available (torch {torch.__version__}, built for CUDA "
                f"{torch.version.cuda or 'none'}; {torch.cuda.device_count()} devices visible). "
                "Use --cpu, or install a CUDA build of torch and check the driver with nvidia-smi.")
        return torch.device("cuda")
    if prefer is not None:
        raise ValueError(f"prefer must be 'gpu', 'cpu' or None, got {prefer!r}")
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def device_description(device: torch.device) -> str:
    """A short human-readable name of ``device`` (GPU model for CUDA)."""
    if device.type == "cuda":
        import torch

        return f"cuda ({torch.cuda.get_device_name(device)})"
    return "cpu"


def start_node(cfg, log_file: str | os.PathLike):
    """The start of a training node (a worker, a simulation's client host): log to stdout and ``log_file``, select
    the device of ``cfg.device`` and set ``cfg.cpu_threads``. Returns the torch device, or None after printing
    ``error: ...`` (the log file cannot be written, the device is not available): the caller exits with status 2."""
    try:
        setup_logging(log_file)
    except OSError as exc:
        print(f"error: cannot write the log in {Path(log_file).parent}: {exc}", file=sys.stderr)
        return None
    try:
        device = select_device(None if cfg.device == "auto" else cfg.device)
    except DeviceUnavailable as exc:
        print(f"error: {exc}", file=sys.stderr)
        return None
    set_cpu_threads(cfg.cpu_threads)
    return device


def set_cpu_threads(num_threads: int) -> None:
    """Set torch's intra-op CPU threads; 0 keeps torch's default (one per core)."""
    if num_threads > 0:
        import torch

        torch.set_num_threads(num_threads)


# ----------------------------------------------------------------------------- programs


def url_host(host: str) -> str:
    """``host`` as it is written in a URL: an IPv6 address in brackets (``[::1]``), anything else as it is."""
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def program_command(script: str) -> str:
    """``python_command()`` and the path of this project's program ``script`` (relative to the current directory
    when it is below it, as ``worker.py`` in the checkout): a command that works as printed, in a new shell."""
    path = Path(__file__).absolute().parent / script
    try:
        shown = str(path.relative_to(Path.cwd()))
    except ValueError:
        shown = str(path)
    return f"{python_command()} {shlex.quote(shown)}"


def python_command() -> str:
    """How to run this Python in a new shell from the current directory: ``.venv/bin/python`` when it is a
    virtual environment below here (activating it is not needed then), else the interpreter's full path."""
    executable = Path(sys.executable)
    try:
        relative = executable.relative_to(Path.cwd())
    except ValueError:
        return shlex.quote(str(executable))
    return shlex.quote(str(relative))


def run_program(body, argv=None) -> int:
    """Run a long-running program's ``body(argv)`` and return its exit status.

    Until the body installs its own handlers, SIGTERM acts like Ctrl-C, and an interrupt during start-up
    (imports, data loading) ends the program quietly with status 0 instead of a traceback.
    """
    import signal

    def _raise(_signum, _frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _raise)
    if hasattr(signal, "SIGHUP"):
        signal.signal(signal.SIGHUP, _raise)
    try:
        return body(argv)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 0


def setup_logging(log_file: str | os.PathLike | None, level: int = logging.INFO) -> None:
    """Configure the root logger once for an entry point: stdout, plus ``log_file`` when given."""
    # milliseconds: a round's steps (an upload, the close, the next task) take tens of them
    fmt = logging.Formatter("%(asctime)s.%(msecs)03d %(levelname)s %(name)s: %(message)s", "%Y-%m-%d %H:%M:%S")
    root = logging.getLogger()
    root.setLevel(level)
    for handler in list(root.handlers):
        root.removeHandler(handler)
    stream = logging.StreamHandler(sys.stdout)
    stream.setFormatter(fmt)
    root.addHandler(stream)
    logging.getLogger("urllib3").setLevel(logging.ERROR)  # its retry warnings repeat what our loggers say
    if log_file is not None:
        Path(log_file).parent.mkdir(parents=True, exist_ok=True)
        file_handler = logging.FileHandler(log_file, encoding="utf-8")
        file_handler.setFormatter(fmt)
        root.addHandler(file_handler)
