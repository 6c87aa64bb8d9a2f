"""The simulation benchmark's workload on Flower's simulation engine (flwr with its Ray backend), for comparison.

The same model (SimpleCNN), data (Fashion-MNIST, read by fedrest.data), split (fedrest.partition's Dirichlet or IID,
the same parts for the same seed), local training (fedrest.training.fit: SGD, E, B, learning rate, momentum,
one torch thread a client) and server evaluation after every round (fedrest.training.evaluate on the 10,000 test
images, TEST_BATCH_SIZE 128) as ``simulate.py``; Flower's FedAvg samples C*N clients a round (its own draw) and
its ClientApps run on Ray actors of one CPU each. It prints one JSON line: the wall time and each round's accuracy
with the seconds since the start at which it was known.

Flower pins its own Ray (flwr[simulation] 1.42 wants ray 2.55.1), so it runs in a virtual environment of its own
(benchmarks/flower_requirements.txt), which finds this checkout's modules through sys.path:

    python3 -m venv .venv-flower && .venv-flower/bin/pip install -r benchmarks/flower_requirements.txt
    .venv-flower/bin/python benchmarks/flower_fashion.py --clients 1000 --rounds 30 --fraction 0.02 --alpha 0.3

benchmarks/simulation.py runs it beside simulate.py and prints both.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
SETTINGS_ENV = "FLOWER_BENCH_SETTINGS"  # the run's settings, for the ClientApps in Ray's actor processes


def settings() -> dict:
    return json.loads(os.environ[SETTINGS_ENV])


@functools.lru_cache(maxsize=1)
def client_data(data_dir: str, num_clients: int, partition: str, alpha: float, seed: int):
    """Each actor process loads the training data and computes the split once (as Flower's examples cache their
    FederatedDataset)."""
    from fedrest.data import load_dataset
    from fedrest.partition import dirichlet_partition, iid_partition

    data = load_dataset("fashion-mnist", data_dir, train=True, allow_download=False)
    labels = data.labels.numpy()
    parts = (dirichlet_partition(labels, num_clients, alpha, seed) if partition == "dirichlet"
             else iid_partition(len(labels), num_clients, seed))
    return data.images, data.labels, parts


def make_client_app():
    from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp

    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        import torch

        from fedrest.node_identity import shuffle_seed
        from fedrest.simulation.plan import client_name
        from fedrest.tasks.data import TensorData
        from fedrest.training import fit
        from model import SimpleCNN

        s = settings()
        torch.set_num_threads(1)
        k, n = int(context.node_config["partition-id"]), int(context.node_config["num-partitions"])
        images, labels, parts = client_data(s["data_dir"], n, s["partition"], s["alpha"], s["seed"])
        model = SimpleCNN()
        model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
        server_round = int(msg.content["config"]["server-round"])
        seed = shuffle_seed(s["seed"], server_round, client_name(k, n))
        torch.manual_seed(seed)
        index = torch.from_numpy(parts[k])
        result = fit(model, TensorData(images[index], labels[index]), epochs=s["local_epochs"],
                     batch_size=s["batch_size"], learning_rate=s["learning_rate"], momentum=s["momentum"],
                     seed=seed)
        content = RecordDict({"arrays": ArrayRecord(model.state_dict()),
                              "metrics": MetricRecord({"train_loss": result.loss, "num-examples": result.num_samples})})
        return Message(content=content, reply_to=msg)

    return app


def make_server_app(timeline: list):
    from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord
    from flwr.serverapp import Grid, ServerApp
    from flwr.serverapp.strategy import FedAvg

    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        import torch

        from fedrest.data import load_dataset
        from fedrest.tasks.data import TensorData
        from fedrest.training import evaluate
        from model import SimpleCNN

        s = settings()
        test = load_dataset("fashion-mnist", s["data_dir"], train=False, allow_download=False)
        test_data = TensorData(test.images, test.labels)
        model = SimpleCNN()

        def central_evaluation(server_round: int, arrays: ArrayRecord) -> MetricRecord:
            model.load_state_dict(arrays.to_torch_state_dict())
            with torch.no_grad():
                metrics = evaluate(model, test_data, s["test_batch_size"])
            timeline.append({"round": server_round, "accuracy": metrics["accuracy"], "loss": metrics["loss"],
                             "at_s": time.perf_counter() - s["started"]})
            return MetricRecord(metrics)

        sample = max(1, math.ceil(s["fraction"] * s["clients"]))
        strategy = FedAvg(fraction_train=s["fraction"], fraction_evaluate=0.0, min_train_nodes=sample,
                          min_evaluate_nodes=0, min_available_nodes=s["clients"])
        torch.manual_seed(s["seed"])
        strategy.start(grid=grid, initial_arrays=ArrayRecord(SimpleCNN().state_dict()), num_rounds=s["rounds"],
                       train_config=ConfigRecord({"lr": s["learning_rate"]}),
                       evaluate_fn=central_evaluation if s["evaluate"] else None)

    return app


def main(argv=None) -> int:
    from config import Config

    defaults = Config()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--fraction", type=float, default=0.02)
    parser.add_argument("--partition", choices=("iid", "dirichlet"), default="dirichlet")
    parser.add_argument("--alpha", type=float, default=0.3)
    parser.add_argument("--local-epochs", type=int, default=defaults.local_epochs)
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--actors", type=int, default=os.cpu_count() or 1, help="Ray actors (CPUs of the backend)")
    parser.add_argument("--data-dir", default=str(ROOT / "data"))
    parser.add_argument("--no-eval", action="store_true", help="no server evaluation (no accuracies)")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    os.environ[SETTINGS_ENV] = json.dumps({
        "clients": args.clients, "rounds": args.rounds, "fraction": args.fraction, "partition": args.partition,
        "alpha": args.alpha, "seed": defaults.seed, "local_epochs": args.local_epochs, "batch_size": args.batch_size,
        "learning_rate": defaults.learning_rate, "momentum": defaults.momentum,
        "test_batch_size": defaults.test_batch_size, "data_dir": os.path.abspath(args.data_dir), "started": started,
        "evaluate": not args.no_eval})
    os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "benchmarks"), os.environ.get("PYTHONPATH", "")])
    from flwr.simulation import run_simulation

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import flower_fashion  # the apps by their module's name, which Ray's actor processes import (not __main__)

    timeline: list = []
    run_simulation(server_app=flower_fashion.make_server_app(timeline), client_app=flower_fashion.make_client_app(),
                   num_supernodes=args.clients,
                   backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0},
                                   "init_args": {"num_cpus": args.actors}})
    print(json.dumps({"engine": "flower", "flwr": __import__("flwr").__version__, "clients": args.clients,
                      "wall_s": time.perf_counter() - started, "rounds": [r for r in timeline if r["round"] > 0]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
