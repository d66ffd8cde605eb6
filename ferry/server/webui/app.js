// The chat page: conversations, streaming, stop, regenerate, edit and resend, settings,
// the model/adapter selector, the API key prompt and the live metrics panel.
import { AuthError, apiKey, fetchMetrics, listModels, setApiKey, streamChat } from "./api.js";
import { renderHeatmap } from "./heatmap.js";
import { renderMarkdown } from "./markdown.js";
import { startMetrics } from "./metrics.js";
import { Store, loadSettings, saveSettings } from "./store.js";

const $ = (id) => document.getElementById(id);
const store = new Store();
let controller = null;  // the AbortController of the generation in flight
const traces = new WeakMap();  // message -> its attention trace (kept in memory only: large)

// ------------------------------------------------------------------ settings
const SETTING_INPUTS = { system: "system-prompt", temperature: "temperature", top_p: "top-p",
                         max_tokens: "max-tokens", seed: "seed", json_schema: "json-schema" };
const CHECKBOXES = { trace: "debug-trace", json: "json-mode" };

function restoreSettings() {
  const settings = loadSettings();
  for (const [key, id] of Object.entries(SETTING_INPUTS)) {
    if (settings[key] !== undefined) $(id).value = settings[key];
    $(id).addEventListener("change", storeSettings);
  }
  for (const [key, id] of Object.entries(CHECKBOXES)) {
    $(id).checked = Boolean(settings[key]);
    $(id).addEventListener("change", storeSettings);
  }
  $("model").addEventListener("change", storeSettings);
  showSchemaField();
  $("json-mode").addEventListener("change", showSchemaField);
}

function showSchemaField() {
  $("json-schema-field").hidden = !$("json-mode").checked;
}

function storeSettings() {
  const settings = { model: $("model").value };
  for (const [key, id] of Object.entries(SETTING_INPUTS)) settings[key] = $(id).value;
  for (const [key, id] of Object.entries(CHECKBOXES)) settings[key] = $(id).checked;
  saveSettings(settings);
}

/** The request body's sampling fields; blank ones are left to the server. */
function samplingFields() {
  const fields = {};
  const numeric = { temperature: "temperature", top_p: "top-p", max_tokens: "max-tokens",
                    seed: "seed" };
  for (const [key, id] of Object.entries(numeric)) {
    const raw = $(id).value.trim();
    if (raw === "") continue;
    const value = Number(raw);
    if (Number.isFinite(value)) fields[key] = key === "max_tokens" || key === "seed" ? Math.trunc(value) : value;
  }
  return fields;
}

/** The request's response_format with "Answer as JSON" on (else none): the schema typed
 *  in, or any JSON object when it is empty. Throws on a schema that is not JSON. */
function responseFormat() {
  if (!$("json-mode").checked) return {};
  const raw = $("json-schema").value.trim();
  if (!raw) return { response_format: { type: "json_object" } };
  let schema;
  try {
    schema = JSON.parse(raw);
  } catch (error) {
    throw new Error(`The JSON schema is not valid JSON: ${error.message}`);
  }
  return { response_format: { type: "json_schema", json_schema: { name: "webui", schema } } };
}

// ------------------------------------------------------------------ models and key
async function loadModels() {
  try {
    const models = await listModels();
    const select = $("model");
    const wanted = loadSettings().model;
    select.replaceChildren(...models.map((m) => {
      const option = document.createElement("option");
      option.value = m.id;
      option.textContent = m.parent ? `${m.id} (adapter of ${m.parent})` : m.id;
      return option;
    }));
    if (models.some((m) => m.id === wanted)) select.value = wanted;
    $("key-dialog").hidden = true;
    setStatus("");
  } catch (error) {
    if (error instanceof AuthError) askForKey(apiKey() ? "That key was refused." : "");
    else setStatus(`could not list models: ${error.message}`);
  }
}

function askForKey(problem) {
  $("key-error").textContent = problem;
  $("key-dialog").hidden = false;
  $("key-input").focus();
}

$("key-form").addEventListener("submit", (event) => {
  event.preventDefault();
  setApiKey($("key-input").value.trim());
  $("key-input").value = "";
  loadModels();
});

function setStatus(text) {
  $("status").textContent = text;
}

// ------------------------------------------------------------------ rendering
function renderSidebar() {
  const list = $("conversations");
  list.replaceChildren(...store.conversations.map((c) => {
    const item = document.createElement("li");
    item.className = c.id === store.currentId ? "active" : "";
    item.dataset.id = c.id;
    const title = document.createElement("span");
    title.className = "title";
    title.textContent = c.title;
    title.addEventListener("click", () => { if (!controller) { store.select(c.id); render(); } });
    const remove = button("×", "Delete conversation", () => {
      if (!controller) { store.remove(c.id); render(); }
    });
    remove.className = "link delete";
    item.append(title, remove);
    return item;
  }));
}

function button(text, label, onClick) {
  const node = document.createElement("button");
  node.type = "button";
  node.textContent = text;
  node.title = label;
  node.addEventListener("click", onClick);
  return node;
}

function messageNode(message, index) {
  const node = document.createElement("div");
  node.className = `message ${message.role}`;
  node.dataset.index = index;
  const actions = document.createElement("span");
  actions.className = "actions";
  if (message.role === "user") actions.append(button("Edit", "Edit and resend", () => startEdit(index)));
  const role = document.createElement("div");
  role.className = "role";
  role.textContent = message.role;
  const content = document.createElement("div");
  content.className = "content";
  node.append(actions, role, content);
  fillMessage(node, message);
  return node;
}

