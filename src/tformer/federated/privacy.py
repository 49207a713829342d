"""Client-level differential privacy: each round the server clips every client's update (its
weights minus the global model's) to L2 norm C and adds Gaussian noise of standard deviation
z C / m to the mean of the m updates (Flower's `DifferentialPrivacyServerSideFixedClipping`;
McMahan et al. 2018, DP-FedAvg). The mean is unweighted under DP (every client weighs 1), so one
client's influence is bounded by C whatever its number of examples.

The budget spent after T rounds, for add-or-remove-one-client neighbours: Rényi DP of the
Gaussian mechanism, alpha / (2 z^2) per round (Mironov 2017, Prop. 7), composed by addition,
converted with epsilon = RDP(alpha) + log(1 / delta) / (alpha - 1) (Prop. 3) at the best order.
Sampling a fraction of the clients is not credited (no amplification), so with --fraction < 1
the epsilon reported is an upper bound.
"""

from __future__ import annotations

import math

import numpy as np
from flwr.serverapp.strategy import DifferentialPrivacyServerSideFixedClipping, Strategy

ORDERS = np.concatenate([np.linspace(1.01, 10.0, 900), np.linspace(10.05, 2000.0, 39_900)])


def gaussian_epsilon(noise_multiplier: float, releases: int, delta: float) -> tuple[float, float]:
    """(epsilon, the Rényi order that gives it) after `releases` Gaussian releases of noise
    multiplier z (sensitivity 1, std z) at `delta`; inf for no release of noise."""
    if releases == 0:
        return 0.0, math.nan
    if noise_multiplier <= 0:
        return math.inf, math.nan
    epsilons = releases * ORDERS / (2 * noise_multiplier**2) + math.log(1 / delta) / (ORDERS - 1)
    best = int(np.argmin(epsilons))
    return float(epsilons[best]), float(ORDERS[best])


def private(strategy: Strategy, noise_multiplier: float, clipping_norm: float, sampled: int) -> Strategy:
    """`strategy` with server-side fixed clipping and Gaussian noise (Flower's wrapper)."""
    return DifferentialPrivacyServerSideFixedClipping(strategy, noise_multiplier=noise_multiplier,
                                                      clipping_norm=clipping_norm, num_sampled_clients=sampled)
