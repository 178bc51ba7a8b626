// chatstream browser client: streams replies from /chat_stream (Server-Sent Events over fetch),
// keeps the view in step with the server-side history, and explains every failure in words.
//
// All requests use relative URLs and the same-origin session cookie.

import { copyText, renderMarkdown } from "./markdown.js";
import * as api from "./conversations.js";

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
const sidebar = $("sidebar");
const conversationList = $("conversations");
const conversationsEmpty = $("conversations-empty");
const sidebarToggle = $("sidebar-toggle");
const backdrop = $("backdrop");
const settingsDialog = $("settings");
const settingsError = $("settings-error");
const jumpButton = $("jump");

const ICONS = {
  logo: "M9 11.5h14M9 16h10M9 20.5h6",
  regenerate: "M20 11a8 8 0 0 0-14.6-4.5L4 8M4 4v4h4M4 13a8 8 0 0 0 14.6 4.5L20 16M20 20v-4h-4",
  copy: "M9 9h10v10H9zM5 15V5h10",
  stop: "M12 8v4M12 16h.01M12 3a9 9 0 1 0 0 18 9 9 0 0 0 0-18z",
  alert: "M12 8v5M12 16.5v.5M10.3 3.9L2.4 18a2 2 0 0 0 1.7 3h15.8a2 2 0 0 0 1.7-3L13.7 3.9a2 2 0 0 0-3.4 0z",
  edit: "M4 20h4L19 9l-4-4L4 16zM13.5 6.5l4 4",
  rename: "M4 20h4L19 9l-4-4L4 16z",
  trash: "M4 7h16M9 7V4h6v3M6 7l1 13h10l1-13",
  left: "M15 6l-6 6 6 6",
  right: "M9 6l6 6-6 6",
};

/** The turn in progress: { controller, finished: Promise } or null. */
let current = null;
let retryTimer = null;
let historyLoaded = null;
/** The conversation on screen: its id (null before the first one exists), title and settings. */
let conversation = { id: null, title: "", settings: {} };

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
  updateJumpButton();
}

