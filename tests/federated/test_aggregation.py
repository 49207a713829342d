"""The server's aggregation (Flower's FedAvg / FedProx as tformer configures them) is the
example-weighted mean of the clients' weights, checked against numbers worked out by hand; the
FedProx client loss adds exactly (mu / 2) ||w - w_global||^2."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flwr.app import Message, MessageType, MetricRecord, RecordDict
from torch import nn

from tformer.federated.apps import make_strategy
from tformer.federated.local import ProximalTask
from tformer.federated.spec import FederationSpec
from tformer.federated.weights import load_arrays, to_arrays
from tformer.training.tasks.base import Batch


@pytest.fixture(autouse=True)
def flower_run(monkeypatch):
    """Flower's Message() stamps the run, node and task ids a ServerApp process holds; give these messages some."""
    from flwr.supercore.task_identity import TaskIdentity
    monkeypatch.setattr(TaskIdentity, "_run_id", 1, raising=False)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0, raising=False)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1, raising=False)


def linear(weight: list[float], bias: float) -> nn.Linear:
    layer = nn.Linear(2, 1)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([weight]))
        layer.bias.fill_(bias)
    return layer


def reply(model: nn.Module, examples: int, partition: int) -> Message:
    content = RecordDict({"arrays": to_arrays(model),
                          "metrics": MetricRecord({"num-examples": examples, "round": 1, "partition": partition,
                                                   "train_loss": float(partition)})})
    return Message(content, dst_node_id=partition + 1, message_type=MessageType.TRAIN)


def spec(strategy: str = "fedavg") -> FederationSpec:
    return FederationSpec(recipe={}, clients=2, rounds=1, strategy=strategy, out="unused")


@pytest.mark.parametrize("strategy", ["fedavg", "fedprox"])
def test_aggregate_is_example_weighted_mean_by_hand(strategy):
    seen: list = []
    arrays, metrics = make_strategy(spec(strategy), seen.extend).aggregate_train(
        1, [reply(linear([1.0, 2.0], 0.5), 3, 0), reply(linear([5.0, 6.0], -1.5), 1, 1)])
    # by hand: weight (3 [1, 2] + 1 [5, 6]) / 4 = [2, 3]; bias (3 x 0.5 + 1 x -1.5) / 4 = 0
    merged = linear([0.0, 0.0], 9.0)
    load_arrays(merged, arrays)
    assert merged.weight.tolist() == [[2.0, 3.0]] and merged.bias.tolist() == [0.0]
    assert metrics["train_loss"] == pytest.approx(0.25)  # (3 x 0 + 1 x 1) / 4
    assert sorted(int(r["metrics"]["partition"]) for r in seen) == [0, 1]  # per-client rows were offered


def test_aggregate_matches_numpy_for_three_clients():
    rng = np.random.default_rng(0)
    models, counts = [nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2)) for _ in range(3)], [7, 1, 12]
    for m in models:
        for p in m.parameters():
            p.data = torch.from_numpy(rng.normal(size=p.shape).astype(np.float32))
    arrays, _ = make_strategy(FederationSpec(recipe={}, clients=3, rounds=1, out="unused"), lambda r: None
                              ).aggregate_train(1, [reply(m, n, k) for k, (m, n) in enumerate(zip(models, counts))])
    for name in arrays:
        expected = sum(n * dict(m.named_parameters())[name].detach().numpy() for m, n in zip(models, counts)) / 20
        np.testing.assert_allclose(arrays[name].numpy(), expected, rtol=1e-6, atol=1e-6)


def test_frozen_parameters_are_not_sent():
    model = nn.Sequential(nn.Embedding(5, 2), nn.Linear(2, 2))
    model[0].weight.requires_grad_(False)
    assert list(to_arrays(model).keys()) == ["1.weight", "1.bias"]


