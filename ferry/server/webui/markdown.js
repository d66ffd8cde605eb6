// A small Markdown renderer that builds DOM nodes. Model output only ever becomes text
// nodes (textContent), never HTML: "<script>" in an answer is shown as the characters
// "<script>". Supports fenced code (with highlighting), inline code, headings, lists,
// block quotes, **bold**, *italic* and [links](url) (http and https URLs only).

const KEYWORDS = new Set((
  "def class return if elif else for while in not and or is None True False import from as " +
  "with try except finally raise lambda yield pass break continue global async await " +
  "function const let var new this typeof instanceof null undefined true false switch case " +
  "default do throw catch export extends static void int float double char long struct " +
  "enum fn pub mut impl use match mod self Self where trait type package func go defer " +
  "select interface map chan unsafe sizeof include define auto"
).split(" "));

// One alternation, tried in order: comment, string, number, word.
const TOKEN = /(#[^\n]*|\/\/[^\n]*|\/\*[\s\S]*?\*\/)|("(?:[^"\\\n]|\\.)*"|'(?:[^'\\\n]|\\.)*'|`(?:[^`\\]|\\.)*`)|(\b\d+(?:\.\d+)?(?:e[+-]?\d+)?\b)|([A-Za-z_]\w*)/g;

function span(cls, text) {
  const node = document.createElement("span");
  node.className = cls;
  node.textContent = text;
  return node;
}

/** Highlighted code as a DocumentFragment of text nodes and spans. */
export function highlight(code) {
  const fragment = document.createDocumentFragment();
  let last = 0;
  for (const match of code.matchAll(TOKEN)) {
    const [text, comment, string, number, word] = match;
    if (word && !KEYWORDS.has(word)) continue;
    if (match.index > last) fragment.append(document.createTextNode(code.slice(last, match.index)));
    const cls = comment ? "tok-com" : string ? "tok-str" : number ? "tok-num" : "tok-kw";
    fragment.append(span(cls, text));
    last = match.index + text.length;
  }
  if (last < code.length) fragment.append(document.createTextNode(code.slice(last)));
  return fragment;
}

// Underscore emphasis only between word boundaries: snake_case_names stay as they are.
const INLINE = /(`[^`\n]+`)|(\*\*[^*\n]+\*\*)|(\*[^*\n]+\*|(?<!\w)_[^_\n]+_(?!\w))|\[([^\]\n]+)\]\(([^)\s]+)\)/g;

/** Inline markup of one line into `parent`, as DOM nodes. */
function inline(parent, text) {
  let last = 0;
  for (const match of text.matchAll(INLINE)) {
    const [whole, code, bold, italic, linkText, href] = match;
    if (match.index > last) parent.append(document.createTextNode(text.slice(last, match.index)));
    let node;
    if (code) {
      node = document.createElement("code");
      node.textContent = code.slice(1, -1);
    } else if (bold) {
      node = document.createElement("strong");
      inline(node, bold.slice(2, -2));
    } else if (italic) {
      node = document.createElement("em");
      inline(node, italic.slice(1, -1));
    } else if (/^https?:\/\//i.test(href)) {
      node = document.createElement("a");
      node.href = href;  // only http(s): no javascript: or data: URLs
      node.rel = "noopener noreferrer";
      node.target = "_blank";
      node.textContent = linkText;
    } else {
      node = document.createTextNode(whole);
    }
    parent.append(node);
    last = match.index + whole.length;
  }
  if (last < text.length) parent.append(document.createTextNode(text.slice(last)));
}

function lines(parent, texts) {
  texts.forEach((text, i) => {
    if (i) parent.append(document.createElement("br"));
    inline(parent, text);
  });
}

/** Render `text` as Markdown into `container` (its old content is replaced). */
export function renderMarkdown(container, text) {
  container.replaceChildren();
  const all = text.split("\n");
  let i = 0;
  while (i < all.length) {
    const line = all[i];
    const fence = line.match(/^\s*```\s*([\w+-]*)/);
    if (fence) {  // until the closing fence, or the end while it still streams
      const body = [];
      for (i += 1; i < all.length && !/^\s*```/.test(all[i]); i += 1) body.push(all[i]);
      i += 1;
      const pre = document.createElement("pre");
      const code = document.createElement("code");
      if (fence[1]) code.dataset.lang = fence[1];
      code.append(highlight(body.join("\n")));
      pre.append(code);
      container.append(pre);
      continue;
    }
    const heading = line.match(/^(#{1,6})\s+(.*)$/);
    if (heading) {
      const node = document.createElement(`h${Math.min(6, heading[1].length + 2)}`);
      inline(node, heading[2]);
      container.append(node);
      i += 1;
      continue;
    }
    const listKind = /^\s*[-*+]\s+/.test(line) ? "ul" : /^\s*\d+[.)]\s+/.test(line) ? "ol" : null;
    if (listKind) {
      const list = document.createElement(listKind);
      const marker = listKind === "ul" ? /^\s*[-*+]\s+/ : /^\s*\d+[.)]\s+/;
      for (; i < all.length && marker.test(all[i]); i += 1) {
        const item = document.createElement("li");
        inline(item, all[i].replace(marker, ""));
        list.append(item);
      }
      container.append(list);
      continue;
    }
    if (/^\s*>/.test(line)) {
      const quote = document.createElement("blockquote");
      const body = [];
      for (; i < all.length && /^\s*>/.test(all[i]); i += 1) body.push(all[i].replace(/^\s*>\s?/, ""));
      lines(quote, body);
      container.append(quote);
      continue;
    }
    if (!line.trim()) {
      i += 1;
      continue;
    }
    const paragraph = document.createElement("p");
    const body = [];
    for (; i < all.length && all[i].trim() && !/^\s*(```|#{1,6}\s|[-*+]\s|\d+[.)]\s|>)/.test(all[i]); i += 1) {
      body.push(all[i]);
    }
    if (!body.length) { body.push(line); i += 1; }
    lines(paragraph, body);
    container.append(paragraph);
  }
}
