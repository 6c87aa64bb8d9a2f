"""A worker node's state and main loop: register, heartbeat, long-poll for tasks, train or evaluate a round,
upload, survive outages (what each answer means: :mod:`fedrest.worker_policy`). ``worker.py`` is its program."""

from __future__ import annotations

import hashlib
import itertools
import logging
import re
import secrets
import sys
import threading
import time
from pathlib import Path

import torch

from config import Config
from fedrest.client import CoordinatorClient, CoordinatorError, CoordinatorUnreachable, make_session
from fedrest.local_control import LocalControlVariate
from fedrest.local_round import RoundClosed, evaluate_settings, round_settings, scaffold_controls, train_local
from fedrest.worker_policy import FatalError  # noqa: F401 - re-exported
from fedrest.node_identity import default_name, system_info
from fedrest.serialization import bytes_to_state_dict
from fedrest.tasks import Task, TaskError
from fedrest.tasks.data import LocalData
from fedrest.worker_policy import CALL_ERRORS, Action, Outage, Reaction, react
from utils import device_description

log = logging.getLogger("fl.worker")

LONG_POLL_SECONDS = 30.0
FIRST_CONTACT_S, FIRST_CONTACT_POLL_S = 30.0, 0.2  # how long a starting worker asks for its coordinator, how often


class StopRequested(BaseException):
    """SIGINT or SIGTERM arrived: leave the federation and exit 0 (a BaseException, like KeyboardInterrupt,
    so that no library's ``except Exception`` swallows it)."""