class SquaredOutput:
    name = "toy"

    def loss(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        return model(batch["x"]).pow(2).mean()


def test_proximal_term_by_hand():
    model, batch = linear([1.0, -1.0], 0.0), Batch({"x": torch.tensor([[1.0, 2.0]])}, 1, 1)
    task = ProximalTask(SquaredOutput())  # type: ignore[arg-type]
    task.anchor(model, mu=0.5)
    with torch.no_grad():
        model.weight += torch.tensor([[0.3, 0.4]])  # ||w - w0||^2 = 0.09 + 0.16 = 0.25
    plain = SquaredOutput().loss(model, batch).detach()
    assert float((task.loss(model, batch) - plain).detach()) == pytest.approx(0.5 / 2 * 0.25)
    model.eval()
    assert float(task.loss(model, batch).detach()) == pytest.approx(float(plain))  # evaluation: the task's own loss


# -- differential privacy -------------------------------------------------------------------------

def test_epsilon_matches_the_closed_form():
    """min over alpha of T alpha / (2 z^2) + L / (alpha - 1), L = log(1/delta), is
    T / (2 z^2) + sqrt(2 T L) / z at alpha = 1 + z sqrt(2 L / T); the grid of orders gets within 0.1%."""
    from tformer.federated.privacy import gaussian_epsilon

    for z, rounds, delta in [(1.0, 10, 1e-5), (0.5, 1, 1e-3), (4.0, 100, 1e-6)]:
        big_l = np.log(1 / delta)
        exact = rounds / (2 * z**2) + np.sqrt(2 * rounds * big_l) / z
        epsilon, order = gaussian_epsilon(z, rounds, delta)
        assert exact <= epsilon <= exact * 1.001
        assert order == pytest.approx(1 + z * np.sqrt(2 * big_l / rounds), rel=0.02)
    assert gaussian_epsilon(1.0, 4, 1e-5)[0] > gaussian_epsilon(1.0, 2, 1e-5)[0] > gaussian_epsilon(2.0, 2, 1e-5)[0]


def dp_strategy(noise: float, clip: float):
    spec = FederationSpec(recipe={}, clients=2, rounds=1, out="unused", dp_noise=noise, dp_clip=clip)
    strategy = make_strategy(spec, lambda r: None)
    return strategy


def test_private_aggregation_clips_updates_by_hand():
    strategy = dp_strategy(1e-12, 1.0)  # noise std 1e-12 x C / 2: nothing measurable
    strategy.current_arrays = to_arrays(linear([0.0, 0.0], 0.0))  # the global model the round started from
    # updates: [3, 4, 0] has norm 5 -> clipped to [0.6, 0.8, 0]; [0.3, 0.4, 0] (norm 0.5) is kept;
    # unweighted mean (weights 1 under DP, whatever the examples): [0.45, 0.6, 0]
    arrays, _ = strategy.aggregate_train(1, [reply(linear([3.0, 4.0], 0.0), 1, 0), reply(linear([0.3, 0.4], 0.0), 1, 1)])
    merged = linear([9.0, 9.0], 9.0)
    load_arrays(merged, arrays)
    np.testing.assert_allclose(merged.weight.detach().numpy(), [[0.45, 0.6]], atol=1e-6)
    assert abs(float(merged.bias.detach())) < 1e-6


def test_private_aggregation_noise_has_the_stated_scale():
    strategy = dp_strategy(2.0, 0.5)  # std z C / m = 2 x 0.5 / 2 = 0.5
    models = [nn.Linear(4000, 1, bias=False) for _ in range(3)]
    nn.init.zeros_(models[0].weight)  # the global model
    for k in (1, 2):
        nn.init.constant_(models[k].weight, 0.001 * k)  # updates of norm 0.06 and 0.13 < C: not clipped
    strategy.current_arrays = to_arrays(models[0])
    arrays, _ = strategy.aggregate_train(1, [reply(models[1], 1, 0), reply(models[2], 1, 1)])
    noise = next(iter(arrays.values())).numpy() - 0.0015  # minus the mean update
    assert noise.std() == pytest.approx(0.5, rel=0.05) and abs(noise.mean()) < 0.05
