// The /conversations API as the page uses it, and exporting a conversation as a file.
//
// Changes to a session are refused (409) while a reply is being written in it; a stopped reply
// is saved a moment after the stop, so changes retry for a short while.

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

/** fetch + JSON; `{ ok, status, body, response }`. Network failures throw. */
export async function call(method, path, body) {
  const options = { method, credentials: "same-origin", cache: "no-store", headers: {} };
  if (body !== undefined) {
    options.headers["Content-Type"] = "application/json";
    options.body = JSON.stringify(body);
  }
  let response = null;
  for (let attempt = 0; attempt < 20; attempt++) {
    response = await fetch(path, options);
    if (response.status !== 409 || method === "GET") break;
    const copy = response.clone();
    let code = "";
    try {
      code = (await copy.json()).error;
    } catch {
      code = "";
    }
    if (code !== "session_busy") break;
    await sleep(150);
  }
  if (response.status === 401) location.assign("login");
  let parsed = {};
  try {
    parsed = await response.json();
  } catch {
    parsed = {};
  }
  return { ok: response.ok, status: response.status, body: parsed, response };
}

export const listConversations = () => call("GET", "conversations");
export const readConversation = (id) => call("GET", `conversations/${encodeURIComponent(id)}`);
export const createConversation = (body = {}) => call("POST", "conversations", body);
export const updateConversation = (id, body) => call("PATCH", `conversations/${encodeURIComponent(id)}`, body);
export const deleteConversation = (id) => call("DELETE", `conversations/${encodeURIComponent(id)}`);

/** A conversation as Markdown: a title, then each message under who wrote it. */
export function toMarkdown(title, messages) {
  const parts = [`# ${title || "Conversation"}`];
  for (const message of messages) {
    parts.push(`## ${message.role === "user" ? "You" : "Assistant"}`, message.content);
  }
  return `${parts.join("\n\n")}\n`;
}

/** Save `text` as a file named after `title`. */
export function download(title, extension, type, text) {
  const base = (title || "conversation").replace(/[^\p{L}\p{N} _-]+/gu, "").trim().slice(0, 60) || "conversation";
  const url = URL.createObjectURL(new Blob([text], { type }));
  const link = document.createElement("a");
  link.href = url;
  link.download = `${base}.${extension}`;
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(url), 1000);
}
