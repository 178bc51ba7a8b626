// Chat replies as Markdown, with well-kept libraries (vendored under static/vendor/, loaded by
// index.html as plain scripts): markdown-it parses (raw HTML off, images off), KaTeX writes math
// as MathML ($...$ or \(...\) inline, $$...$$ or \[...\] as blocks), highlight.js colours code, and DOMPurify
// sanitizes the result before it becomes DOM. Model text reaches the page only through DOMPurify.

const { markdownit, DOMPurify, hljs, katex } = globalThis;

const md = markdownit({
  html: false, // model text with <tags> shows as text
  linkify: true,
  breaks: true, // a single newline in a chat reply is a line break
  highlight: highlightCode,
});
md.disable("image"); // no requests to addresses a model wrote
md.validateLink = (url) => /^(https?:|mailto:)/i.test(url.trim());
md.use(mathPlugin);

// Headings inside a reply are smaller than the page's own (#, ## -> h3, h4).
md.renderer.rules.heading_open = (tokens, index) => {
  const level = Math.min(6, Number(tokens[index].tag.slice(1)) + 2);
  return `<h${level} class="md-heading">`;
};
md.renderer.rules.heading_close = (tokens, index) => `</h${Math.min(6, Number(tokens[index].tag.slice(1)) + 2)}>`;
// No newlines between tags: the text of a reply is exactly its words (also while it streams).
md.renderer.rules.softbreak = () => "<br>";
md.renderer.rules.hardbreak = () => "<br>";
md.renderer.rules.table_open = () => '<div class="md-table"><table>';
md.renderer.rules.table_close = () => "</table></div>";

// Code blocks: language as a data attribute; the bar with its Copy button is added as DOM below.
md.renderer.rules.fence = (tokens, index, options) => {
  const token = tokens[index];
  const language = (token.info || "").trim().split(/\s+/)[0];
  const code = options.highlight(token.content, language);
  const name = md.utils.escapeHtml(language);
  return `<div class="md-code" data-language="${name}"><pre><code class="hljs${language ? ` language-${name}` : ""}">${code}</code></pre></div>`;
};

function highlightCode(code, language) {
  try {
    if (language && hljs.getLanguage(language)) return hljs.highlight(code, { language, ignoreIllegals: true }).value;
  } catch {
    // fall through to plain text
  }
  return md.utils.escapeHtml(code);
}

function renderMath(tex, displayMode) {
  try {
    return katex.renderToString(tex, { displayMode, output: "mathml", throwOnError: false, maxSize: 20, maxExpand: 200 });
  } catch {
    return md.utils.escapeHtml(tex);
  }
}

/**
 * `$...$` and `\(...\)` inline, `$$...$$` and `\[...\]` blocks (a `$` before a digit or space is
 * money, not math). The backslash forms run before markdown-it's escapes, which would eat the
 * backslashes; an unclosed `\(` stays an escape. Code spans and blocks are parsed first: untouched.
 */