/** "Jump to the latest message" shows while the newest text is out of view (scrolled up). */
function updateJumpButton() {
  jumpButton.hidden = nearBottom();
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
function createMessage(role, text = "", alternatives = [], version = alternatives.length, details = []) {
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
    // Every answer of a reply (regenerate keeps them), oldest first; `shown` is on screen and in use.
    versions: [...alternatives.slice(0, version), text, ...alternatives.slice(version)],
    // How each answer ended ({finish_reason, completion_tokens, tokens_per_s, ttft_s} or null), as `versions`.
    details: details.length === alternatives.length + 1 ? details : alternatives.map(() => null).concat([null]),
    shown: version,
    // A user message that was edited: how many versions it has, and which is shown (each with its own replies).
    branchCount: 1,
    branchShown: 0,
    stats: "",
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
  if (role === "assistant") showDetails(message);
  return message;
}

/** The stats line and the note of the answer shown: how it ended, also after a reload. */
function showDetails(message) {
  const details = message.details[message.shown] || null;
  message.stats = describeStats(details);
  message.row.classList.toggle("incomplete", ["stopped", "error", "streaming"].includes(details?.finish_reason));
  const notes = {
    length: ["The reply reached the length limit.", ""],
    stopped: ["Stopped · the reply is incomplete", ""],
    error: ["The reply failed · it is incomplete", "error"],
    streaming: ["Still being written · incomplete so far", ""],
  };
  const [text, kind] = notes[details?.finish_reason] || ["", ""];
  message.setNote(text, kind);
}

function addMessage(role, text, alternatives = [], version = alternatives.length, details = []) {
  const message = createMessage(role, text, alternatives, version, details);
  thread.append(message.row);
  updateEmptyState();
  return message;
}

function lastMessage() {
  const rows = messages();
  return rows.length ? rows[rows.length - 1].chatMessage : null;
}

function actionButton(name, label, title, onClick) {
  const button = el("button", `action ${name}`);
  button.type = "button";
  if (title) button.title = title;
  button.append(icon(name === "regenerate" ? "regenerate" : name), el("span", null, label));
  button.addEventListener("click", onClick);
  return button;
}

/**
 * Under each reply: its versions, stats and Copy; Regenerate under the last. Edit on user messages.
 * While a reply is written, the rows that cannot be used stay in place, hidden and inert (class
 * "busy"), and the reply being written has one too: a row appearing or going would move the page.
 */
function updateActions() {
  const stick = nearBottom();
  thread.querySelectorAll(".actions").forEach((node) => node.remove());
  const rows = messages();
  rows.forEach((row, index) => {
    const message = row.chatMessage;
    const actions = el("div", "actions");
    const writing = current && index === rows.length - 1;
    if (message.role === "user") {
      if (row.classList.contains("editing")) return;
      if (current) {
        actions.classList.add("busy");
        actions.inert = true;
      }
      if (message.branchCount > 1) {
        actions.classList.add("has-pager");
        actions.append(branchPager(message, index));
      }
      actions.append(actionButton("edit", "Edit", "Edit this message and send it again", () => startEdit(message, index)));
    } else if (writing) {
      actions.classList.add("busy");
      actions.inert = true;
      actions.append(actionButton("copy", "Copy", "", () => {}));
    } else {
      if (!message.text) return;
      if (message.versions.length > 1) actions.append(pager(message));
      const copy = actionButton("copy", "Copy", "Copy this reply", () => copyText(message.text, copy.lastChild));
      actions.append(copy);
      if (!current && index === rows.length - 1) {
        actions.append(actionButton("regenerate", "Regenerate", "Write this reply again",
          () => runTurn({ text: "", regenerate: true })));
      }
      if (message.stats) {
        const stats = el("span", "stats");
        message.stats.split(" · ").forEach((part, i) => stats.append(...(i ? [" · "] : []), el("span", null, part)));
        actions.append(stats); // each figure stays whole; a narrow screen wraps between them
      }
    }
    row.querySelector(".msg-body").append(actions);
  });
  if (stick) scrollToBottom(); // the new row of buttons must not end up under the message box
}

/** "‹ 2/3 ›": flip through a reply's answers (the newest is the one the conversation goes on from). */
function pager(message) {
  const box = el("span", "pager");
  const previous = el("button", "icon-button small");
  previous.type = "button";
  previous.setAttribute("aria-label", "Previous answer");
  previous.append(icon("left"));
  const next = el("button", "icon-button small");
  next.type = "button";
  next.setAttribute("aria-label", "Next answer");
  next.append(icon("right"));
  const position = el("span", "pager-position", `${message.shown + 1}/${message.versions.length}`);
  position.setAttribute("aria-live", "polite");
  previous.disabled = message.shown === 0;
  next.disabled = message.shown === message.versions.length - 1;
  // The answer shown is the one the conversation goes on from: the server is told at once.
  const flip = async (step) => {
    if (current) return;
    const version = message.shown + step;
    const index = messages().indexOf(message.row);
    previous.disabled = next.disabled = true;
    const result = conversation.id
      ? await api.updateConversation(conversation.id, { select: { message: index, version } }).catch(() => null)
      : null;
    if (!result || !result.ok) {
      showNotice("Could not switch to that answer. Try again.", { kind: "warn" });
      updateActions();
      return;
    }
    message.shown = version;
    message.text = message.versions[version];
    message.render();
    showDetails(message);
    updateActions();
    message.row.querySelector(`[aria-label="${step < 0 ? "Previous" : "Next"} answer"]`)?.focus();
  };
  previous.addEventListener("click", () => flip(-1));
  next.addEventListener("click", () => flip(1));
  box.append(previous, position, next);
  return box;
}

/** "‹ 1/2 ›" on an edited message: each version with the replies that followed it (the server keeps them all). */
function branchPager(message, index) {
  const box = el("span", "pager");
  const buttons = [["Previous version", "left", -1], ["Next version", "right", 1]].map(([label, name, step]) => {
    const button = el("button", "icon-button small");
    button.type = "button";
    button.setAttribute("aria-label", label);
    button.append(icon(name));
    const version = message.branchShown + step;
    button.disabled = version < 0 || version >= message.branchCount;
    button.addEventListener("click", async () => {
      if (current) return;
      buttons.forEach((b) => { b.disabled = true; });
      const result = await api.updateConversation(conversation.id, { select: { message: index, version } }).catch(() => null);
      if (!result || !result.ok) {
        showNotice("Could not switch to that version. Try again.", { kind: "warn" });
        updateActions();
        return;
      }
      const top = message.row.offsetTop - log.scrollTop; // keep the message where it was on screen
      await showConversation(conversation.id, 0, { keepScroll: true });
      const row = messages()[index];
      if (row) {
        log.scrollTop = row.offsetTop - top;
        row.querySelector(`[aria-label="${label}"]`)?.focus();
      }
      refreshConversations().catch(() => {});
    });
    return button;
  });
  const position = el("span", "pager-position", `${message.branchShown + 1}/${message.branchCount}`);
  position.setAttribute("aria-live", "polite");
  box.append(buttons[0], position, buttons[1]);
  return box;
}

/** Edit a sent message in place; sending it starts a new version of it (the old one stays, with its replies). */
function startEdit(message, index) {
  if (current) return;
  const row = message.row;
  row.classList.add("editing");
  const editor = el("form", "editor");
  const label = el("label", "visually-hidden", "Edit message");
  const box = el("textarea", "editor-input");
  box.id = `edit-${index}`;
  label.htmlFor = box.id;
  box.value = message.text;
  box.rows = Math.min(8, Math.max(2, message.text.split("\n").length));
  const buttons = el("div", "editor-buttons");
  const cancel = el("button", "button small ghost", "Cancel");
  cancel.type = "button";
  const save = el("button", "button small primary", "Send");
  save.type = "submit";
  buttons.append(cancel, save);
  editor.append(label, box, buttons);
  message.bubble.hidden = true;
  row.querySelector(".msg-body").prepend(editor);
  const close = () => {
    editor.remove();
    message.bubble.hidden = false;
    row.classList.remove("editing");
    updateActions();
  };
  cancel.addEventListener("click", close);
  box.addEventListener("keydown", (event) => {
    if (event.key === "Escape") {
      event.stopPropagation();
      close();
    } else if (event.key === "Enter" && !event.shiftKey && !event.isComposing && event.keyCode !== 229) {
      event.preventDefault();
      editor.requestSubmit();
    }
  });
  editor.addEventListener("submit", (event) => {
    event.preventDefault();
    const text = box.value;
    if (!text.trim()) return;
    close();
    runTurn({ text, regenerate: false, editIndex: index });
  });
  updateActions();
  box.focus();
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
    conversationId: typeof body.conversation_id === "string" ? body.conversation_id : null,
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
    case "session_busy": {
      // With a lock per conversation the server says which one is busy; a lock per session says nothing more.
      const busy = error.conversationId;
      const title = knownConversations.find((item) => item.id === busy)?.title;
      const where = !busy ? null : busy === conversation.id ? "this conversation" : `“${title || "another conversation"}”`;
      const text = where
        ? `A reply is already being written in ${where} (perhaps in another tab). Wait for it to finish, or stop it there, then try again.`
        : "Another reply is being written in this session (perhaps in another tab). Wait for it to finish, or stop it there, then try again.";
      return { text, retry: true, kind: "warn" };
    }
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

async function runTurn({ text, regenerate, editIndex = null }) {
  if (current) return;
  await historyLoaded;
  if (current) return;
  hideNotice();
  clearTimeout(rereadTimer);

  const controller = new AbortController();
  let finish;
  current = { controller, finished: new Promise((resolve) => { finish = resolve; }) };

  let user = null;
  let replaced = null;
  let dropped = []; // an edit takes the edited message and all after it off the screen
  if (regenerate) {
    const last = lastMessage();
    if (last && last.role === "assistant") replaced = last;
  } else {
    if (editIndex !== null) {
      dropped = messages().slice(editIndex);
      dropped.forEach((row) => row.remove());
    }
    user = addMessage("user", text);
    if (dropped.length) {
      const edited = dropped[0].chatMessage; // the new version comes after the ones this message had
      user.branchCount = Math.min(edited.branchCount + 1, 10);
      user.branchShown = user.branchCount - 1;
    }
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
    runTurn({ text, regenerate, editIndex });
  };
  // Undo the optimistic view when the server refused the turn (it kept nothing).
  const undo = () => {
    if (replaced) reply.row.replaceWith(replaced.row);
    else reply.row.remove();
    if (dropped.length) thread.append(...dropped);
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
      body: JSON.stringify(turnBody(text, regenerate, editIndex)),
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
        reply.ended = { finish_reason: data.finish_reason, completion_tokens: data.usage?.completion_tokens, ...data.timing };
        reply.render();
      } else if (event === "error") {
        outcome = "error";
        reply.ended = { finish_reason: "error" };
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
        reply.ended = { finish_reason: "stopped" };
        reply.render();
      } else if (replaced) {
        // Stopped before any new text: the server keeps the previous reply.
        reply.row.replaceWith(replaced.row);
      } else {
        reply.row.remove();
      }
    } else if (!response) {
      outcome = "offline";
      loadHealth();
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
    keepVersions(reply, replaced);
    if (reply.ended) showDetails(reply);
    current = null;
    setBusy(false);
    updateActions();
    updateEmptyState();
    if (outcome === "done") announce("Reply finished.");
    else if (outcome === "stopped") announce("Stopped.");
    if (outcome !== "refused" && outcome !== "offline") refreshConversations().catch(() => {});
    finish();
  }
}

/** The /chat_stream body: the turn, in the conversation on screen. */
function turnBody(text, regenerate, editIndex) {
  const body = { user_input: text, regenerate };
  if (conversation.id) body.conversation_id = conversation.id;
  if (editIndex !== null) body.edit_index = editIndex;
  return body;
}

/** What the server did for this reply, in one short line. */
function describeStats(details) {
  const parts = [];
  const tokens = details?.completion_tokens;
  const rate = details?.tokens_per_s;
  const ttft = details?.ttft_s;
  if (Number.isFinite(tokens)) parts.push(`${tokens} tokens`);
  if (Number.isFinite(rate)) parts.push(`${rate.toFixed(1)} tokens/s`);
  if (Number.isFinite(ttft)) parts.push(`${ttft.toFixed(2)} s to first token`);
  return parts.join(" · ");
}

/** A regenerated reply keeps the answers it replaced, as the server does (the same answer twice counts once). */
function keepVersions(reply, replaced) {
  const ended = reply.ended || null;
  if (!replaced || !reply.text) {
    reply.versions = [reply.text];
    reply.details = [ended];
    reply.shown = 0;
    return;
  }
  const earlier = replaced.versions;
  const known = earlier.indexOf(reply.text);
  reply.versions = known >= 0 ? earlier : [...earlier.slice(-10), reply.text];
  reply.details = known >= 0 ? replaced.details : [...replaced.details.slice(-10), ended];
  reply.shown = known >= 0 ? known : reply.versions.length - 1;
  if (known >= 0) reply.ended = reply.details[known] || null;
}

function stop() {
  current?.controller.abort();
}

/** Stop a running turn and wait until it has ended (the server saves what was shown). */
async function stopAndWait() {
  if (!current) return;
  const turn = current;
  turn.controller.abort();
  await turn.finished;
}

function clearThread() {
  messages().forEach((row) => row.remove());
  updateEmptyState();
}

async function newChat() {
  await stopAndWait();
  hideNotice();
  closeSidebar();
  const shown = conversationListItems().find((item) => item.id === conversation.id);
  if (conversation.id && !messages().length && shown && shown.message_count === 0) {
    input.focus(); // this one is still empty: no second empty conversation
    return;
  }
  let result;
  try {
    result = await api.createConversation({});
  } catch {
    showNotice("Could not reach the server to start a new chat. Try again.", { retry: newChat });
    return;
  }
  if (!result.ok) {
    showNotice(explain(errorOf(result)).text, { retry: newChat, kind: "warn" });
    return;
  }
  conversation = { id: result.body.id, title: result.body.title, settings: result.body.settings || {} };
  clearThread();
  await refreshConversations();
  announce("New chat started.");
  input.focus();
}

function errorOf(result) {
  return {
    status: result.status,
    code: typeof result.body.error === "string" ? result.body.error : `http_${result.status}`,
    message: typeof result.body.message === "string" ? result.body.message : "",
    retryAfter: 0,
    conversationId: typeof result.body.conversation_id === "string" ? result.body.conversation_id : null,
  };
}

// -- conversations: the sidebar --

let knownConversations = [];

function conversationListItems() {
  return knownConversations;
}

async function refreshConversations() {
  const result = await api.listConversations();
  if (!result.ok) return;
  knownConversations = Array.isArray(result.body.conversations) ? result.body.conversations : [];
  if (!conversation.id && result.body.current) {
    const shown = knownConversations.find((item) => item.id === result.body.current);
    conversation = { id: result.body.current, title: shown?.title || "", settings: shown?.settings || {} };
  }
  const shown = knownConversations.find((item) => item.id === conversation.id);
  if (shown) {
    conversation.title = shown.title;
    conversation.settings = shown.settings || {};
  }
  renderConversations();
}

function renderConversations() {
  conversationList.replaceChildren();
  for (const item of knownConversations) {
    const li = el("li", "conversation");
    li.dataset.id = item.id;
    const open = el("button", "conversation-open", item.title || "Untitled");
    open.type = "button";
    if (item.id === conversation.id) open.setAttribute("aria-current", "true");
    open.addEventListener("click", () => openConversation(item.id));
    const rename = el("button", "icon-button small conversation-rename");
    rename.type = "button";
    rename.setAttribute("aria-label", `Rename ${item.title || "Untitled"}`);
    rename.append(icon("rename"));
    rename.addEventListener("click", () => startRename(li, item));
    const remove = el("button", "icon-button small conversation-delete");
    remove.type = "button";
    remove.setAttribute("aria-label", `Delete ${item.title || "Untitled"}`);
    remove.append(icon("trash"));
    remove.addEventListener("click", () => removeConversation(item));
    li.append(open, rename, remove);
    conversationList.append(li);
  }
  conversationsEmpty.hidden = knownConversations.length > 0;
}

async function openConversation(id) {
  closeSidebar();
  if (id === conversation.id && !current) return;
  await stopAndWait();
  hideNotice();
  const result = await api.updateConversation(id, { current: true });
  if (!result.ok) {
    showNotice(explain(errorOf(result)).text, { kind: "warn" });
    return;
  }
  await showConversation(id);
  renderConversations();
  input.focus();
}

let rereadTimer = null;

/** Put conversation `id` on screen, from the server. */
async function showConversation(id, attempt = 0, { keepScroll = false } = {}) {
  clearTimeout(rereadTimer);
  const result = await api.readConversation(id);
  if (!result.ok) throw new Error(`HTTP ${result.status}`);
  conversation = { id, title: result.body.title || "", settings: result.body.settings || {} };
  clearThread();
  const stored = result.body.messages || [];
  for (const [position, message] of stored.entries()) {
    // Only the last reply can still be being written: an older "streaming" one lost its writer.
    if (position < stored.length - 1 && message.details?.finish_reason === "streaming") message.details = { finish_reason: "stopped" };
    if ((message.role === "user" || message.role === "assistant") && typeof message.content === "string") {
      const alternatives = Array.isArray(message.alternatives) ? message.alternatives.filter((a) => typeof a === "string") : [];
      const version = Number.isInteger(message.version) && message.version <= alternatives.length ? message.version : alternatives.length;
      const others = Array.isArray(message.alternative_details) && message.alternative_details.length === alternatives.length
        ? message.alternative_details : alternatives.map(() => null);
      const details = [...others.slice(0, version), message.details || null, ...others.slice(version)];
      const added = addMessage(message.role, message.content, alternatives, version, details);
      if (message.role === "user" && Array.isArray(message.branches) && message.branches.length) {
        added.branchCount = message.branches.length + 1;
        added.branchShown = Number.isInteger(message.branch) && message.branch < message.branches.length ? message.branch : message.branches.length;
      }
    }
  }
  updateEmptyState();
  updateActions();
  if (!keepScroll) scrollToBottom();
  // A reply still being written (this page was reloaded mid-reply, or another tab is writing it):
  // the server saves how it ended a moment later, so read the conversation again for a while.
  const last = lastMessage();
  const unfinished = last && (last.role === "user" || last.details[last.shown]?.finish_reason === "streaming");
  if (unfinished && attempt < 20) {
    rereadTimer = setTimeout(() => {
      if (!current && conversation.id === id) showConversation(id, attempt + 1).catch(() => {});
    }, Math.min(250 * 2 ** attempt, 2000));
  }
}

function startRename(li, item) {
  const form = el("form", "rename");
  const label = el("label", "visually-hidden", "New title");
  const box = el("input", "rename-input");
  box.id = `rename-${item.id}`;
  label.htmlFor = box.id;
  box.value = item.title;
  box.maxLength = 200;
  form.append(label, box);
  li.replaceChildren(form);
  let done = false;
  const finish = async (save) => {
    if (done) return;
    done = true;
    const title = box.value.trim();
    if (save && title && title !== item.title) {
      const result = await api.updateConversation(item.id, { title });
      if (!result.ok) showNotice(explain(errorOf(result)).text, { kind: "warn" });
    }
    await refreshConversations();
  };
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    finish(true);
  });
  box.addEventListener("keydown", (event) => {
    if (event.key === "Escape") {
      event.stopPropagation();
      finish(false);
    }
  });
  box.addEventListener("blur", () => finish(true));
  box.focus();
  box.select();
}

