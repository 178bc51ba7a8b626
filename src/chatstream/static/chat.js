// chatstream browser client: streams replies from /chat_stream (Server-Sent Events over fetch),
// keeps the view in step with the server-side history, and explains every failure in words.
//
// All requests use relative URLs and the same-origin session cookie.

import { copyText, renderMarkdown } from "./markdown.js";

const $ = (id) => document.getElementById(id);
const log = $("log");
const thread = $("thread");
const empty = $("empty");
const form = $("composer");
const input = $("input");
const sendButton = $("send");
const stopButton = $("stop");
const newChatButton = $("new-chat");
const notice = $("notice");
const noticeText = $("notice-text");
const noticeRetry = $("notice-retry");
const statusLine = $("status");
const modelName = $("model-name");
const modelDot = $("model-dot");

const ICONS = {
  logo: "M9 11.5h14M9 16h10M9 20.5h6",
  regenerate: "M20 11a8 8 0 0 0-14.6-4.5L4 8M4 4v4h4M4 13a8 8 0 0 0 14.6 4.5L20 16M20 20v-4h-4",
  copy: "M9 9h10v10H9zM5 15V5h10",
  stop: "M12 8v4M12 16h.01M12 3a9 9 0 1 0 0 18 9 9 0 0 0 0-18z",
  alert: "M12 8v5M12 16.5v.5M10.3 3.9L2.4 18a2 2 0 0 0 1.7 3h15.8a2 2 0 0 0 1.7-3L13.7 3.9a2 2 0 0 0-3.4 0z",
};

/** The turn in progress: { controller, finished: Promise } or null. */
let current = null;
let retryTimer = null;
let historyLoaded = null;

// -- small DOM helpers --

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

function icon(name, viewBox = "0 0 24 24") {
  const svg = document.createElementNS("http://www.w3.org/2000/svg", "svg");
  svg.setAttribute("viewBox", viewBox);
  svg.setAttribute("aria-hidden", "true");
  svg.setAttribute("focusable", "false");
  const path = document.createElementNS("http://www.w3.org/2000/svg", "path");
  path.setAttribute("d", ICONS[name]);
  svg.append(path);
  return svg;
}

function announce(text) {
  statusLine.textContent = text;
}

function nearBottom() {
  return log.scrollHeight - log.scrollTop - log.clientHeight < 120;
}

