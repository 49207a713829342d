"""Flower's ClientApp and ServerApp (the Message API) for any tformer recipe.

The ServerApp runs one of Flower's own strategies (`FedAvg`, `FedProx`) with `Strategy.start`:
each round it sends the global trainable weights and a ConfigRecord (the federation spec, the
round) to the sampled clients; each ClientApp loads them, trains local steps on its share and
replies with its weights and a MetricRecord whose `num-examples` (the size of its share) weights
Flower's average. After each round the server evaluates and checkpoints the global model.

`client_app` / `server_app` are what a deployment's `pyproject.toml` names; the ServerApp reads
the federation from the run config (`spec`, `fresh`). The simulation opens the federation first
(bad input fails before Ray starts) and builds its ServerApp with `make_server_app(server)`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg, FedProx, Strategy
from flwr.serverapp.strategy.strategy_utils import aggregate_metricrecords

from tformer.energy import EnergyMeter
from tformer.federated.local import node_for, train_round
from tformer.federated.privacy import private
from tformer.federated.server import GlobalModel, global_model
from tformer.federated.spec import FederationSpec
from tformer.federated.weights import load_arrays, to_arrays

log = logging.getLogger(__name__)

WEIGHT_KEY = "num-examples"  # what Flower's strategies weight the average by

client_app = ClientApp()


@client_app.train()
def train(msg: Message, context: Context) -> Message:
    """Load the global weights, train this client's local steps, send weights + examples back."""
    config = msg.content["config"]
    spec_json, first = str(config["spec"]), int(config["first-round"])
    global_round = first - 1 + int(config["server-round"])
    partition_id = int(context.node_config["partition-id"])
    spec = FederationSpec.from_json(spec_json)
    if int(context.node_config.get("num-partitions", spec.clients)) != spec.clients:
        raise ValueError(f"this SuperNode says num-partitions={context.node_config['num-partitions']}, the "
                         f"federation has {spec.clients} clients")
    node = node_for(spec_json)
    load_arrays(node.trainer.model, msg.content["arrays"])
    mu = float(config.get("proximal-mu", 0.0))  # set by Flower's FedProx
    meter = EnergyMeter.for_device(node.trainer.world.device)
    metrics = train_round(node, partition_id, global_round, mu)
    examples = len(node.shares[partition_id])  # the weight of its update; 1 each under DP (privacy)
    energy = {"energy_j": meter.joules(), "energy_measured": float(meter.method == "measured")}
    reply = MetricRecord({WEIGHT_KEY: 1 if spec.private else examples, "examples": examples,
                          "round": global_round, "partition": partition_id, **metrics, **energy})
    return Message(RecordDict({"arrays": to_arrays(node.trainer.model), "metrics": reply}), reply_to=msg)


def make_strategy(spec: FederationSpec, on_replies: Callable[[list[RecordDict]], None]) -> Strategy:
    """Flower's FedAvg or FedProx, sampling `fraction` of the clients each round (the server
    evaluates centrally, so no client-side evaluation round); with differential privacy, inside
    Flower's server-side clipping + noise wrapper."""
    def aggregate(replies: list[RecordDict], key: str) -> MetricRecord:
        on_replies(replies)  # per-client rows before Flower's weighted mean of the metrics
        merged = aggregate_metricrecords(replies, key)
        return MetricRecord({k: v for k, v in merged.items() if k not in ("round", "partition")})  # no means of ids

    common: dict[str, Any] = {"fraction_train": spec.fraction, "fraction_evaluate": 0.0,
                              "min_train_nodes": spec.sampled, "min_evaluate_nodes": 0,
                              "min_available_nodes": spec.clients, "weighted_by_key": WEIGHT_KEY,
                              "train_metrics_aggr_fn": aggregate}
    strategy = FedProx(proximal_mu=spec.mu, **common) if spec.strategy == "fedprox" else FedAvg(**common)
    return private(strategy, spec.dp_noise, spec.dp_clip, spec.sampled) if spec.private else strategy


def run_rounds(grid: Grid, server: GlobalModel) -> None:
    """Rounds done+1 .. spec.rounds of Flower's strategy loop, from the run directory's state."""
    spec, offset = server.spec, server.done
    if offset >= spec.rounds:
        log.warning("%s already holds %d rounds (asked for %d); nothing to do: raise --rounds to go on",
                    spec.out, offset, spec.rounds)
        return
    replied: set[int] = set()

    def on_replies(replies: list[RecordDict]) -> None:
        server.record_clients(replies)
        replied.update(int(next(iter(r.metric_records.values()))["round"]) for r in replies)

    def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        if server_round == 0 and offset > 0:
            return None  # the resumed model was evaluated when its round ended
        if server_round > 0 and offset + server_round not in replied:
            raise RuntimeError(f"round {offset + server_round}: no client trained (see the ClientApp errors "
                               "above); the federation stops here")
        return server.evaluate(offset + server_round, arrays)

    make_strategy(spec, on_replies).start(
        grid=grid, initial_arrays=server.arrays(), num_rounds=spec.rounds - offset,
        train_config=ConfigRecord({"spec": spec.to_json(), "first-round": offset + 1}), evaluate_fn=evaluate)


def make_server_app(server: GlobalModel) -> ServerApp:
    """A ServerApp that runs the rounds of `server`, a federation already opened (the simulation)."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        run_rounds(grid, server)

    return app


server_app = ServerApp()


@server_app.main()
def deployed_main(grid: Grid, context: Context) -> None:
    """A deployment: the federation is the run config's `spec` (written by `tformer federate --app`)."""
    spec = FederationSpec.from_json(str(context.run_config["spec"]))
    with global_model(spec, bool(context.run_config.get("fresh", False))) as server:
        run_rounds(grid, server)


__all__ = ["client_app", "make_server_app", "make_strategy", "run_rounds", "server_app"]