async function removeConversation(item) {
  if (!confirm(`Delete “${item.title || "Untitled"}”? This cannot be undone.`)) return;
  if (item.id === conversation.id) await stopAndWait();
  const result = await api.deleteConversation(item.id);
  if (!result.ok && result.status !== 404) {
    showNotice(explain(errorOf(result)).text, { kind: "warn" });
    return;
  }
  if (item.id === conversation.id) {
    conversation = { id: null, title: "", settings: {} };
    clearThread();
    if (result.body.current) await showConversation(result.body.current);
  }
  await refreshConversations();
  announce("Conversation deleted.");
}

function openSidebar() {
  sidebar.classList.add("open");
  backdrop.hidden = false;
  sidebarToggle.setAttribute("aria-expanded", "true");
  sidebar.querySelector("[aria-current], button")?.focus();
}

function closeSidebar() {
  if (!sidebar.classList.contains("open")) return;
  sidebar.classList.remove("open");
  backdrop.hidden = true;
  sidebarToggle.setAttribute("aria-expanded", "false");
}

// -- settings: of this conversation, or the user's defaults for all chats --

/** Each setting: its field, its name for people, and what it may be (limits come from GET settings). */
const SETTINGS = [
  { name: "system_prompt", field: $("setting-system"), label: "System prompt", kind: "text" },
  { name: "temperature", field: $("setting-temperature"), label: "Temperature", kind: "number", min: 0, max: (l) => l.temperature },
  { name: "top_p", field: $("setting-top-p"), label: "Top-p", kind: "number", above: 0, max: () => 1 },
  { name: "max_tokens", field: $("setting-max-tokens"), label: "Max tokens", kind: "integer", min: 1, max: (l) => l.max_tokens, limitNote: " (this server's limit)" },
  { name: "top_k", field: $("setting-top-k"), label: "Top-k", kind: "integer", min: 0, max: (l) => l.top_k ?? 2147483647, minNote: " (off)" },
  { name: "seed", field: $("setting-seed"), label: "Seed", kind: "integer", min: -(2 ** 63), max: () => 2 ** 64 - 1 },
  { name: "stop", field: $("setting-stop"), label: "Stop sequences", kind: "lines" },
];
const FALLBACK_LIMITS = { temperature: 2, max_tokens: 1 << 20, top_k: null, stop: 4, stop_chars: 100 };
/** GET settings: { server, limits, defaults } (read again each time the dialog opens). */
let settingsInfo = { server: {}, limits: FALLBACK_LIMITS, defaults: {} };

