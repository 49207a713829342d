"""Run a federation on one machine with Flower's simulation runtime (Ray actors play the clients;
no network is needed). One actor per `cpus_per_client` cores runs at a time; each actor builds
the recipe's model and data once and plays every client it is handed.

Flower 1.42 marks `run_simulation` deprecated (it logs so) in favour of `flwr run` against a
SuperLink started with `--simulation`; it still runs offline here, and the apps are the same ones
the multi-process deployment (`deploy`) runs, so moving over touches this module only."""

from __future__ import annotations

import logging
import os

from flwr.simulation import run_simulation

from tformer.federated.apps import client_app, make_server_app
from tformer.federated.server import global_model
from tformer.federated.spec import FederationSpec

log = logging.getLogger(__name__)


class FederationError(RuntimeError):
    """The federation stopped before its last round (the log above says why)."""


def simulate(spec: FederationSpec, *, fresh: bool = False, cpus_per_client: int | None = None) -> int:
    """Train `spec` in Flower's simulation runtime; the rounds the run directory holds afterwards."""
    cores = os.cpu_count() or 1
    per_client = max(1, min(cores, cpus_per_client or cores))
    backend = {"client_resources": {"num_cpus": per_client, "num_gpus": 0.0},
               "init_args": {"num_cpus": cores, "num_gpus": 0, "include_dashboard": False}}
    with global_model(spec, fresh) as server:  # data read, partition checked, folder locked: before Ray
        if server.done < spec.rounds:
            run_simulation(make_server_app(server), client_app, num_supernodes=spec.clients,
                           backend_config=backend)  # type: ignore[arg-type]
        done = server.done_rounds()
    if done < spec.rounds:
        raise FederationError(f"the federation in {spec.out} stopped after round {done} of {spec.rounds} "
                              "(the log above says why); run the same command again to resume")
    return done