function scrollToBottom() {
  log.scrollTop = log.scrollHeight;
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

// -- messages --

function messages() {
  return [...thread.querySelectorAll(".msg")];
}

function updateEmptyState() {
  empty.hidden = messages().length > 0;
}

/** A message row; for the assistant, with a live Markdown view and helpers for the stream. */
function createMessage(role, text = "") {
  const row = el("article", `msg msg-${role}`);
  const body = el("div", "msg-body");
  const bubble = el("div", "bubble");
  bubble.append(el("span", "visually-hidden", role === "user" ? "You:" : "Assistant:"));
  const content = el("div", "content");
  bubble.append(content);
  body.append(bubble);
  if (role === "assistant") {
    const avatar = el("span", "logo avatar");
    avatar.setAttribute("aria-hidden", "true");
    avatar.append(icon("logo", "0 0 32 32"));
    row.append(avatar);
  }
  row.append(body);

  const message = {
    row, role, text, content, bubble,
    _frame: 0,
    setText(value) {
      message.text = value;
      if (!message._frame) {
        message._frame = requestAnimationFrame(() => {
          message._frame = 0;
          message.render();
        });
      }
    },
    render() {
      if (message._frame) {
        cancelAnimationFrame(message._frame);
        message._frame = 0;
      }
      const stick = nearBottom();
      if (role === "user") content.textContent = message.text;
      else content.replaceChildren(renderMarkdown(message.text));
      if (stick) scrollToBottom();
    },
    setWaiting(label) {
      const stick = nearBottom();
      const waiting = el("div", "waiting");
      const dots = el("span", "dots");
      dots.setAttribute("aria-hidden", "true");
      dots.append(el("i"), el("i"), el("i"));
      waiting.append(dots);
      if (label) waiting.append(el("span", "queue", label));
      content.replaceChildren(waiting);
      if (stick) scrollToBottom();
    },
    setNote(text, kind = "") {
      bubble.querySelector(".note")?.remove();
      if (!text) return;
      const note = el("div", `note ${kind}`.trim());
      note.append(icon(kind === "error" ? "alert" : "stop"), el("span", null, text));
      bubble.append(note);
    },
  };
  row.chatMessage = message;
  if (text) message.render();
  return message;
}

function addMessage(role, text) {
  const message = createMessage(role, text);
  thread.append(message.row);
  updateEmptyState();
  return message;
}

function lastMessage() {
  const rows = messages();
  return rows.length ? rows[rows.length - 1].chatMessage : null;
}

/** Copy and Regenerate under the last reply (only when no turn is running). */
function updateActions() {
  thread.querySelectorAll(".actions").forEach((node) => node.remove());
  const last = lastMessage();
  if (current || !last || last.role !== "assistant" || !last.text) return;
  const actions = el("div", "actions");
  const copy = el("button", "action");
  copy.type = "button";
  copy.append(icon("copy"), el("span", null, "Copy"));
  copy.addEventListener("click", () => copyText(last.text, copy.lastChild));
  const regenerate = el("button", "action regenerate");
  regenerate.type = "button";
  regenerate.title = "Write this reply again";
  regenerate.append(icon("regenerate"), el("span", null, "Regenerate"));
  regenerate.addEventListener("click", () => runTurn({ text: "", regenerate: true }));
  actions.append(copy, regenerate);
  last.row.querySelector(".msg-body").append(actions);
}

// -- notices (errors and overload) --

function hideNotice() {
  clearInterval(retryTimer);
  retryTimer = null;
  notice.hidden = true;
  noticeRetry.hidden = true;
  noticeRetry.onclick = null;
}

/** Show a message above the composer; with `retry`, offer a Retry button (after `waitSeconds`). */
function showNotice(text, { retry = null, waitSeconds = 0, kind = "error" } = {}) {
  hideNotice();
  notice.className = `notice ${kind}`;
  noticeText.textContent = text;
  notice.hidden = false;
  if (!retry) return;
  noticeRetry.hidden = false;
  noticeRetry.onclick = () => {
    hideNotice();
    retry();
  };
  let left = Math.max(0, Math.ceil(waitSeconds));
  const tick = () => {
    noticeRetry.disabled = left > 0;
    noticeRetry.textContent = left > 0 ? `Retry in ${left} s` : "Retry";
    if (left <= 0) {
      clearInterval(retryTimer);
      retryTimer = null;
    }
    left -= 1;
  };
  tick();
  if (noticeRetry.disabled) retryTimer = setInterval(tick, 1000);
}

// With an API key on the server, an expired or missing sign-in answers 401: go and sign in.
function signInIfNeeded(response) {
  if (response.status === 401) location.assign("login");
}

async function readError(response) {
  signInIfNeeded(response);
  let body = {};
  try {
    body = await response.json();
  } catch {
    body = {};
  }
  const retryAfter = parseInt(response.headers.get("Retry-After") || "", 10);
  return {
    status: response.status,
    code: typeof body.error === "string" ? body.error : `http_${response.status}`,
    message: typeof body.message === "string" ? body.message : response.statusText,
    retryAfter: Number.isFinite(retryAfter) ? retryAfter : 0,
  };
}

function sentence(text) {
  const trimmed = String(text).trim();
  const capital = trimmed.charAt(0).toUpperCase() + trimmed.slice(1);
  return /[.!?]$/.test(capital) ? capital : `${capital}.`;
}

function explain(error) {
  switch (error.code) {
    case "too_many_requests":
      return { text: "The server is busy right now: every slot and the waiting line are full. Please try again in a moment.", retry: true, kind: "warn" };
    case "model_loading":
      return { text: "The model is still loading. It will be ready shortly.", retry: true, kind: "warn" };
    case "model_unavailable":
      return { text: `The model is not available. ${sentence(error.message)}`, retry: false };
    case "session_busy":
      return { text: "A reply is already being written in this conversation (perhaps in another tab). Wait for it to finish, or stop it there, then try again.", retry: true, kind: "warn" };
    case "input_too_large":
      return { text: `${sentence(error.message || "Your message is too long")} Shorten it and try again.`, retry: false };
    case "nothing_to_regenerate":
      return { text: "There is no reply to regenerate yet.", retry: false };
    default:
      if (error.status === 503) return { text: `The server is unavailable. ${sentence(error.message)}`, retry: true, kind: "warn" };
      return { text: `The request failed (${error.status}). ${sentence(error.message || "Unknown error")}`, retry: error.status >= 500 };
  }
}

// -- Server-Sent Events over fetch --

function parseEvent(block) {
  let event = "message";
  const data = [];
  for (const raw of block.split("\n")) {
    const line = raw.endsWith("\r") ? raw.slice(0, -1) : raw;
    if (!line || line.startsWith(":")) continue;
    const colon = line.indexOf(":");
    const field = colon < 0 ? line : line.slice(0, colon);
    let value = colon < 0 ? "" : line.slice(colon + 1);
    if (value.startsWith(" ")) value = value.slice(1);
    if (field === "event") event = value;
    else if (field === "data") data.push(value);
  }
  if (!data.length) return null;
  try {
    return { event, data: JSON.parse(data.join("\n")) };
  } catch {
    return null;
  }
}

async function* readEvents(body) {
  const reader = body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true }).replace(/\r\n/g, "\n");
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const parsed = parseEvent(buffer.slice(0, end));
      buffer = buffer.slice(end + 2);
      if (parsed) yield parsed;
    }
  }
  buffer += decoder.decode();
  const parsed = buffer.trim() ? parseEvent(buffer) : null;
  if (parsed) yield parsed;
}