function settingsScope() {
  return $("scope-all").checked ? "all" : "chat";
}

function describeDefault(setting, value) {
  if (setting.name === "stop") return Array.isArray(value) && value.length ? value.join(" · ") : "none (one per line)";
  if (setting.name === "seed") return value === null || value === undefined ? "random" : String(value);
  if (setting.name === "system_prompt") return value || "none";
  if (setting.name === "top_k" && value === 0) return "0 (off)";
  return value === null || value === undefined ? "" : String(value);
}

/** Fill the form for the scope chosen: the values set there, and in each empty field the default it falls back to. */
function fillSettings() {
  const all = settingsScope() === "all";
  const values = (all ? settingsInfo.defaults : conversation.settings) || {};
  for (const setting of SETTINGS) {
    const value = values[setting.name];
    setting.field.value = value === undefined || value === null ? "" : Array.isArray(value) ? value.join("\n") : String(value);
    const fallback = all ? settingsInfo.server[setting.name] : (settingsInfo.defaults[setting.name] ?? settingsInfo.server[setting.name]);
    setting.field.placeholder = describeDefault(setting, fallback);
    setting.field.removeAttribute("aria-invalid");
  }
  $("setting-max-tokens").max = String(settingsInfo.limits.max_tokens);
  $("settings-text").textContent = all
    ? "Defaults for every chat of yours; a chat's own settings win. An empty field uses the server's default shown in it."
    : "These apply to this chat only. An empty field uses the default shown in it.";
  settingsError.hidden = true;
}