function mathPlugin(markdown) {
  markdown.inline.ruler.before("escape", "math_inline_backslash", (state, silent) => {
    const src = state.src;
    const start = state.pos;
    if (src[start] !== "\\" || (src[start + 1] !== "(" && src[start + 1] !== "[")) return false;
    const display = src[start + 1] === "[";
    const end = src.indexOf(display ? "\\]" : "\\)", start + 2);
    if (end < 0 || !src.slice(start + 2, end).trim()) return false;
    if (!silent) {
      const token = state.push("math_inline", "math", 0);
      token.content = src.slice(start + 2, end);
      token.markup = display ? "$$" : "$";
    }
    state.pos = end + 2;
    return true;
  });
  markdown.inline.ruler.after("escape", "math_inline", (state, silent) => {
    const src = state.src;
    const start = state.pos;
    if (src[start] !== "$") return false;
    const display = src[start + 1] === "$";
    const open = display ? 2 : 1;
    const first = src[start + open];
    if (!first || /\s/.test(first) || (!display && /\d/.test(first))) return false;
    let end = start + open;
    for (;;) {
      end = src.indexOf(display ? "$$" : "$", end);
      if (end < 0) return false;
      if (src[end - 1] !== "\\") break;
      end += 1;
    }
    if (/\s/.test(src[end - 1]) || (!display && /\d/.test(src[end + 1] || ""))) return false;
    if (!silent) {
      const token = state.push("math_inline", "math", 0);
      token.content = src.slice(start + open, end);
      token.markup = display ? "$$" : "$";
    }
    state.pos = end + open;
    return true;
  });
  markdown.block.ruler.after("blockquote", "math_block", (state, startLine, endLine, silent) => {
    const lineStart = state.bMarks[startLine] + state.tShift[startLine];
    const firstLine = state.src.slice(lineStart, state.eMarks[startLine]).trim();
    const [open, close] = firstLine.startsWith("$$") ? ["$$", "$$"] : firstLine.startsWith("\\[") ? ["\\[", "\\]"] : [];
    if (!open) return false;
    let content;
    let line = startLine;
    if (firstLine.length > 4 && firstLine.endsWith(close)) {
      content = firstLine.slice(2, -2);
    } else if (firstLine === open) {
      const lines = [];
      for (line = startLine + 1; line < endLine; line++) {
        const text = state.src.slice(state.bMarks[line] + state.tShift[line], state.eMarks[line]);
        if (text.trim() === close) break;
        lines.push(text);
      }
      if (line >= endLine) return false; // not closed (yet, while streaming): plain text for now
      content = lines.join("\n");
    } else {
      return false;
    }
    if (silent) return true;
    const token = state.push("math_block", "math", 0);
    token.block = true;
    token.content = content;
    token.map = [startLine, line + 1];
    state.line = line + 1;
    return true;
  }, { alt: ["paragraph", "reference", "blockquote", "list"] });
  markdown.renderer.rules.math_inline = (tokens, index) => renderMath(tokens[index].content, tokens[index].markup === "$$");
  markdown.renderer.rules.math_block = (tokens, index) => `<div class="md-math">${renderMath(tokens[index].content, true)}</div>`;
}

const SANITIZE = {
  USE_PROFILES: { html: true, mathMl: true },
  FORBID_TAGS: ["style", "img", "form", "input", "button", "textarea", "select", "iframe"],
  FORBID_ATTR: ["style"],
  // KaTeX's MathML: the TeX source rides in <annotation> (text only; annotation-xml stays forbidden).
  ADD_TAGS: ["semantics", "annotation"],
  ADD_ATTR: ["display", "encoding"],
  RETURN_DOM_FRAGMENT: true,
};

/** Markdown text -> a sanitized DocumentFragment. */
export function renderMarkdown(source) {
  const fragment = DOMPurify.sanitize(md.render(source), SANITIZE);
  dropLayoutNewlines(fragment);
  for (const link of fragment.querySelectorAll("a[href]")) {
    link.target = "_blank";
    link.rel = "noopener noreferrer nofollow";
  }
  for (const block of fragment.querySelectorAll(".md-code")) addCodeBar(block);
  return fragment;
}

/** The newlines markdown-it puts between tags (never those inside code). */
function dropLayoutNewlines(root) {
  const walker = document.createTreeWalker(root, NodeFilter.SHOW_TEXT);
  const drop = [];
  for (let node = walker.nextNode(); node; node = walker.nextNode()) {
    if (/^\n+$/.test(node.data) && !node.parentElement?.closest("pre, math")) drop.push(node);
  }
  drop.forEach((node) => node.remove());
}

function addCodeBar(block) {
  const bar = document.createElement("div");
  bar.className = "md-code-bar";
  const language = document.createElement("span");
  language.className = "md-code-lang";
  language.textContent = block.dataset.language || "code";
  const copy = document.createElement("button");
  copy.type = "button";
  copy.className = "md-code-copy";
  copy.textContent = "Copy";
  const pre = block.querySelector("pre");
  copy.addEventListener("click", () => copyText(pre.textContent, copy));
  pre.tabIndex = 0; // scrollable with the keyboard
  bar.append(language, copy);
  block.prepend(bar);
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
