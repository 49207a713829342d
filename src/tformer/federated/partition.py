"""Deal a task's training examples out among data holders (clients).

    iid             a seeded permutation cut into near-equal shares
    dirichlet:A     non-IID by label: each class's examples split among clients in proportions
                    drawn from Dirichlet(A, ..., A) (Hsu et al. 2019); small A, few classes each
    groups[:COLUMN] natural groups (default column `source`: Amazon / IMDB / Yelp in the UCI
                    sentiment data); groups are dealt whole, the largest first to the smallest client

Every partition is a pure function of (labels or groups, number of clients, seed): each client
computes the same split and takes its own share, and every example lands in exactly one share.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from tformer.config import ConfigError
from tformer.training.tasks.base import can_partition

KINDS = ("iid", "dirichlet", "groups")
DEFAULT_GROUP_COLUMN = "source"
DIRICHLET_TRIES = 100  # draws until every client holds an example


@dataclass(frozen=True)
class PartitionSpec:
    kind: str
    alpha: float | None = None  # dirichlet
    column: str | None = None  # groups

    def __str__(self) -> str:
        return {"iid": "iid", "dirichlet": f"dirichlet:{self.alpha:g}",
                "groups": f"groups:{self.column}"}[self.kind]


def parse_partition(text: str) -> PartitionSpec:
    """'iid' | 'dirichlet:0.5' | 'groups' | 'groups:COLUMN'; anything else is one line."""
    kind, _, arg = text.strip().partition(":")
    usage = "use iid, dirichlet:ALPHA (e.g. dirichlet:0.5) or groups[:COLUMN]"
    if kind == "iid" and not arg:
        return PartitionSpec("iid")
    if kind == "dirichlet":
        try:
            alpha = float(arg)
        except ValueError:
            raise ConfigError(f"--partition {text!r}: the Dirichlet prior needs a number, {usage}") from None
        if not alpha > 0 or not np.isfinite(alpha):
            raise ConfigError(f"--partition {text!r}: alpha must be > 0 (smaller is less IID: 0.1 "
                              f"gives most clients one or two classes, 100 is nearly IID), got {arg}")
        return PartitionSpec("dirichlet", alpha=alpha)
    if kind == "groups":
        return PartitionSpec("groups", column=arg or DEFAULT_GROUP_COLUMN)
    raise ConfigError(f"--partition {text!r} is not a partition: {usage}")


def check_clients(n_clients: int, n_examples: int) -> None:
    if n_clients < 1:
        raise ConfigError(f"--clients must be >= 1, got {n_clients}")
    if n_clients > n_examples:
        raise ConfigError(f"{n_clients} clients for {n_examples} training examples: every client needs "
                          f"at least one; use --clients <= {n_examples}")


def iid(n_examples: int, n_clients: int, seed: int) -> list[np.ndarray]:
    """Near-equal shares (sizes differ by at most one) of a seeded permutation, each sorted."""
    check_clients(n_clients, n_examples)
    order = np.random.default_rng([seed, 0]).permutation(n_examples)
    return [np.sort(share) for share in np.array_split(order, n_clients)]


def dirichlet(labels: np.ndarray, n_clients: int, alpha: float, seed: int) -> list[np.ndarray]:
    """Per class c: proportions p ~ Dir(alpha 1_K) over the K clients, its shuffled examples cut at
    the cumulative shares round(cumsum(p) n_c). Drawn again (seeded) until no client is empty."""
    labels = np.asarray(labels)
    check_clients(n_clients, len(labels))
    if not alpha > 0:
        raise ConfigError(f"the Dirichlet alpha must be > 0, got {alpha}")
    rng = np.random.default_rng([seed, 1])
    for _ in range(DIRICHLET_TRIES):
        shares: list[list[np.ndarray]] = [[] for _ in range(n_clients)]
        for c in np.unique(labels):
            members = rng.permutation(np.flatnonzero(labels == c))
            cuts = np.round(np.cumsum(rng.dirichlet(np.full(n_clients, alpha)))[:-1] * len(members))
            for k, part in enumerate(np.split(members, cuts.astype(int))):
                shares[k].append(part)
        result = [np.sort(np.concatenate(parts)) for parts in shares]
        if all(len(r) for r in result):
            return result
    raise ConfigError(f"dirichlet:{alpha:g} left a client with no examples in {DIRICHLET_TRIES} draws of "
                      f"{len(labels)} examples among {n_clients} clients; use fewer clients or a larger alpha")


def by_groups(groups: np.ndarray, n_clients: int, column: str) -> list[np.ndarray]:
    """Whole groups per client: groups by size, largest first, each to the client holding fewest
    examples so far (ties: the lower client id). Needs at least as many groups as clients."""
    groups = np.asarray(groups)
    check_clients(n_clients, len(groups))
    names, counts = np.unique(groups, return_counts=True)
    if len(names) < n_clients:
        shown = ", ".join(map(str, names[:5])) + (" ..." if len(names) > 5 else "")
        raise ConfigError(f"--partition groups:{column}: {len(names)} groups ({shown}) for {n_clients} clients; "
                          f"use --clients <= {len(names)}, or iid / dirichlet:ALPHA")
    held = [[] for _ in range(n_clients)]  # type: list[list[np.ndarray]]
    sizes = np.zeros(n_clients, dtype=np.int64)
    for g in np.argsort(-counts, kind="stable"):
        k = int(np.argmin(sizes))
        held[k].append(np.flatnonzero(groups == names[g]))
        sizes[k] += counts[g]
    return [np.sort(np.concatenate(parts)) for parts in held]


def partition(task: object, spec: PartitionSpec, n_clients: int, seed: int) -> list[np.ndarray]:
    """The training-example indices of each of `n_clients` clients, for a task that can be
    partitioned (tasks.base.Partitionable); one clear line for a task that cannot."""
    if not can_partition(task):
        raise ConfigError(f"the {getattr(task, 'name', type(task).__name__)} task cannot be partitioned among "
                          "clients: federated learning needs a task whose training examples have labels "
                          "(classification, image_classification)")
    if spec.kind == "groups":
        reader = getattr(task, "example_groups", None)
        if not callable(reader):
            raise ConfigError(f"the {getattr(task, 'name', 'this')} task's data has no natural groups: "
                              "use --partition iid or dirichlet:ALPHA")
        return by_groups(reader(spec.column), n_clients, spec.column or DEFAULT_GROUP_COLUMN)
    labels = task.example_labels()  # type: ignore[attr-defined]
    if spec.kind == "iid":
        return iid(len(labels), n_clients, seed)
    return dirichlet(labels, n_clients, spec.alpha or 0.0, seed)
