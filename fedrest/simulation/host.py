"""A client host: one process (or Ray task) that serves many virtual clients of a simulation, one after another.

The host loads the task's training data and builds its model once, computes the split of the data into N parts
(:mod:`.plan`) and keeps only the positions of its own clients' examples. Each virtual client registers with the
coordinator under its own name (``client-0007``) and token, as a worker does, and then waits in a long poll on the
host's event loop (:mod:`.polling`). When the coordinator samples it, its answer comes to the host's main thread,
which trains it on its part (:func:`fedrest.local_round.train_local`: the seeds, settings and upload of a worker)
and uploads its update over the same REST API, then polls for it again. While a client waits for its turn or trains,
the host's heartbeat thread keeps it online. The global model is downloaded once per version for all the host's
clients; SCAFFOLD's control variate of each client is kept on disk (TEMP_DIR/workers/<name>), as a worker keeps its
own. What each error answer means: :func:`fedrest.worker_policy.react`, as for a worker.

Exit status of :func:`run_host`: 0 when every client was told to stop; 1 when the coordinator was unreachable for
GIVE_UP_AFTER seconds or refused the clients; 2 when the task or its data cannot be loaded.
"""

from __future__ import annotations

import logging
import queue
import secrets
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from config import Config
from fedrest.client import CoordinatorClient, make_session
from fedrest.local_control import LocalControlVariate
from fedrest.local_round import RoundClosed, evaluate_settings, round_settings, scaffold_controls, train_local
from fedrest.node_identity import system_info
from fedrest.serialization import bytes_to_state_dict
from fedrest.simulation.plan import ClientPart, client_name, client_parts, host_clients
from fedrest.simulation.polling import TaskPolls
from fedrest.tasks import TaskError, load_task
from fedrest.tasks.node_data import context, hold_out_positions, ready_on
from fedrest.worker_node import await_coordinator, folder_name
from fedrest.worker_policy import CALL_ERRORS, Action, FatalError, Outage, react
from utils import device_description

log = logging.getLogger("fl.simulation")

FIRST_CONTACT_S = 60.0  # how long a starting host asks for its coordinator before the registrations begin
UPLOADS_IN_FLIGHT = 4  # updates trained and waiting for the uploader thread, at most (each holds its state_dict)


@dataclass(eq=False, slots=True)
class VirtualClient:
    """One virtual client: its identity with the coordinator and its examples (nothing else while it waits)."""

    k: int
    name: str
    part: ClientPart
    node_id: str | None = None
    token: str | None = None
    busy: bool = False  # its poll was answered: waiting for the host's main thread, or training
    stopped: bool = False


