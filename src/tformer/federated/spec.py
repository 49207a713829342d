"""What one federation is: a recipe (sent whole, so every node builds the same model and task),
how its data is dealt out, the strategy and the run directory. It travels as JSON: in the
simulation it is captured by the ServerApp, in a deployment it is the Flower app's run config
(`spec`), and the server hands it to every client in each round's ConfigRecord."""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tformer.config import ConfigError, check_choice
from tformer.federated.partition import PartitionSpec, parse_partition
from tformer.training.recipe import RELATIVE_PATHS, Recipe, recipe_from_dict

STRATEGIES = ("fedavg", "fedprox")


@dataclass(frozen=True)
class FederationSpec:
    recipe: dict[str, Any]  # Recipe.to_dict(), file paths made absolute
    clients: int
    rounds: int
    partition: str = "iid"
    strategy: str = "fedavg"
    mu: float = 0.01  # FedProx's proximal weight
    fraction: float = 1.0  # share of the clients sampled each round
    local_steps: int = 0  # 0: the recipe's max_steps spread over rounds x sampled clients
    out: str = ""
    seed: int = 0  # the partition's seed
    dp_noise: float = 0.0  # differential privacy (federated.privacy): noise multiplier z; 0: off
    dp_clip: float = 0.0  # the L2 norm C every client's update is clipped to
    dp_delta: float = 1e-5

    def __post_init__(self) -> None:
        check_choice("--strategy", self.strategy, STRATEGIES)
        for name in ("clients", "rounds"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name} must be >= 1, got {getattr(self, name)}")
        if not 0 < self.fraction <= 1:
            raise ConfigError(f"--fraction must be in (0, 1] (the share of clients that train each round), "
                              f"got {self.fraction}")
        if self.local_steps < 0:
            raise ConfigError(f"--local-steps must be >= 1 (0: from the recipe), got {self.local_steps}")
        if self.strategy == "fedprox" and not self.mu > 0:
            raise ConfigError(f"--mu must be > 0 with fedprox (0 is fedavg), got {self.mu}")
        if self.dp_noise < 0 or (self.dp_noise > 0 and not self.dp_clip > 0):
            raise ConfigError(f"differential privacy needs --dp-noise > 0 and --dp-clip > 0 (the update norm "
                              f"bound), got --dp-noise {self.dp_noise} --dp-clip {self.dp_clip}")
        if not 0 < self.dp_delta < 1:
            raise ConfigError(f"--dp-delta must be in (0, 1), got {self.dp_delta}")
        parse_partition(self.partition)  # a bad spec is named now

    @property
    def partition_spec(self) -> PartitionSpec:
        return parse_partition(self.partition)

    @property
    def recipe_obj(self) -> Recipe:
        return recipe_from_dict(self.recipe, where="the federation's recipe")

    @property
    def sampled(self) -> int:
        """Clients that train each round (Flower's FedAvg samples max(int(N F), min_train_nodes))."""
        return max(1, int(self.clients * self.fraction))

    @property
    def steps_per_round(self) -> int:
        """Local optimizer steps per client per round. Default: the recipe's max_steps over rounds x
        sampled clients, so a federation sees as many examples as the recipe's centralised run."""
        if self.local_steps:
            return self.local_steps
        return max(1, math.ceil(self.recipe_obj.training.max_steps / (self.rounds * self.sampled)))

    @property
    def private(self) -> bool:
        return self.dp_noise > 0

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> FederationSpec:
        return cls(**json.loads(text))

    def keeping_schedule(self, saved_file: Path) -> FederationSpec:
        """This spec resuming the federation saved in `saved_file` (if any): local steps left to
        the default keep the steps per round it started with (they follow --rounds, which may grow
        on a resume; the steps would otherwise shrink and the step count run backwards)."""
        if self.local_steps or not saved_file.is_file():
            return self
        try:
            steps = json.loads(saved_file.read_text(encoding="utf-8")).get("steps_per_round")
        except (OSError, ValueError, AttributeError):
            return self  # same_federation names the unreadable file
        return dataclasses.replace(self, local_steps=steps) if isinstance(steps, int) and steps > 0 else self

    def same_federation(self, saved: dict[str, Any]) -> None:
        """A resume continues the same federation (more rounds allowed): recipe sections that decide
        the model and data, clients, partition, strategy and local steps must match."""
        mine = json.loads(self.to_json())
        if "steps_per_round" in saved:  # compare what was run, however it was asked for
            saved = {**saved, "local_steps": saved["steps_per_round"]}
            mine["local_steps"] = self.steps_per_round
        keys = ("clients", "partition", "strategy", "mu", "fraction", "local_steps", "seed", "dp_noise", "dp_clip")
        for key in keys:
            if saved.get(key) != mine[key]:
                raise ConfigError(f"{self.out} was federated with {key}={saved.get(key)!r}, not {mine[key]!r}: "
                                  "resume with the same settings (only --rounds may grow), or use --fresh "
                                  "or another --out")
        for section in ("task", "model", "tokenizer", "data"):
            if saved.get("recipe", {}).get(section) != mine["recipe"][section]:
                raise ConfigError(f"the recipe's {section} section differs from the one {self.out} was "
                                  "federated with; use --fresh or another --out")


def absolute_paths(recipe: Recipe) -> dict[str, Any]:
    """The recipe as a dict whose file paths (init_from, tokenizer.path, a data file) are absolute:
    the ClientApp and ServerApp of a deployment run in other working directories."""
    data = json.loads(json.dumps(recipe.to_dict()))
    for section, key in (*RELATIVE_PATHS, ("data", "source"), ("data", "test_source")):
        value = data.get(section, {}).get(key)
        if isinstance(value, str) and value and Path(value).expanduser().exists():
            data[section][key] = str(Path(value).expanduser().resolve())
    return data
