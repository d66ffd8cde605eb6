"""CPU package energy from Linux RAPL (``/sys/class/powercap/intel-rapl:N/energy_uj``).

Each top-level ``intel-rapl:N`` zone is one CPU package; its counter counts microjoules and
wraps at ``max_energy_range_uj``. The reader sums the packages and unwraps each counter,
so it returns a monotonic total in joules. Many kernels make ``energy_uj`` readable by root
only: then there is no reader, and no energy is reported.
"""
from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

POWERCAP = Path("/sys/class/powercap")
_PACKAGE = re.compile(r"^intel-rapl:\d+$")   # intel-rapl:0:1 and deeper are sub-domains


class _Zone:
    def __init__(self, path: Path) -> None:
        self.path = path / "energy_uj"
        try:
            self.wrap = int((path / "max_energy_range_uj").read_text())
        except (OSError, ValueError):
            self.wrap = 0
        self.last = self.read_raw()
        self.total = 0

    def read_raw(self) -> int:
        return int(self.path.read_text())

    def advance(self) -> None:
        raw = self.read_raw()
        delta = raw - self.last
        if delta < 0 and self.wrap:
            delta += self.wrap
        self.total += max(0, delta)
        self.last = raw


def rapl_reader(root: Path = POWERCAP) -> Callable[[], float | None] | None:
    """A callable returning the CPU packages' energy in joules since it was made (None on a
    failed read), or None where RAPL is absent or unreadable."""
    try:
        zones = [_Zone(p) for p in sorted(root.iterdir()) if _PACKAGE.match(p.name)]
    except (OSError, ValueError):
        return None
    if not zones:
        return None

    def read() -> float | None:
        try:
            for zone in zones:
                zone.advance()
        except (OSError, ValueError):
            return None
        return sum(zone.total for zone in zones) / 1e6
    return read
