// A small Markdown renderer for chat replies that builds DOM nodes.
//
// Safety: model text only ever becomes Text nodes (createTextNode / textContent); no string of
// model text is parsed as HTML, and links are kept only for http(s) and mailto addresses.
// Coverage: paragraphs (single newlines become line breaks), headings, bullet and numbered
// lists (nested by indentation), fenced code blocks (an unclosed fence, as seen mid-stream,
// runs to the end), block quotes, pipe tables, rules, and inline code, bold, italic,
// strikethrough, links and bare URLs.

const FENCE = /^ {0,3}(`{3,}|~{3,})\s*([^\s`]*)[^`]*$/;
const HEADING = /^ {0,3}(#{1,6})[ \t]+(.*?)(?:[ \t]+#+)?[ \t]*$/;
const LIST_ITEM = /^([ \t]*)([-*+]|\d{1,9}[.)])([ \t]+|$)(.*)$/;
const QUOTE = /^ {0,3}> ?(.*)$/;
const RULE = /^ {0,3}([-*_])(?:[ \t]*\1){2,}[ \t]*$/;
const TABLE_DIVIDER = /^ {0,3}\|?[ \t]*:?-+:?[ \t]*(\|[ \t]*:?-+:?[ \t]*)*\|?[ \t]*$/;

// Inline tokens, tried left to right; the earliest match wins, alternatives in this order:
//  1,2 code span | 3 **bold** | 4 __bold__ | 5 *em* | 6 _em_ | 7 ~~strike~~ | 8,9 [text](url) | 10 bare URL
const INLINE = new RegExp([
  "(`+)([^`]|[^`][\\s\\S]*?[^`])\\1(?!`)",
  "\\*\\*(?=\\S)([\\s\\S]*?\\S)\\*\\*",
  "(?<![\\w])__(?=\\S)([\\s\\S]*?\\S)__(?![\\w])",
  "\\*(?=[^\\s*])([\\s\\S]*?[^\\s*])\\*",
  "(?<![\\w])_(?=[^\\s_])([\\s\\S]*?[^\\s_])_(?![\\w])",
  "~~(?=\\S)([\\s\\S]*?\\S)~~",
  "\\[([^\\[\\]\\n]+)\\]\\(\\s*<?([^\\s<>()]+(?:\\([^\\s<>()]*\\))?)>?(?:\\s+\"[^\"\\n]*\")?\\s*\\)",
  "(https?:\\/\\/[^\\s<>\"'`]*[^\\s<>\"'`.,;:!?)\\]])",
].join("|"), "g");

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

function indentOf(line) {
  const match = /^[ \t]*/.exec(line)[0];
  return match.replace(/\t/g, "    ").length;
}

function isBlank(line) {
  return !line || !line.trim();
}

function listItem(line) {
  const m = LIST_ITEM.exec(line);
  if (!m) return null;
  const ordered = /^\d/.test(m[2]);
  return {
    indent: indentOf(m[1]),
    ordered,
    start: ordered ? parseInt(m[2], 10) : 1,
    text: m[4],
    contentIndent: indentOf(m[1]) + m[2].length + Math.max(1, m[3].replace(/\t/g, "    ").length),
  };
}

function startsBlock(line) {
  return FENCE.test(line) || HEADING.test(line) || QUOTE.test(line) || RULE.test(line) || !!listItem(line);
}

