// Conversations and settings, kept in the browser's localStorage (never sent anywhere but
// to this server as chat messages). The API key is NOT here: see api.js (sessionStorage).

const CONVERSATIONS = "ferry.conversations";
const CURRENT = "ferry.current";
const SETTINGS = "ferry.settings";

function read(key, fallback) {
  try {
    const value = JSON.parse(localStorage.getItem(key));
    return value === null ? fallback : value;
  } catch (_) {
    return fallback;  // a corrupt entry starts over rather than breaking the page
  }
}

function write(key, value) {
  try {
    localStorage.setItem(key, JSON.stringify(value));
  } catch (_) {
    // storage full or disabled: the page still works, it just forgets on reload
  }
}

function newId() {
  return Date.now().toString(36) + Math.random().toString(36).slice(2, 8);
}

/** All conversations and which one is open; every change is saved at once. */
export class Store {
  constructor() {
    this.conversations = read(CONVERSATIONS, []);
    if (!Array.isArray(this.conversations)) this.conversations = [];
    this.currentId = read(CURRENT, null);
    if (!this.current()) this.newConversation();
  }

  current() {
    return this.conversations.find((c) => c.id === this.currentId) || null;
  }

  newConversation() {
    const conversation = { id: newId(), title: "New chat", messages: [], created: Date.now() };
    this.conversations.unshift(conversation);
    this.currentId = conversation.id;
    this.save();
    return conversation;
  }

  select(id) {
    if (this.conversations.some((c) => c.id === id)) {
      this.currentId = id;
      this.save();
    }
  }

  remove(id) {
    this.conversations = this.conversations.filter((c) => c.id !== id);
    if (this.currentId === id) {
      this.currentId = this.conversations.length ? this.conversations[0].id : null;
    }
    if (!this.current()) this.newConversation();
    this.save();
  }

  /** Title a conversation after its first user message. */
  retitle(conversation) {
    const first = conversation.messages.find((m) => m.role === "user");
    conversation.title = first ? first.content.slice(0, 40) || "New chat" : "New chat";
  }

  save() {
    write(CONVERSATIONS, this.conversations);
    write(CURRENT, this.currentId);
  }
}

export function loadSettings() {
  return read(SETTINGS, {});
}

export function saveSettings(settings) {
  write(SETTINGS, settings);
}
