// chatstream sign-in: posts the key to /login and, once the server sets the sign-in cookie,
// goes to the chat. Without JavaScript the form still posts (and is redirected) by itself.

const form = document.getElementById("login");
const input = document.getElementById("key");
const error = document.getElementById("error");
const submit = document.getElementById("submit");

function showError(text) {
  error.textContent = text;
  error.hidden = false;
  input.select();
}

form.addEventListener("submit", async (event) => {
  event.preventDefault();
  error.hidden = true;
  submit.disabled = true;
  try {
    const response = await fetch("login", {
      method: "POST",
      headers: { "Content-Type": "application/x-www-form-urlencoded" },
      body: new URLSearchParams({ key: input.value }),
      credentials: "same-origin",
      redirect: "manual",
    });
    if (response.type === "opaqueredirect" || response.ok) {
      location.assign("./");
      return;
    }
    let message = "";
    try {
      message = (await response.json()).message || "";
    } catch {
      message = "";
    }
    if (response.status === 429) {
      const wait = parseInt(response.headers.get("Retry-After") || "", 10);
      showError(message || `Too many attempts. Try again in ${Number.isFinite(wait) ? wait : 60} s.`);
    } else if (response.status === 401) {
      showError("That key is not right.");
    } else {
      showError(message || `The server answered ${response.status}.`);
    }
  } catch {
    showError("Could not reach the server. Try again.");
  } finally {
    submit.disabled = false;
  }
});