function closesFence(line, fence) {
  const trimmed = line.trim();
  return trimmed.length >= fence.length && trimmed[0] === fence[0] && /^(`+|~+)$/.test(trimmed);
}

function stripIndent(line, amount) {
  let i = 0;
  let width = 0;
  while (i < line.length && width < amount && (line[i] === " " || line[i] === "\t")) {
    width += line[i] === "\t" ? 4 : 1;
    i++;
  }
  return line.slice(i);
}

function splitRow(line) {
  let row = line.trim();
  if (row.startsWith("|")) row = row.slice(1);
  if (row.endsWith("|") && !row.endsWith("\\|")) row = row.slice(0, -1);
  return row.split(/(?<!\\)\|/).map((cell) => cell.trim().replace(/\\\|/g, "|"));
}

// -- blocks --

function renderBlocks(lines, parent) {
  let i = 0;
  while (i < lines.length) {
    const line = lines[i];
    if (isBlank(line)) {
      i++;
      continue;
    }
    let m;
    if ((m = FENCE.exec(line))) {
      const body = [];
      const fenceIndent = indentOf(line);
      i++;
      while (i < lines.length && !closesFence(lines[i], m[1])) {
        body.push(stripIndent(lines[i], fenceIndent));
        i++;
      }
      if (i >= lines.length && body.length && !body[body.length - 1]) body.pop(); // unclosed, mid-stream
      i++; // the closing fence, or past the end while the reply is still streaming
      parent.append(codeBlock(body.join("\n"), m[2]));
      continue;
    }
    if ((m = HEADING.exec(line))) {
      const level = m[1].length;
      const heading = el(`h${Math.min(6, level + 2)}`, "md-heading");
      renderInline(m[2], heading);
      parent.append(heading);
      i++;
      continue;
    }
    if (RULE.test(line)) {
      parent.append(el("hr"));
      i++;
      continue;
    }
    if (QUOTE.test(line)) {
      const quoted = [];
      while (i < lines.length && (m = QUOTE.exec(lines[i]))) {
        quoted.push(m[1]);
        i++;
      }
      const quote = el("blockquote");
      renderBlocks(quoted, quote);
      parent.append(quote);
      continue;
    }
    if (listItem(line)) {
      i = renderList(lines, i, parent);
      continue;
    }
    if (line.includes("|") && i + 1 < lines.length && lines[i + 1].includes("|") && TABLE_DIVIDER.test(lines[i + 1])) {
      i = renderTable(lines, i, parent);
      continue;
    }
    const paragraph = [line];
    i++;
    while (i < lines.length && !isBlank(lines[i]) && !startsBlock(lines[i])) {
      paragraph.push(lines[i]);
      i++;
    }
    const p = el("p");
    renderInline(paragraph.map((l) => l.trim()).join("\n"), p);
    parent.append(p);
  }
}

function renderList(lines, i, parent) {
  const first = listItem(lines[i]);
  const list = el(first.ordered ? "ol" : "ul");
  if (first.ordered && first.start !== 1) list.start = first.start;
  while (i < lines.length) {
    if (isBlank(lines[i])) {
      // A blank line between two items of this list keeps the list going.
      let j = i;
      while (j < lines.length && isBlank(lines[j])) j++;
      const next = j < lines.length ? listItem(lines[j]) : null;
      if (!next || next.ordered !== first.ordered || next.indent !== first.indent) break;
      i = j;
    }
    const item = listItem(lines[i]);
    if (!item || item.ordered !== first.ordered || item.indent < first.indent) break;
    const body = [item.text];
    i++;
    while (i < lines.length) {
      const line = lines[i];
      if (isBlank(line)) {
        // Blank lines stay inside the item only if indented content follows.
        let j = i;
        while (j < lines.length && isBlank(lines[j])) j++;
        if (j >= lines.length || indentOf(lines[j]) < item.contentIndent) break;
        for (; i < j; i++) body.push("");
        continue;
      }
      const nested = listItem(line);
      if (nested && nested.indent <= first.indent) break;
      if (!nested && indentOf(line) <= first.indent && startsBlock(line)) break;
      body.push(stripIndent(line, item.contentIndent));
      i++;
    }
    const li = el("li");
    const content = document.createDocumentFragment();
    renderBlocks(body, content);
    const only = content.childNodes.length === 1 ? content.firstChild : null;
    if (only && only.nodeName === "P") {
      li.append(...only.childNodes); // a tight item: no paragraph margins
    } else {
      if (content.firstChild && content.firstChild.nodeName === "P") {
        const lead = content.firstChild;
        li.append(...lead.childNodes);
        lead.remove();
      }
      li.append(content);
    }
    list.append(li);
  }
  parent.append(list);
  return i;
}

function renderTable(lines, i, parent) {
  const header = splitRow(lines[i]);
  const aligns = splitRow(lines[i + 1]).map((cell) =>
    cell.startsWith(":") && cell.endsWith(":") ? "center" : cell.endsWith(":") ? "right" : "");
  i += 2;
  const table = el("table");
  const head = el("thead");
  const headRow = el("tr");
  header.forEach((cell, c) => {
    const th = el("th");
    if (aligns[c]) th.style.textAlign = aligns[c];
    renderInline(cell, th);
    headRow.append(th);
  });
  head.append(headRow);
  table.append(head);
  const body = el("tbody");
  while (i < lines.length && !isBlank(lines[i]) && lines[i].includes("|")) {
    const tr = el("tr");
    const cells = splitRow(lines[i]);
    header.forEach((_, c) => {
      const td = el("td");
      if (aligns[c]) td.style.textAlign = aligns[c];
      renderInline(cells[c] || "", td);
      tr.append(td);
    });
    body.append(tr);
    i++;
  }
  table.append(body);
  const wrap = el("div", "md-table");
  wrap.append(table);
  parent.append(wrap);
  return i;
}

function codeBlock(text, language) {
  const block = el("div", "md-code");
  const bar = el("div", "md-code-bar");
  bar.append(el("span", "md-code-lang", language || "code"));
  const copy = el("button", "md-code-copy", "Copy");
  copy.type = "button";
  copy.setAttribute("aria-label", `Copy ${language || ""} code`.replace("  ", " "));
  copy.addEventListener("click", () => copyText(text, copy));
  bar.append(copy);
  const pre = el("pre");
  const code = el("code", null, text);
  if (language) code.dataset.language = language;
  pre.append(code);
  pre.tabIndex = 0; // scrollable with the keyboard
  block.append(bar, pre);
  return block;
}

export async function copyText(text, button) {
  let ok = false;
  try {
    await navigator.clipboard.writeText(text);
    ok = true;
  } catch {
    ok = false;
  }
  if (button) {
    const label = button.textContent;
    button.textContent = ok ? "Copied" : "Copy failed";
    setTimeout(() => { button.textContent = label; }, 1500);
  }
  return ok;
}

// -- inline --

function safeHref(url) {
  try {
    const parsed = new URL(url, document.baseURI);
    return ["http:", "https:", "mailto:"].includes(parsed.protocol) ? parsed.href : null;
  } catch {
    return null;
  }
}

function appendText(parent, text) {
  const parts = text.split("\n");
  parts.forEach((part, index) => {
    if (index > 0) parent.append(el("br"));
    if (part) parent.append(document.createTextNode(part));
  });
}

function link(label, href, parent) {
  const safe = safeHref(href);
  if (!safe) {
    appendText(parent, label);
    return;
  }
  const a = el("a");
  a.href = safe;
  a.target = "_blank";
  a.rel = "noopener noreferrer nofollow";
  a.textContent = label;
  parent.append(a);
}

export function renderInline(text, parent) {
  const pattern = new RegExp(INLINE.source, "g");
  let last = 0;
  let m;
  while ((m = pattern.exec(text))) {
    if (m.index > last) appendText(parent, text.slice(last, m.index));
    if (m[2] !== undefined) {
      let code = m[2].replace(/\n/g, " ");
      if (/^ .*[^ ].* $/.test(code)) code = code.slice(1, -1);
      parent.append(el("code", null, code));
    } else if (m[3] !== undefined || m[4] !== undefined) {
      const strong = el("strong");
      renderInline(m[3] ?? m[4], strong);
      parent.append(strong);
    } else if (m[5] !== undefined || m[6] !== undefined) {
      const em = el("em");
      renderInline(m[5] ?? m[6], em);
      parent.append(em);
    } else if (m[7] !== undefined) {
      const del = el("del");
      renderInline(m[7], del);
      parent.append(del);
    } else if (m[8] !== undefined) {
      link(m[8], m[9], parent);
    } else if (m[10] !== undefined) {
      link(m[10], m[10], parent);
    }
    last = pattern.lastIndex;
  }
  if (last < text.length) appendText(parent, text.slice(last));
}

/** Render Markdown source into a DocumentFragment made only of elements and text nodes. */
export function renderMarkdown(source) {
  const fragment = document.createDocumentFragment();
  renderBlocks(String(source).replace(/\r\n?/g, "\n").split("\n"), fragment);
  return fragment;
}