class ClientHost:
    """The virtual clients ``host_clients(host, num_hosts, num_clients)`` of a simulation (see the module's text).

    Raises
    ------
    TaskError
        When the task, its data or the split cannot be made (the message says why).
    """

    def __init__(self, cfg: Config, host: int, num_hosts: int, num_clients: int, device: torch.device) -> None:
        self.cfg, self.device, self.host = cfg, device, host
        started = time.perf_counter()
        self.task = load_task(cfg)
        data = self.task.load_data(context(cfg, "worker"), "train")
        labels = data.labels()
        try:
            parts = client_parts(None if labels is None else labels.numpy(), len(data), num_clients,
                                 host_clients(host, num_hosts, num_clients), cfg.partition, cfg.alpha, cfg.seed,
                                 cfg.eval_fraction, _hold_out)
        except ValueError as exc:
            raise TaskError(f"cannot split the data of task {self.task.name} into {num_clients} clients: {exc}") \
                from None
        self.data = ready_on(data, device)
        self.clients = {k: VirtualClient(k, client_name(k, num_clients), part) for k, part in parts.items()}
        self.model = self.task.build_model().to(device)
        torch.optim.SGD(self.model.parameters(), lr=0.0)  # imports torch._dynamo (~1 s) now, not in round 1
        self.fingerprint = self.task.fingerprint(self.model)
        self.instance = secrets.token_hex(6)  # this host process; a client's instance id adds its number
        self.events: queue.SimpleQueue = queue.SimpleQueue()
        self.uploads: queue.Queue = queue.Queue(maxsize=UPLOADS_IN_FLIGHT)
        self.sent = 0  # updates the coordinator holds
        self.polls = TaskPolls(cfg.coordinator_address, self._answered, cfg.ca_cert)
        self.stop_event = threading.Event()
        self.model_version, self.run_id = -1, None
        self._global_state = None
        self.outage = Outage(cfg.give_up_after)
        self._local = threading.local()
        self.heartbeat_interval = cfg.heartbeat_interval  # until the coordinator's answer says
        log.info("host %d of %d: %d virtual clients of %d (%s), %d training examples in all, ready in %.1fs", host,
                 num_hosts, len(self.clients), num_clients, self.task.name,
                 sum(len(c.part.train) for c in self.clients.values()), time.perf_counter() - started)

    # ------------------------------------------------------------------ calls

    def _client(self, token: str | None) -> CoordinatorClient:
        """A client of the coordinator with ``token``, on this thread's session (Sessions are per thread)."""
        if not hasattr(self._local, "session"):
            self._local.session = make_session(total_retries=3, ca_cert=self.cfg.ca_cert)
        return CoordinatorClient(self.cfg.coordinator_address, token=token, session=self._local.session)

    def _answered(self, key: int, task: dict | None, error: Exception | None) -> None:  # in the polls' thread
        self.clients[key].busy = True
        self.events.put((key, task, error))

    def register(self, client: VirtualClient) -> None:
        """Register ``client`` (again). Raises what :meth:`CoordinatorClient.register` raises."""
        held = client.part.held_out
        answer, _ = self._client(None).register(
            client.name, device_description(self.device), len(client.part.train), system_info(self.device),
            self.cfg.token, f"{self.instance}-{client.k}", task=self.fingerprint,
            eval_samples=0 if held is None else len(held))
        client.node_id, client.token = answer["node_id"], answer["node_token"]
        if self.run_id is not None and answer.get("run_id") != self.run_id:
            self.model_version = -1
        self.run_id = answer.get("run_id")
        self.heartbeat_interval = float(answer.get("heartbeat_interval", 10.0))

    # ------------------------------------------------------------------ main loop

    def run(self) -> int:
        """Register every client, then serve their tasks until each was told to stop; returns the exit status."""
        try:
            await_coordinator(CoordinatorClient(self.cfg.coordinator_address,
                                                session=make_session(0, ca_cert=self.cfg.ca_cert)),
                              self.outage, self.stop_event, FIRST_CONTACT_S)
            started = time.perf_counter()
            for client in self.clients.values():
                self._call(lambda client=client: self.register(client), "register", until_done=True)
            log.info("registered %d virtual clients in %.1fs", len(self.clients), time.perf_counter() - started)
            self.polls.start()
            for client in self.clients.values():
                self.polls.poll(client.k, client.token)
            threading.Thread(target=self._heartbeat_loop, name="heartbeat", daemon=True).start()
            threading.Thread(target=self._upload_loop, name="uploads", daemon=True).start()
            return self._serve()
        except FatalError as exc:
            log.error("%s", exc)
            return 1
        except TaskError as exc:
            log.debug("the task failed", exc_info=exc.__cause__ or exc)
            log.error("%s", exc)
            return 1
        finally:
            self.stop_event.set()
            self.polls.close()
            try:
                self.uploads.put_nowait(None)  # the uploader's end
            except queue.Full:
                pass  # it is stuck on a failed upload: a daemon thread, gone with the process

    def _serve(self) -> int:
        left = len(self.clients)
        while left:
            key, task, error = self.events.get()
            if key is None:  # the uploader thread could not go on
                raise error
            client = self.clients[key]
            if error is not None:
                self._after_error(client, error, "call")
                continue
            action = task.get("action")
            if action == "stop":
                client.stopped, client.busy = True, False
                left -= 1
                continue
            if action == "train":
                try:
                    if self._call(lambda c=client, t=task: self.train(c, t)):
                        continue  # the uploader thread sends the update, then polls for the client again
                except RoundClosed:
                    log.info("%s: round %s closed before it trained; dropping the work", client.name, task["round"])
            elif action == "evaluate":
                self._call(lambda c=client, t=task: self.evaluate(c, t), "upload")
            client.busy = False
            self.polls.poll(key, client.token)
        log.info("every virtual client was told to stop; %d updates sent by this host", self.sent)
        return 0

    def _call(self, fn, during: str = "call", until_done: bool = False):
        """Run ``fn``; on an error carry out the worker's reaction (:func:`react`); with ``until_done`` try again
        until it succeeds. Returns its result, or None after a handled error."""
        while True:
            started = time.monotonic()
            try:
                result = fn()
                self.outage.ended()
                return result
            except CALL_ERRORS as exc:
                delay = self._react(react(exc, during), started)
            if not until_done:
                return None
            self.stop_event.wait(delay)

    def _after_error(self, client: VirtualClient, exc: Exception, during: str) -> None:
        delay = self._react(react(exc, during), time.monotonic(), client)
        client.busy = False
        self.polls.poll(client.k, client.token, delay)

    def _react(self, reaction, started: float, client: VirtualClient | None = None) -> float:
        """Carry out a reaction; returns the seconds to wait before the client's next call."""
        if reaction.action == Action.FATAL:
            raise FatalError(reaction.message)
        if reaction.action == Action.WAIT_OUTAGE:
            return self.outage.delay(reaction.message, started)  # FatalError after GIVE_UP_AFTER
        log.log(reaction.level, "%s%s", f"{client.name}: " if client else "", reaction.message)
        if reaction.action == Action.REGISTER and client is not None:
            self._call(lambda: self.register(client), "register", until_done=True)
        return reaction.delay if reaction.action == Action.RETRY else 0.0

    def _heartbeat_loop(self) -> None:
        """Heartbeats of the clients whose poll was answered (waiting for their turn, or training): without a
        poll in progress, only a request within NODE_TIMEOUT keeps a node online."""
        while not self.stop_event.wait(self.heartbeat_interval):
            for client in [c for c in self.clients.values() if c.busy and not c.stopped]:
                try:
                    self._client(client.token).heartbeat(client.node_id)
                except CALL_ERRORS as exc:
                    log.debug("heartbeat of %s failed: %s", client.name, exc)

    # ------------------------------------------------------------------ one client's round

    def _load_global(self, client: VirtualClient, task: dict) -> None:
        """Put the global model of ``task`` into the host's model (downloaded once per version)."""
        if self.model_version != task["model_version"]:
            version, data = self._client(client.token).model()
            self._global_state = bytes_to_state_dict(data)
            self.model_version = version
            log.info("downloaded global model version %d (%.1f MB)", version, len(data) / 1e6)
        self.model.load_state_dict(self._global_state, strict=True)

    def train(self, client: VirtualClient, task: dict) -> bool:
        """Train ``client`` on its part for ``task`` and hand the update to the uploader thread (True); the host's
        main thread trains the next client meanwhile."""
        round_number, settings = int(task["round"]), task["settings"]
        self._load_global(client, task)
        train_settings = round_settings(settings, round_number, client.name, self.device)
        controls = self._controls(client, task) if settings.get("control_variates") else None
        update = train_local(self.task, self.model, self.data.subset(client.part.train), train_settings, None,
                             controls)
        self.uploads.put((client, round_number, update, settings["local_epochs"]))
        return True

    def _upload_loop(self) -> None:
        """Send the trained updates in order, then poll for their clients again; a fatal error ends the host."""
        while (item := self.uploads.get()) is not None:
            client = item[0]
            try:
                self._send(*item)
            except FatalError as exc:
                self.events.put((None, None, exc))
                return
            client.busy = False
            self.polls.poll(client.k, client.token)

    def _send(self, client: VirtualClient, round_number: int, update, epochs: int) -> None:
        """Upload ``update`` until it is answered; keep SCAFFOLD's new control variate once it is held."""
        if not self._upload(client, round_number, update):
            return
        if update.new_control is not None:
            store = self._control_store(client)
            try:
                store.save(self.run_id, round_number, update.new_control)
            except OSError as exc:
                raise FatalError(f"cannot write the control variate to {store.path}: {exc}") from None
        self.sent += 1
        log.info("%s: %s; update sent", client.name, update.summary(round_number, epochs))

    def _controls(self, client: VirtualClient, task: dict):
        """SCAFFOLD's (c_i, c, x) for ``client`` (:func:`fedrest.local_round.scaffold_controls`)."""
        return scaffold_controls(self.task, self._client(client.token), self.model, task,
                                 self._control_store(client), self.run_id)

    def _control_store(self, client: VirtualClient) -> LocalControlVariate:
        return LocalControlVariate(Path(self.cfg.temp_dir) / "workers" / folder_name(client.name))

    def _upload(self, client: VirtualClient, round_number: int, update) -> bool:
        """Send the update until it is answered (as :meth:`fedrest.worker_node.Worker._upload`)."""
        while True:
            started = time.monotonic()
            try:
                self._client(client.token).submit_update(round_number, update.metadata, update.payload,
                                                         update.control_change)
                self.outage.ended()
                return True
            except CALL_ERRORS as exc:
                reaction = react(exc, "upload")
            if reaction.action == Action.ACCEPTED:
                return True
            delay = self._react(reaction, started, client)
            if reaction.action not in (Action.RETRY, Action.WAIT_OUTAGE):
                return False
            self.stop_event.wait(delay)

    def evaluate(self, client: VirtualClient, task: dict) -> None:
        """Evaluate global model ``task["round"]`` on ``client``'s held-out part and send the metrics."""
        if client.part.held_out is None:
            return
        self._load_global(client, task)
        settings = evaluate_settings(task, self.device)
        metrics = self.task.evaluate(self.model, self.data.subset(client.part.held_out), settings)
        self._client(client.token).submit_evaluation(settings.round, len(client.part.held_out), metrics)


def _hold_out(n: int, fraction: float, key: str):
    try:
        return hold_out_positions(n, fraction, key)
    except TaskError as exc:
        raise ValueError(str(exc)) from None