async function openSettings() {
  try {
    const result = await api.call("GET", "settings");
    if (result.ok) settingsInfo = { server: result.body.server || {}, limits: { ...FALLBACK_LIMITS, ...result.body.limits }, defaults: result.body.defaults || {} };
  } catch {
    // offline: the form still opens; saving will say what went wrong
  }
  $("scope-chat").checked = true;
  fillSettings();
  settingsDialog.showModal();
  SETTINGS[0].field.focus();
}

/** The form's values (null: use the default), or `{ error, field }` in words for people. */
function readSettings() {
  const limits = settingsInfo.limits;
  const settings = {};
  for (const setting of SETTINGS) {
    const raw = setting.field.value.trim();
    if (setting.kind === "text") {
      settings[setting.name] = raw ? setting.field.value : null;
      continue;
    }
    if (setting.kind === "lines") {
      const lines = setting.field.value.split("\n").filter((line) => line.trim());
      if (lines.length > limits.stop) return { error: `Give at most ${limits.stop} stop sequences, one per line.`, setting };
      if (lines.some((line) => line.length > limits.stop_chars)) return { error: `A stop sequence may have at most ${limits.stop_chars} characters.`, setting };
      settings[setting.name] = lines.length ? lines : null;
      continue;
    }
    if (raw === "") {
      settings[setting.name] = null;
      continue;
    }
    const value = Number(raw);
    const max = setting.max(limits);
    const low = setting.above !== undefined ? `more than ${setting.above}` : `${setting.min}${setting.minNote || ""}`;
    const range = setting.above !== undefined
      ? `${setting.label} must be more than ${setting.above} and at most ${max}.`
      : `${setting.label} must be between ${low} and ${max}${setting.limitNote || ""}.`;
    if (!Number.isFinite(value)) return { error: `${setting.label} must be a number. ${range}`, setting };
    if (setting.kind === "integer" && !Number.isInteger(value)) return { error: `${setting.label} must be a whole number.`, setting };
    if ((setting.above !== undefined ? value <= setting.above : value < setting.min) || value > max) return { error: range, setting };
    settings[setting.name] = value;
  }
  return { settings };
}

