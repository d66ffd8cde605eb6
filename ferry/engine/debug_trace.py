"""The engine's side of the attention debug trace: it gathers the runner's per-token
records of each traced request and, when the request finishes, turns them into the
trace users read (the response's ``debug_trace``, ``GET /debug/trace/{id}``, JSON lines
in ``debug_trace_dir``).

The trace: ``positions`` (the traced query positions), ``tokens`` (the text of every token
of the sequence, so a position can be shown), and ``layers[l]["heads"][h]`` with that
head's ``entropy`` per traced position (nats), its ``top`` attended ``[position, weight]``
pairs per traced position, and ``flagged``: the indices into ``positions`` where the
entropy jumped by more than ``debug_trace_entropy_jump`` from the position before (also
listed in ``anomalies``). Pure Python.
"""
from __future__ import annotations

import json
import time
from pathlib import Path


def entropy_jumps(entropies: list[float], threshold: float) -> list[int]:
    """Indices ``t`` where a head's entropy rose or fell by more than ``threshold`` from
    token ``t - 1`` to ``t`` (the anomaly flag)."""
    return [t for t in range(1, len(entropies))
            if abs(entropies[t] - entropies[t - 1]) > threshold]


def build_trace(records: list[dict], entropy_jump: float) -> dict:
    """The trace of one sequence from its per-position records (sorted here)."""
    records = sorted(records, key=lambda r: r["position"])
    positions = [r["position"] for r in records]
    num_layers = len(records[0]["entropy"]) if records else 0
    num_heads = len(records[0]["entropy"][0]) if num_layers else 0
    layers, anomalies = [], []
    for layer in range(num_layers):
        heads = []
        for head in range(num_heads):
            entropy = [r["entropy"][layer][head] for r in records]
            top = [[[p, w] for p, w in zip(r["top_positions"][layer][head],
                                           r["top_weights"][layer][head]) if p >= 0]
                   for r in records]
            flagged = entropy_jumps(entropy, entropy_jump)
            heads.append({"entropy": [round(e, 6) for e in entropy], "top": top,
                          "flagged": flagged})
            anomalies += [{"layer": layer, "head": head, "position": positions[t],
                           "from": round(entropy[t - 1], 6), "to": round(entropy[t], 6)}
                          for t in flagged]
        layers.append({"heads": heads})
    return {"positions": positions, "num_layers": num_layers, "num_heads": num_heads,
            "entropy_jump": entropy_jump, "layers": layers, "anomalies": anomalies}


class TraceCollector:
    """Records per request id (children of ``n > 1`` keep their own ids ``id#i``)."""

    def __init__(self, *, max_tokens: int, entropy_jump: float,
                 trace_dir: str | None = None) -> None:
        self.max_tokens = max_tokens
        self.entropy_jump = entropy_jump
        self.trace_dir = Path(trace_dir) if trace_dir else None
        self._records: dict[str, dict[int, dict]] = {}

    def add(self, traces: dict[str, list[dict]]) -> None:
        """One step's records. A position traced again (a preempted request recomputes)
        replaces the earlier record; at most ``max_tokens`` positions are kept."""
        for request_id, records in traces.items():
            kept = self._records.setdefault(request_id, {})
            for record in records:
                if record["position"] in kept or len(kept) < self.max_tokens:
                    kept[record["position"]] = record

    def drop(self, request_id: str) -> None:
        for key in self._keys(request_id):
            del self._records[key]

    def is_traced(self, request_id: str) -> bool:
        """Whether the request (or one of its ``n`` samples) has records."""
        return bool(self._keys(request_id))

    def finish(self, request_id: str, token_texts: list[list[str]]) -> dict | None:
        """The trace of a finished request (``token_texts``: each completion's sequence,
        prompt then output, as text per token); None when it was not traced."""
        keys = self._keys(request_id)
        if not keys:
            return None
        traces = []
        for index, key in enumerate(keys):
            trace = build_trace(list(self._records.pop(key).values()), self.entropy_jump)
            trace["tokens"] = token_texts[index] if index < len(token_texts) else []
            traces.append(trace)
        result = traces[0] if len(traces) == 1 else {"completions": traces}
        self._write(request_id, result)
        return result

    def _keys(self, request_id: str) -> list[str]:
        if request_id in self._records:
            return [request_id]
        prefix = request_id + "#"
        return sorted((k for k in self._records if k.startswith(prefix)),
                      key=lambda k: int(k[len(prefix):]))

    def _write(self, request_id: str, trace: dict) -> None:
        if self.trace_dir is None:
            return
        self.trace_dir.mkdir(parents=True, exist_ok=True)
        path = self.trace_dir / time.strftime("attention-%Y-%m-%d.jsonl", time.gmtime())
        with path.open("a") as file:
            file.write(json.dumps({"request_id": request_id, "time": time.time(),
                                   "debug_trace": trace}) + "\n")
