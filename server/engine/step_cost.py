"""The step-cost model: how long an engine step takes, fitted online from the engine's own steps.

Owns what the subnet-choice policy knows about speed. Every engine step reports its duration,
the effective parameter count of the widest subnet in it, and the tokens it computed; a linear
model `seconds = base + per_param * widest + per_token * tokens` is fitted to them by recursive
least squares with exponential forgetting (recent steps weigh more, so the model follows changes
in load, machine or resident widths). The recent ratio of measured to predicted steps turns the
fitted mean into a p95 estimate (tiers' targets are p95s).

Plain Python. Deliberately does not know: the engine, the policies, or Prometheus.
"""

from __future__ import annotations

import threading
from collections import deque

from policies.snapshots import StepCost

_SCALE = (1.0, 1e-9, 1e-2)  # features scaled to similar magnitudes: 1, params (in B), tokens/100


class StepCostModel:
    def __init__(self, forgetting: float = 0.98, prior: StepCost | None = None):
        self.forgetting = forgetting
        self.samples = 0
        n = 3
        self._p = [[1e3 if i == j else 0.0 for j in range(n)] for i in range(n)]  # covariance
        self._w = [0.0, 0.0, 0.0]  # weights on the scaled features
        self._lock = threading.Lock()
        self._ratios: deque[float] = deque(maxlen=100)  # measured / predicted, recent steps
        if prior is not None:
            self._w = [
                prior.base / _SCALE[0],
                prior.per_param / _SCALE[1],
                prior.per_token / _SCALE[2],
            ]

    def record(self, seconds: float, widest_params: int, tokens: int) -> None:
        x = [_SCALE[0], widest_params * _SCALE[1], tokens * _SCALE[2]]
        lam = self.forgetting
        with self._lock:
            p, w = self._p, self._w
            px = [sum(p[i][j] * x[j] for j in range(3)) for i in range(3)]
            denom = lam + sum(x[i] * px[i] for i in range(3))
            gain = [v / denom for v in px]
            predicted = sum(w[i] * x[i] for i in range(3))
            if self.samples >= 8 and predicted > 0:
                self._ratios.append(seconds / predicted)
            error = seconds - predicted
            self._w = [w[i] + gain[i] * error for i in range(3)]
            self._p = [[(p[i][j] - gain[i] * px[j]) / lam for j in range(3)] for i in range(3)]
            self.samples += 1

    def snapshot(self) -> StepCost:
        with self._lock:
            w = self._w
            # A negative per-unit cost is noise from too few distinct samples: clamp at 0.
            ratios = sorted(self._ratios)
            p95 = ratios[int(0.95 * (len(ratios) - 1))] if len(ratios) >= 10 else 1.0
            return StepCost(
                base=max(0.0, w[0] * _SCALE[0]),
                per_param=max(0.0, w[1] * _SCALE[1]),
                per_token=max(0.0, w[2] * _SCALE[2]),
                samples=self.samples,
                p95_factor=max(1.0, p95),
            )