/** A server refusal in the form's words: "'settings.top_k' must be ..." -> "Top-k must be ...". */
function humanSettingsError(message) {
  const text = String(message || "").replace(/'settings\.(\w+)'/g, (whole, name) => SETTINGS.find((s) => s.name === name)?.label || name);
  return sentence(text);
}

function showSettingsError(text, setting = null) {
  settingsError.textContent = text;
  settingsError.hidden = false;
  if (setting) {
    setting.field.setAttribute("aria-invalid", "true");
    setting.field.focus();
  }
}

async function saveSettings(event) {
  event.preventDefault();
  SETTINGS.forEach((setting) => setting.field.removeAttribute("aria-invalid"));
  const { settings, error, setting } = readSettings();
  if (error) {
    showSettingsError(error, setting);
    return;
  }
  const all = settingsScope() === "all";
  let result;
  try {
    if (all) {
      result = await api.call("PATCH", "settings", { defaults: settings });
    } else if (conversation.id) {
      result = await api.updateConversation(conversation.id, { settings });
    } else {
      const kept = Object.fromEntries(Object.entries(settings).filter(([, value]) => value !== null));
      result = await api.createConversation({ settings: kept });
    }
  } catch {
    showSettingsError("Could not reach the server. Try again.");
    return;
  }
  if (!result.ok) {
    const param = typeof result.body.param === "string" ? result.body.param.replace(/^settings\./, "") : "";
    showSettingsError(humanSettingsError(result.body.message || `The server refused the settings (${result.status})`),
      SETTINGS.find((s) => s.name === param) || null);
    return;
  }
  if (all) {
    settingsInfo.defaults = result.body.defaults || {};
  } else {
    conversation = { id: result.body.id, title: result.body.title, settings: result.body.settings || {} };
  }
  settingsDialog.close();
  await refreshConversations();
  announce(all ? "Defaults for all chats saved." : "Settings saved.");
}