// -- one chat turn --

function setBusy(busy) {
  sendButton.hidden = busy;
  stopButton.hidden = !busy;
  if (!busy) updateSendButton();
  if (busy) updateActions();
}

function updateSendButton() {
  sendButton.disabled = !input.value.trim();
}

async function runTurn({ text, regenerate }) {
  if (current) return;
  await historyLoaded;
  if (current) return;
  hideNotice();

  const controller = new AbortController();
  let finish;
  current = { controller, finished: new Promise((resolve) => { finish = resolve; }) };

  let user = null;
  let replaced = null;
  if (regenerate) {
    const last = lastMessage();
    if (last && last.role === "assistant") replaced = last;
  } else {
    user = addMessage("user", text);
  }
  const reply = createMessage("assistant");
  reply.row.setAttribute("aria-busy", "true");
  reply.setWaiting();
  if (replaced) replaced.row.replaceWith(reply.row);
  else thread.append(reply.row);
  scrollToBottom();
  setBusy(true);
  announce("Sending…");

  const retry = () => {
    if (input.value === text) {
      input.value = "";
      autosize();
    }
    runTurn({ text, regenerate });
  };
  // Undo the optimistic view when the server refused the turn (it kept nothing).
  const undo = () => {
    if (replaced) reply.row.replaceWith(replaced.row);
    else reply.row.remove();
    if (user) {
      user.row.remove();
      if (!input.value.trim()) {
        input.value = text;
        autosize();
      }
    }
    updateEmptyState();
  };

  let response = null;
  let outcome = null;
  try {
    response = await fetch("chat_stream", {
      method: "POST",
      headers: { "Content-Type": "application/json", Accept: "text/event-stream" },
      body: JSON.stringify({ user_input: text, regenerate }),
      credentials: "same-origin",
      cache: "no-store",
      signal: controller.signal,
    });
    if (!response.ok) {
      const error = await readError(response);
      undo();
      const { text: message, retry: canRetry, kind } = explain(error);
      showNotice(message, { retry: canRetry ? retry : null, waitSeconds: error.retryAfter, kind });
      announce(message);
      outcome = "refused";
      return;
    }
    for await (const { event, data } of readEvents(response.body)) {
      if (event === "queued") {
        const position = Number(data.position) || 0;
        const label = position > 0 ? `Waiting in queue: position ${position}` : "Starting…";
        if (!reply.text) reply.setWaiting(label);
        announce(label);
      } else if (event === "delta") {
        if (!reply.text) announce("Assistant is replying…");
        reply.setText(reply.text + String(data.text ?? ""));
      } else if (event === "done") {
        outcome = "done";
        reply.render();
        if (data.finish_reason === "length") reply.setNote("The reply reached the length limit.");
      } else if (event === "error") {
        outcome = "error";
        reply.render();
        reply.setNote(`The reply failed: ${data.message || data.error || "unknown error"}`, "error");
      }
    }
    if (!outcome) {
      outcome = "lost";
      reply.render();
      reply.setNote("The connection closed before the reply was finished.", "error");
    }
  } catch (error) {
    if (error && error.name === "AbortError") {
      outcome = "stopped";
      if (reply.text) {
        reply.render();
        reply.setNote("Stopped");
      } else if (replaced) {
        // Stopped before any new text: the server keeps the previous reply.
        reply.row.replaceWith(replaced.row);
      } else {
        reply.row.remove();
      }
    } else if (!response) {
      outcome = "offline";
      undo();
      const message = "Could not reach the server. Check your connection and try again.";
      showNotice(message, { retry });
      announce(message);
    } else {
      outcome = "lost";
      reply.render();
      reply.setNote("The connection was lost; the reply may be incomplete.", "error");
    }
  } finally {
    reply.row.removeAttribute("aria-busy");
    current = null;
    setBusy(false);
    updateActions();
    updateEmptyState();
    if (outcome === "done") announce("Reply finished.");
    else if (outcome === "stopped") announce("Stopped.");
    finish();
  }
}

