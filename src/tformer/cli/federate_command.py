"""`tformer federate RECIPE --clients N --rounds R --partition iid|dirichlet:A|groups[:COLUMN]`:
federated training on Flower (`tformer.federated`). By default Flower's simulation runtime plays
the clients on this machine; with `--app DIR` it writes the Flower app of a multi-process
deployment (a SuperLink and one SuperNode per client) and prints the commands that run it."""

from __future__ import annotations

import argparse
import sys

from tformer.cli.arguments import energy_option, finite_number, whole_number
from tformer.training.report import last_value

MAX_CLIENTS = 10_000
MAX_ROUNDS = 100_000


def add_federate_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("federate", help="federated training of a recipe on Flower: clients hold shares of the data "
                       "(IID, Dirichlet non-IID, natural groups); resumes from the last round")
    energy_option(p)
    p.add_argument("recipe", help="a recipe YAML file or a shipped recipe name (a classification task)")
    p.add_argument("--clients", type=whole_number(1, MAX_CLIENTS), required=True, help="data holders")
    p.add_argument("--rounds", type=whole_number(1, MAX_ROUNDS), required=True,
                   help="federated rounds (a larger number resumes an earlier federation in --out)")
    p.add_argument("--partition", default="iid", help="iid | dirichlet:ALPHA (non-IID by label; smaller "
                   "alpha, fewer classes per client) | groups[:COLUMN] (natural groups, e.g. the source of "
                   "a sentence; default column: source)")
    p.add_argument("--strategy", default="fedavg", choices=["fedavg", "fedprox"])
    p.add_argument("--mu", type=finite_number, default=0.01, help="FedProx's proximal weight")
    p.add_argument("--fraction", type=finite_number, default=1.0, help="share of the clients that train "
                   "each round (sampled by Flower)")
    p.add_argument("--local-steps", type=whole_number(0), default=0, help="optimizer steps per client per "
                   "round (default 0: the recipe's max_steps over rounds x sampled clients, as many "
                   "examples as the centralised run)")
    p.add_argument("--seed", type=int, default=0, help="the partition's seed")
    p.add_argument("--out", default=None, help="the federation's run directory (default: the recipe's "
                   "run_dir + '-federated')")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="recipe override, e.g. training.lr=3e-4")
    p.add_argument("--fresh", action="store_true", help="start over in --out instead of resuming")
    dp = p.add_argument_group("differential privacy (client level: updates clipped, Gaussian noise on their mean)")
    dp.add_argument("--dp-noise", type=finite_number, default=0.0, metavar="Z", help="noise multiplier (0: off)")
    dp.add_argument("--dp-clip", type=finite_number, default=0.0, metavar="C", help="L2 norm bound of an update")
    dp.add_argument("--dp-delta", type=finite_number, default=1e-5, help="the delta epsilon is reported at")
    p.add_argument("--cpus-per-client", type=whole_number(1), default=None,
                   help="simulation: cores per client actor (default: all; one client trains at a time)")
    p.add_argument("--app", default=None, metavar="DIR", help="write the Flower app of a multi-process "
                   "deployment here and print the commands that run it, instead of simulating")
    p.add_argument("--port", type=whole_number(1024, 65535), default=9093, help="--app: the SuperLink's port")
    p.set_defaults(func=cmd_federate)


def cmd_federate(args: argparse.Namespace) -> None:
    from pathlib import Path

    from tformer.cli.arguments import recipe_path
    from tformer.federated.spec import FederationSpec, absolute_paths
    from tformer.training.recipe import load_recipe

    recipe = load_recipe(recipe_path(args.recipe), args.set or [])
    out = Path(args.out or f"{recipe.run_dir}-federated").expanduser().resolve()
    spec = FederationSpec(recipe=absolute_paths(recipe), clients=args.clients, rounds=args.rounds,
                          partition=args.partition, strategy=args.strategy, mu=args.mu, fraction=args.fraction,
                          local_steps=args.local_steps, out=str(out), seed=args.seed, dp_noise=args.dp_noise,
                          dp_clip=args.dp_clip, dp_delta=args.dp_delta)
    if args.app:
        return _write_app(spec, args)
    from tformer.federated.simulate import simulate

    print(f"federating {args.recipe}: {spec.clients} clients, {spec.rounds} rounds, {spec.partition}, "
          f"{spec.strategy}, {spec.steps_per_round} local steps per round ...", file=sys.stderr)
    done = simulate(spec, fresh=args.fresh, cpus_per_client=args.cpus_per_client)
    print(f"done: {done} rounds; metrics.jsonl, clients.jsonl, federation.png and checkpoints/ in {out} "
          f"(tformer evaluate {out})")
    joules, co2, method = (last_value(out / "metrics.jsonl", key) for key in ("energy_j", "co2_g", "energy_method"))
    if joules is not None:
        print(f"energy of the federation (server and clients): {joules:.4g} J ({joules / 3.6e6:.3g} kWh, {method}), "
              f"{co2:.3g} g CO2e")


def _write_app(spec: object, args: argparse.Namespace) -> None:
    from tformer.federated.deploy import commands, write_app

    folder = write_app(spec, args.app, port=args.port, fresh=args.fresh)  # type: ignore[arg-type]
    print(f"wrote the Flower app to {folder}; run each line in its own terminal (TFORMER_DATA_DIR set where "
          "the data needs it), the last one once the SuperNodes are up:")
    for line in commands(spec, folder, port=args.port):  # type: ignore[arg-type]
        print(f"  {line}")