// -- export --

async function exportConversation(format) {
  $("export-menu").open = false;
  let title = conversation.title;
  let messagesOut = messages().map((row) => {
    const message = row.chatMessage;
    const out = { role: message.role, content: message.text };
    if (message.role === "assistant" && message.versions.length > 1) out.alternatives = message.versions.filter((_, i) => i !== message.shown);
    return out;
  });
  if (conversation.id) {
    const result = await api.readConversation(conversation.id); // the server's copy is the record
    if (result.ok) {
      title = result.body.title;
      messagesOut = result.body.messages;
    }
  }
  if (format === "json") {
    const body = { id: conversation.id, title, settings: conversation.settings, exported: new Date().toISOString(), messages: messagesOut };
    api.download(title, "json", "application/json", `${JSON.stringify(body, null, 2)}\n`);
  } else {
    api.download(title, "md", "text/markdown", api.toMarkdown(title, messagesOut));
  }
}

// -- history and health --

async function loadHistory() {
  try {
    await refreshConversations();
    if (conversation.id) await showConversation(conversation.id);
  } catch {
    showNotice("Could not load this conversation from the server.", { retry: () => location.reload() });
  }
  renderConversations();
  updateEmptyState();
  updateActions();
  scrollToBottom();
}

let healthTimer = null;
let modelLabel = "";