/** (Re)draw a message's content: Markdown for the assistant, plain text for the user. */
function fillMessage(node, message) {
  const content = node.querySelector(".content");
  if (message.role === "assistant") renderMarkdown(content, message.content);
  else content.textContent = message.content;
  node.querySelectorAll(".error, .stopped, .heatmap").forEach((n) => n.remove());
  if (message.error) node.append(note("error", message.error));
  if (message.stopped) node.append(note("stopped", "stopped"));
  if (traces.has(message)) node.append(renderHeatmap(traces.get(message)));
}

function note(cls, text) {
  const node = document.createElement("div");
  node.className = cls;
  node.textContent = text;
  return node;
}

function renderMessages() {
  const messages = store.current().messages;
  $("messages").replaceChildren(...messages.map(messageNode));
  scrollDown();
}

function scrollDown() {
  const box = $("messages");
  box.scrollTop = box.scrollHeight;
}

function render() {
  renderSidebar();
  renderMessages();
  setBusy(Boolean(controller));
}

function setBusy(busy) {
  $("send").disabled = busy;
  $("regenerate").disabled = busy;
  $("stop").hidden = !busy;
}

// ------------------------------------------------------------------ generating
function requestMessages(conversation) {
  const system = $("system-prompt").value.trim();
  const history = conversation.messages.filter((m) => !m.error || m.content)
    .map((m) => ({ role: m.role, content: m.content }));
  return system ? [{ role: "system", content: system }, ...history] : history;
}

/** Stream an assistant answer to the conversation's messages so far. */
async function generate() {
  const conversation = store.current();
  let format;
  try {
    format = responseFormat();
  } catch (error) {
    setStatus(error.message);   // nothing is sent: the schema is fixed first
    return;
  }
  const body = { model: $("model").value || undefined, messages: requestMessages(conversation),
                 ...samplingFields(), ...format };
  if ($("debug-trace").checked) body.debug_trace = true;
  const message = { role: "assistant", content: "" };
  conversation.messages.push(message);
  const node = messageNode(message, conversation.messages.length - 1);
  $("messages").append(node);
  controller = new AbortController();
  setBusy(true);
  setStatus("generating…");
  let pending = false;
  const redraw = () => { pending = false; fillMessage(node, message); scrollDown(); };
  try {
    const result = await streamChat(body, {
      signal: controller.signal,
      onDelta: (text) => {
        message.content += text;
        if (!pending) { pending = true; requestAnimationFrame(redraw); }
      },
    });
    message.finishReason = result.finishReason;
    setStatus(result.usage ? `${result.usage.completion_tokens} tokens` : "");
    if (result.trace) traces.set(message, result.trace);   // from the stream's final chunk
  } catch (error) {
    if (error.name === "AbortError") {
      message.stopped = true;
      setStatus("stopped");
    } else {
      message.error = error.message;
      setStatus("");
      if (error instanceof AuthError) askForKey("The server asks for an API key.");
    }
  } finally {
    controller = null;
    store.save();
    redraw();
    setBusy(false);
  }
}

async function send() {
  const text = $("prompt").value;
  if (!text.trim() || controller) return;
  try {
    responseFormat();   // a schema that is not JSON keeps the message in the box
  } catch (error) {
    setStatus(error.message);
    return;
  }
  const conversation = store.current();
  conversation.messages.push({ role: "user", content: text });
  if (conversation.messages.filter((m) => m.role === "user").length === 1) store.retitle(conversation);
  $("prompt").value = "";
  store.save();
  render();
  await generate();
}

async function regenerate() {
  const conversation = store.current();
  if (controller || !conversation.messages.length) return;
  if (conversation.messages[conversation.messages.length - 1].role === "assistant") {
    conversation.messages.pop();
  }
  if (!conversation.messages.length) return;
  store.save();
  renderMessages();
  await generate();
}

function startEdit(index) {
  if (controller) return;
  const conversation = store.current();
  const node = $("messages").querySelector(`.message[data-index="${index}"]`);
  const content = node.querySelector(".content");
  const editor = document.createElement("textarea");
  editor.className = "editor";
  editor.value = conversation.messages[index].content;
  const save = button("Save & resend", "Replace this message and answer again", async () => {
    if (!editor.value.trim()) return;
    conversation.messages.splice(index);  // everything from this message on is redone
    conversation.messages.push({ role: "user", content: editor.value });
    store.retitle(conversation);
    store.save();
    render();
    await generate();
  });
  save.className = "save-edit";
  const cancel = button("Cancel", "Keep the message", () => renderMessages());
  content.replaceChildren(editor, save, cancel);
  editor.focus();
}

// ------------------------------------------------------------------ wiring
$("composer").addEventListener("submit", (event) => { event.preventDefault(); send(); });
$("prompt").addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey) { event.preventDefault(); send(); }
});
$("stop").addEventListener("click", () => { if (controller) controller.abort(); });
$("regenerate").addEventListener("click", regenerate);
$("new-chat").addEventListener("click", () => { if (!controller) { store.newConversation(); render(); } });

restoreSettings();
render();
loadModels();
startMetrics(fetchMetrics);
