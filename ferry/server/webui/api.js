// This server's API: the models list, streamed chat completions (SSE), /metrics.
// The API key, when the server has one, lives in sessionStorage only (this tab, until it
// closes) and goes out as "Authorization: Bearer <key>" to this same origin.

const KEY = "ferry.apiKey";

export class AuthError extends Error {}

export function apiKey() {
  return sessionStorage.getItem(KEY) || "";
}

export function setApiKey(key) {
  if (key) sessionStorage.setItem(KEY, key);
  else sessionStorage.removeItem(KEY);
}

function headers(extra = {}) {
  const key = apiKey();
  return key ? { ...extra, Authorization: `Bearer ${key}` } : extra;
}

async function errorOf(response) {
  let message = `HTTP ${response.status}`;
  try {
    const body = await response.json();
    if (body && body.error && body.error.message) message = body.error.message;
  } catch (_) { /* not JSON */ }
  return response.status === 401 ? new AuthError(message) : new Error(message);
}

/** The served model and its adapters: [{id, parent}] from GET /v1/models. */
export async function listModels() {
  const response = await fetch("/v1/models", { headers: headers() });
  if (!response.ok) throw await errorOf(response);
  const body = await response.json();
  return (body.data || []).map((m) => ({ id: m.id, parent: m.parent || null }));
}

/** Split an SSE byte stream into the data of its events ("data: ..." lines). */
export async function* sseData(body) {
  const reader = body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    buffer += decoder.decode(value || new Uint8Array(), { stream: !done });
    const events = buffer.split(/\r?\n\r?\n/);
    buffer = done ? "" : events.pop();
    for (const event of events) {
      const data = event.split(/\r?\n/).filter((l) => l.startsWith("data:"))
        .map((l) => l.slice(5).replace(/^ /, "")).join("\n");
      if (data) yield data;
    }
    if (done) return;
  }
}

/**
 * POST /v1/chat/completions with "stream": true. Calls onDelta(text) per new piece and
 * onChunk(chunk) per parsed chunk; resolves to {finishReason, usage, id, trace}: `trace`
 * is the attention trace of a traced request (`debug_trace: true`), which the server puts
 * on the chunk that finishes the choice, so no second request (and no retention window)
 * is involved. Aborting `signal` stops the stream (the server then aborts the request and
 * frees its KV).
 */
export async function streamChat(body, { signal, onDelta, onChunk }) {
  const response = await fetch("/v1/chat/completions", {
    method: "POST", signal,
    headers: headers({ "Content-Type": "application/json" }),
    body: JSON.stringify({ ...body, stream: true, stream_options: { include_usage: true } }),
  });
  if (!response.ok) throw await errorOf(response);
  const result = { finishReason: null, usage: null, id: null, trace: null };
  for await (const data of sseData(response.body)) {
    if (data === "[DONE]") break;
    const chunk = JSON.parse(data);
    if (chunk.error) throw new Error(chunk.error.message || "the server reported an error");
    result.id = chunk.id || result.id;
    if (chunk.usage) result.usage = chunk.usage;
    if (onChunk) onChunk(chunk);
    for (const choice of chunk.choices || []) {
      if (choice.delta && choice.delta.content) onDelta(choice.delta.content);
      if (choice.finish_reason) result.finishReason = choice.finish_reason;
      if (choice.debug_trace && !choice.index) result.trace = choice.debug_trace;   // n = 1
    }
  }
  return result;
}

/** The Prometheus text of GET /metrics. */
export async function fetchMetrics() {
  const response = await fetch("/metrics");
  if (!response.ok) throw await errorOf(response);
  return response.text();
}