/**
 * The dot by the model's name: green when ready, amber while loading, red when the server says it
 * cannot answer, grey when the server does not answer at all. Checked every 15 s (every 3 s while
 * not ready), at once when a request could not reach the server, and when the tab comes back.
 */
async function loadHealth() {
  clearTimeout(healthTimer);
  let state = "error";
  try {
    const response = await fetch("health", { cache: "no-store" });
    const body = await response.json();
    if (typeof body.model === "string" && body.model) {
      modelLabel = body.model;
      document.title = `${body.model} · chatstream`;
    }
    state = body.status === "ok" ? "ok" : body.status === "loading" ? "loading" : "error";
  } catch {
    state = "offline";
  }
  modelName.textContent = state === "offline" ? (modelLabel ? `${modelLabel} · offline` : "offline") : modelLabel || "unknown";
  modelDot.dataset.state = state;
  const labels = { ok: "ready", loading: "loading", error: "unavailable", offline: "the server does not answer" };
  $("model").title = `Model status: ${labels[state]}`;
  healthTimer = setTimeout(loadHealth, state === "ok" ? 15000 : 3000);
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
sidebarToggle.addEventListener("click", () => (sidebar.classList.contains("open") ? closeSidebar() : openSidebar()));
$("sidebar-close").addEventListener("click", closeSidebar);
backdrop.addEventListener("click", closeSidebar);
$("open-settings").addEventListener("click", openSettings);
$("settings-form").addEventListener("submit", saveSettings);
$("settings-cancel").addEventListener("click", () => settingsDialog.close());
$("scope-chat").addEventListener("change", fillSettings);
$("scope-all").addEventListener("change", fillSettings);
$("export-markdown").addEventListener("click", () => exportConversation("markdown"));
$("export-json").addEventListener("click", () => exportConversation("json"));
$("notice-close").addEventListener("click", hideNotice);
document.addEventListener("keydown", (event) => {
  if (event.key === "Escape" && sidebar.classList.contains("open")) closeSidebar();
  else if (event.key === "Escape" && current) stop();
});
for (const suggestion of document.querySelectorAll(".suggestion")) {
  suggestion.addEventListener("click", () => {
    input.value = suggestion.textContent.trim();
    submit();
  });
}

log.addEventListener("scroll", updateJumpButton, { passive: true });
jumpButton.addEventListener("click", () => {
  scrollToBottom();
  input.focus({ preventScroll: true });
});
document.addEventListener("visibilitychange", () => {
  if (document.visibilityState === "visible") loadHealth();
});
window.addEventListener("online", loadHealth);

historyLoaded = loadHistory();
loadHealth();
autosize();
input.focus();
