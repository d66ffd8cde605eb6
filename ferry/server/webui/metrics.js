// The live metrics panel: GET /metrics (Prometheus text) parsed here, every 2 s.

/** {name: [{labels: {..}, value}]} of a Prometheus text exposition. */
export function parsePrometheus(text) {
  const samples = {};
  for (const line of text.split("\n")) {
    if (!line || line.startsWith("#")) continue;
    const match = line.match(/^([a-zA-Z_:][\w:]*)(?:\{(.*)\})?\s+(\S+)/);
    if (!match) continue;
    const labels = {};
    for (const pair of (match[2] || "").matchAll(/(\w+)="((?:[^"\\]|\\.)*)"/g)) labels[pair[1]] = pair[2];
    (samples[match[1]] = samples[match[1]] || []).push({ labels, value: Number(match[3]) });
  }
  return samples;
}

function first(samples, name) {
  const list = samples[name];
  return list && list.length ? list[0].value : null;
}

/** A quantile of a cumulative histogram (`name`_bucket), interpolated inside its bucket as
 *  Prometheus's histogram_quantile does; null before any observation. */
export function histogramQuantile(samples, name, q) {
  const buckets = (samples[`${name}_bucket`] || [])
    .map((s) => ({ le: s.labels.le === "+Inf" ? Infinity : Number(s.labels.le), count: s.value }))
    .sort((a, b) => a.le - b.le);
  const total = buckets.length ? buckets[buckets.length - 1].count : 0;
  if (!total) return null;
  const rank = q * total;
  let lower = 0;
  let below = 0;
  for (const bucket of buckets) {
    if (bucket.count >= rank) {
      if (bucket.le === Infinity) return lower;  // past the last finite bound
      const inBucket = bucket.count - below;
      return inBucket ? lower + (bucket.le - lower) * ((rank - below) / inBucket) : bucket.le;
    }
    lower = bucket.le;
    below = bucket.count;
  }
  return lower;
}

function seconds(value) {
  if (value === null) return "–";
  return value < 1 ? `${(value * 1000).toFixed(0)} ms` : `${value.toFixed(2)} s`;
}

function percent(value) {
  return value === null ? "–" : `${(value * 100).toFixed(1)} %`;
}

function number(value, digits = 0) {
  return value === null ? "–" : value.toFixed(digits);
}

/** The panel's figures from parsed samples: {element id: text}. */
export function panelFigures(samples) {
  const figures = {
    "metric-tps": number(first(samples, "llm_tokens_per_second"), 1),
    "metric-ttft-p50": seconds(histogramQuantile(samples, "llm_time_to_first_token_seconds", 0.5)),
    "metric-ttft-p99": seconds(histogramQuantile(samples, "llm_time_to_first_token_seconds", 0.99)),
    "metric-running": number(first(samples, "llm_requests_running")),
    "metric-waiting": number(first(samples, "llm_requests_waiting")),
    "metric-kv-usage": percent(first(samples, "llm_kv_cache_usage_ratio")),
    "metric-kv-hit": percent(first(samples, "llm_kv_cache_hit_ratio")),
    "metric-page-faults": number(first(samples, "llm_kv_cache_page_faults_total")),
  };
  const energy = first(samples, "llm_energy_joules_total");
  if (energy !== null) {  // only where the hardware reports energy
    figures["metric-energy"] = `${energy.toFixed(1)} J`;
    figures["metric-tpj"] = number(first(samples, "llm_tokens_per_joule"), 2);
  }
  return figures;
}

/** Poll /metrics every `periodMs` into the panel's elements. */
export function startMetrics(fetchMetrics, periodMs = 2000) {
  const note = document.getElementById("metrics-note");
  async function refresh() {
    try {
      const figures = panelFigures(parsePrometheus(await fetchMetrics()));
      for (const [id, text] of Object.entries(figures)) document.getElementById(id).textContent = text;
      const hasEnergy = "metric-energy" in figures;
      document.querySelectorAll(".energy").forEach((el) => { el.hidden = !hasEnergy; });
      note.textContent = "TTFT percentiles since the server started.";
    } catch (error) {
      note.textContent = `metrics unavailable: ${error.message}`;
    }
  }
  refresh();
  return setInterval(refresh, periodMs);
}
