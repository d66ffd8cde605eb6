"""Thermal and power guard: lower the prefill limits while the device runs hot.

Above ``thermal_limit_c`` (or ``power_limit_w`` where set) the guard throttles: the
scheduler gives prefills a quarter of the token budget and one prompt per step (decodes
are untouched). It releases once the temperature is ``HYSTERESIS_C`` below the limit and
the power ``HYSTERESIS_W_SHARE`` below its limit, so it does not flap at the boundary.
The readings come from the platform's probes; without them the guard stays off. Pure
Python.
"""
from __future__ import annotations

from collections.abc import Callable

Probe = Callable[[], "float | None"]
HYSTERESIS_C = 5.0
HYSTERESIS_W_SHARE = 0.1
READ_EVERY_STEPS = 16   # a management-library read costs tens of microseconds


class ThermalGuard:
    """``update()`` each step: reads the probes every few steps, returns ``throttled``."""

    def __init__(self, limit_c: float, power_limit_w: float | None, *,
                 temperature: Probe | None = None, power: Probe | None = None,
                 read_every: int = READ_EVERY_STEPS) -> None:
        self.limit_c = limit_c
        self.power_limit_w = power_limit_w
        self.temperature_probe = temperature
        self.power_probe = power if power_limit_w is not None else None
        self.read_every = max(1, read_every)
        self.throttled = False
        self.num_throttles = 0
        self.temperature_c: float | None = None
        self.power_w: float | None = None
        self._steps = 0

    @property
    def active(self) -> bool:
        return self.temperature_probe is not None or self.power_probe is not None

    def update(self) -> bool:
        if not self.active:
            return False
        self._steps += 1
        if (self._steps - 1) % self.read_every:
            return self.throttled
        self.temperature_c = _read(self.temperature_probe)
        self.power_w = _read(self.power_probe)
        hot = self.temperature_c is not None and self.temperature_c > self.limit_c
        hungry = (self.power_w is not None and self.power_limit_w is not None
                  and self.power_w > self.power_limit_w)
        if not self.throttled and (hot or hungry):
            self.throttled = True
            self.num_throttles += 1
        elif self.throttled and self._cooled():
            self.throttled = False
        return self.throttled

    def _cooled(self) -> bool:
        cool = self.temperature_c is None or self.temperature_c <= self.limit_c - HYSTERESIS_C
        calm = (self.power_w is None or self.power_limit_w is None
                or self.power_w <= self.power_limit_w * (1 - HYSTERESIS_W_SHARE))
        return cool and calm


def _read(probe: Probe | None) -> float | None:
    if probe is None:
        return None
    try:
        return probe()
    except Exception:  # noqa: BLE001 - a flaky driver read is no reading
        return None