function stop() {
  current?.controller.abort();
}

async function newChat() {
  if (current) {
    const turn = current;
    turn.controller.abort();
    await turn.finished;
  }
  hideNotice();
  let response = null;
  try {
    // The server finishes a stopped turn (saving the partial reply) a moment after the abort.
    for (let attempt = 0; attempt < 20; attempt++) {
      response = await fetch("clear_context", { method: "POST", credentials: "same-origin" });
      if (response.status !== 409) break;
      await sleep(150);
    }
  } catch {
    showNotice("Could not reach the server to start a new chat. Try again.", { retry: newChat });
    return;
  }
  if (!response.ok) {
    const error = await readError(response);
    showNotice(explain(error).text, { retry: newChat, kind: "warn" });
    return;
  }
  messages().forEach((row) => row.remove());
  updateEmptyState();
  announce("New chat started.");
  input.focus();
}

// -- history and health --

async function loadHistory() {
  try {
    const response = await fetch("history", { credentials: "same-origin", cache: "no-store" });
    signInIfNeeded(response);
    if (!response.ok) throw new Error(`HTTP ${response.status}`);
    const body = await response.json();
    for (const message of body.messages || []) {
      if ((message.role === "user" || message.role === "assistant") && typeof message.content === "string") {
        addMessage(message.role, message.content);
      }
    }
  } catch {
    showNotice("Could not load this conversation from the server.", { retry: () => location.reload() });
  }
  updateEmptyState();
  updateActions();
  scrollToBottom();
}

async function loadHealth() {
  let state = "error";
  try {
    const response = await fetch("health", { cache: "no-store" });
    const body = await response.json();
    if (typeof body.model === "string" && body.model) {
      modelName.textContent = body.model;
      document.title = `${body.model} · chatstream`;
    }
    state = body.status === "ok" ? "ok" : body.status === "loading" ? "loading" : "error";
  } catch {
    modelName.textContent = "offline";
  }
  modelDot.dataset.state = state;
  const labels = { ok: "ready", loading: "loading", error: "unavailable" };
  $("model").title = `Model status: ${labels[state]}`;
  if (state !== "ok") setTimeout(loadHealth, state === "loading" ? 2000 : 5000);
}

// -- composer --

function autosize() {
  input.style.height = "auto";
  input.style.height = `${Math.min(input.scrollHeight, 192)}px`;
  updateSendButton();
}

function submit() {
  const text = input.value;
  if (!text.trim() || current) return;
  input.value = "";
  autosize();
  runTurn({ text, regenerate: false });
}

input.addEventListener("input", autosize);
input.addEventListener("keydown", (event) => {
  if (event.key !== "Enter" || event.shiftKey || event.altKey || event.ctrlKey || event.metaKey) return;
  // Enter that confirms an IME composition (Japanese, Chinese, ...) must not send.
  if (event.isComposing || event.keyCode === 229) return;
  event.preventDefault();
  submit();
});
form.addEventListener("submit", (event) => {
  event.preventDefault();
  submit();
});
stopButton.addEventListener("click", stop);
newChatButton.addEventListener("click", newChat);
$("notice-close").addEventListener("click", hideNotice);
document.addEventListener("keydown", (event) => {
  if (event.key === "Escape" && current) stop();
});
for (const suggestion of document.querySelectorAll(".suggestion")) {
  suggestion.addEventListener("click", () => {
    input.value = suggestion.textContent.trim();
    submit();
  });
}

historyLoaded = loadHistory();
loadHealth();
autosize();
input.focus();