class Worker:
    """One worker process's state and main loop.

    Parameters
    ----------
    cfg : settings (coordinator address, token, name, ...).
    device : where training runs.
    task : what this worker trains (:mod:`fedrest.tasks`); its model is built here, once.
    data : local training data (tensors already on ``device``).
    held_out : the part of the local data held out for federated evaluation, or None.
    """

    def __init__(self, cfg: Config, device: torch.device, task: Task, data: LocalData,
                 held_out: LocalData | None = None) -> None:
        self.cfg = cfg
        self.device = device
        self.task, self.data, self.held_out = task, data, held_out
        self.model = task.build_model().to(device)
        torch.optim.SGD(self.model.parameters(), lr=0.0)  # its first use imports torch._dynamo (~1 s): not in round 1
        self.fingerprint = task.fingerprint(self.model)
        self.name = cfg.name or default_name(cfg.partition_id)
        # few quick retries per call; longer outages are waited out (and logged) with self.outage
        self.client = CoordinatorClient(cfg.coordinator_address, session=self._session(3))
        self.instance_id = secrets.token_hex(8)  # this process; see Federation.register
        self.node_id: str | None = None
        self.run_id: str | None = None  # the coordinator's run this worker is in
        self.heartbeat_interval = 10.0
        self.model_version = -1
        self.rounds_done = 0
        self.stop_event = threading.Event()
        self.need_register = threading.Event()
        self.abort_training = threading.Event()
        self.training_round: int | None = None
        self.outage = Outage(cfg.give_up_after)
        self._heartbeat_thread: threading.Thread | None = None
        self.local_control = LocalControlVariate(Path(cfg.temp_dir) / "workers" / folder_name(self.name))

    def _session(self, retries: int):
        return make_session(total_retries=retries, ca_cert=self.cfg.ca_cert)

    # ------------------------------------------------------------------ registration and liveness

    def register(self) -> None:
        """Register (or re-register under the same name). Errors: see :func:`fedrest.worker_policy.react`."""
        answer, created = self.client.register(self.name, device_description(self.device), len(self.data),
                                               system_info(self.device), self.cfg.token, self.instance_id,
                                               task=self.fingerprint,
                                               eval_samples=len(self.held_out) if self.held_out is not None else 0)
        if "task" not in answer and answer.get("dataset", self.cfg.dataset) != self.cfg.dataset:  # an older one
            raise FatalError(f"the coordinator trains on {answer['dataset']} but this worker holds "
                             f"{self.cfg.dataset} data; start it with --dataset {answer['dataset']}")
        run_id = answer.get("run_id")
        if self.run_id is not None and run_id != self.run_id:
            log.warning("the coordinator runs a new run %s (this worker was in run %s): its rounds and global "
                        "model start over", run_id, self.run_id)
            self.model_version = -1
        self.run_id = run_id
        self.node_id = answer["node_id"]
        self.client.token = answer["node_token"]
        self.heartbeat_interval = float(answer.get("heartbeat_interval", 10.0))
        self.need_register.clear()
        log.info("%s as node %s (%s) at %s", "registered" if created else "re-registered", self.node_id,
                 self.name, self.client.url)

    def _await_coordinator(self) -> None:
        await_coordinator(CoordinatorClient(self.cfg.coordinator_address, session=self._session(0)), self.outage,
                          self.stop_event, FIRST_CONTACT_S)

    def _heartbeat_loop(self) -> None:
        client = CoordinatorClient(self.cfg.coordinator_address, session=self._session(1))
        while not self.stop_event.wait(self.heartbeat_interval):
            node_id, client.token = self.node_id, self.client.token
            if node_id is None or self.need_register.is_set():
                continue
            try:
                answer = client.heartbeat(node_id)
                training = self.training_round
                if training is not None and (answer.get("node_status") != "training"
                                             or answer.get("round") != training):
                    log.info("heartbeat: round %s is %s and this node is %s; stopping local training",
                             training, answer.get("state"), answer.get("node_status"))
                    self.abort_training.set()
            except CALL_ERRORS as exc:
                reaction = react(exc, "heartbeat")
                if reaction.action == Action.REGISTER:
                    log.warning("heartbeat: %s", reaction.message)
                    self.need_register.set()
                elif isinstance(exc, CoordinatorError):
                    log.warning("%s", reaction.message)
                else:
                    log.debug("heartbeat failed: %s", exc)

    # ------------------------------------------------------------------ main loop

    def run(self) -> int:
        """Work until told to stop; returns the exit status."""
        try:
            self._await_coordinator()
            self._call(self.register, "register")
            self._heartbeat_thread = threading.Thread(target=self._heartbeat_loop, name="heartbeat", daemon=True)
            self._heartbeat_thread.start()
            while True:
                if self.need_register.is_set():
                    self._call(self.register, "register")
                task = self._call(lambda: self.client.task(wait=LONG_POLL_SECONDS))
                if task is None:
                    continue
                action = task.get("action")
                if action == "stop":
                    log.info("coordinator says stop (%s); trained %d rounds", task.get("reason", "done"),
                             self.rounds_done)
                    return 0
                if action == "train":
                    self._call(lambda task=task: self.train_round(task))
                elif action == "evaluate":
                    self._call(lambda task=task: self.evaluate_round(task), "upload")
        except StopRequested:
            log.info("stopping on signal; telling the coordinator")
            self._leave()
            return 0
        except FatalError as exc:
            log.error("%s", exc)
            return 1
        except TaskError as exc:  # the user's task failed: one line here, the traceback in the log file
            log.debug("the task failed", exc_info=exc.__cause__ or exc)
            log.error("%s; leaving the federation", exc)
            self._leave()
            return 1
        finally:
            self.stop_event.set()

    def _call(self, fn, during: str = "call"):
        """Run ``fn``, surviving outages: returns its result, or None after a handled error."""
        started = time.monotonic()
        try:
            result = fn()
        except CALL_ERRORS as exc:
            self._carry_out(react(exc, during), started)
            return None
        self.outage.ended()
        return result

    def _carry_out(self, reaction: Reaction, started: float, prefix: str = "") -> None:
        """Do what :func:`fedrest.worker_policy.react` said (ACCEPTED and DROP need nothing here)."""
        action, message = reaction.action, prefix + reaction.message
        if action == Action.FATAL:
            raise FatalError(message)
        if action == Action.WAIT_OUTAGE:
            self.stop_event.wait(self.outage.delay(reaction.message, started))  # FatalError after GIVE_UP_AFTER
            return
        log.log(reaction.level, "%s", message)
        if action == Action.REGISTER:
            self.need_register.set()
        elif action == Action.RETRY:
            self.stop_event.wait(reaction.delay)

    def _leave(self) -> None:
        if self.node_id is None:
            return
        try:
            self.client.session = self._session(0)
            self.client.leave(self.node_id)
        except CALL_ERRORS as exc:  # leaving is best effort: the node times out anyway
            log.info("could not tell the coordinator that this node leaves: %s", exc)

    # ------------------------------------------------------------------ one round

    def _ensure_model(self, task: dict) -> None:
        if self.model_version != task["model_version"]:
            version, data = self.client.model()
            state = bytes_to_state_dict(data)
            self.model.load_state_dict(state, strict=True)
            self.model_version = version
            log.info("downloaded global model version %d (%.1f MB)", version, len(data) / 1e6)

    def evaluate_round(self, task: dict) -> None:
        """Evaluate global model ``task["round"]`` on the held-out data and send the metrics (federated
        evaluation). Errors: as an upload (:func:`fedrest.worker_policy.react`)."""
        self._ensure_model(task)
        settings = evaluate_settings(task, self.device)
        started = time.perf_counter()
        metrics = self.task.evaluate(self.model, self.held_out, settings)
        self.client.submit_evaluation(settings.round, len(self.held_out), metrics)
        log.info("round %d: evaluated the global model on %d held-out examples in %.1fs: %s; sent", settings.round,
                 len(self.held_out), time.perf_counter() - started, ", ".join(f"{k} {v:.4f}" for k, v in
                                                                             metrics.items()))

    def train_round(self, task: dict) -> None:
        """Train on the task's round and upload the update.

        Training is dropped when the heartbeat learns that the round closed (the worker then joins the
        current one). An upload that fails for want of a connection is sent again, the same bytes, until
        it is answered (a repeat that had in fact arrived is answered 409 duplicate_update and counted
        once). 409/400/413 answers are logged and these bytes are not sent again.
        """
        round_number = int(task["round"])
        settings = task["settings"]
        self._ensure_model(task)
        self.abort_training.clear()
        self.training_round = round_number
        progress = self._progress(round_number, settings["local_epochs"])
        train_settings = round_settings(settings, round_number, self.name, self.device)
        try:  # the control variates' download too: a failed call still ends the bar and the training round
            controls = self._scaffold_controls(task) if settings.get("control_variates") else None
            update = train_local(self.task, self.model, self.data, train_settings, progress, controls)
        except RoundClosed:
            self.model_version = -1
            log.warning("round %d closed while this node was training; dropping the work", round_number)
            return
        finally:
            self.training_round = None
            progress.close()
        self.model_version = -1  # local weights now differ from any global version
        if not self._upload(round_number, update.metadata, update.payload, update.control_change):
            return
        if update.new_control is not None:
            try:
                self.local_control.save(self.run_id, round_number, update.new_control)
            except OSError as exc:
                raise FatalError(f"cannot write the control variate to {self.local_control.path}: {exc}") from None
        self.rounds_done += 1
        log.info("%s; update sent", update.summary(round_number, settings["local_epochs"]))

    def _scaffold_controls(self, task: dict):
        """(c_i, c, x) for a SCAFFOLD round (:func:`fedrest.local_round.scaffold_controls`)."""
        return scaffold_controls(self.task, self.client, self.model, task, self.local_control, self.run_id)

    def _upload(self, round_number: int, metadata: dict, data: bytes, control: bytes | None = None) -> bool:
        """Send one update (and SCAFFOLD's control-variate change) until it is answered; True if the
        coordinator holds it."""
        while True:
            started = time.monotonic()
            try:
                self.client.submit_update(round_number, metadata, data, control)
                self.outage.ended()
                return True
            except CALL_ERRORS as exc:
                reaction = react(exc, "upload")
            if reaction.action == Action.ACCEPTED:
                log.info("round %d: %s", round_number, reaction.message)
                return True
            self._carry_out(reaction, started, prefix=f"round {round_number}: ")
            if reaction.action not in (Action.RETRY, Action.WAIT_OUTAGE):
                return False  # dropped, or registering again (then this node trains again)

    def _progress(self, round_number: int, epochs: int):
        """Per-batch callback: a tqdm bar (unless --quiet), and the check that the round is still open."""
        bar = None
        if not self.cfg.quiet:
            from tqdm import tqdm

            bar = tqdm(total=len(self.data) * epochs, desc=f"round {round_number}", unit="ex", unit_scale=True,
                       leave=False, dynamic_ncols=True, file=sys.stderr)

        def update(batch: int, loss: float, _seen: int) -> None:
            if self.abort_training.is_set():
                raise RoundClosed(round_number)
            if bar is not None:
                bar.update(batch)
                bar.set_postfix(loss=f"{loss:.3f}", refresh=False)

        update.close = bar.close if bar is not None else (lambda: None)
        return update


def await_coordinator(probe: CoordinatorClient, outage: Outage, stop_event: threading.Event, limit: float) -> None:
    """Before registering, ask ``probe`` for /health every FIRST_CONTACT_POLL_S s while the coordinator is
    unreachable (still starting), up to ``limit`` seconds (and GIVE_UP_AFTER); the ``outage`` counts from the first
    failed try; other errors: the registration reports them."""
    deadline = time.monotonic() + min(limit, outage.give_up_after)
    for attempt in itertools.count():
        try:
            probe.health()
            return
        except CoordinatorUnreachable as exc:
            if attempt == 0:
                outage.began()
                log.info("waiting for the coordinator at %s to answer (%s)", probe.url, exc)
        except CALL_ERRORS:
            return
        if stop_event.wait(FIRST_CONTACT_POLL_S) or time.monotonic() > deadline:
            return


def folder_name(name: str) -> str:
    """``name`` as a folder name: itself when it is plain (letters, digits, ``.-_``), else a digest of it."""
    if re.fullmatch(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,99}", name):
        return name
    return "node-" + hashlib.sha256(name.encode()).hexdigest()[:16]
