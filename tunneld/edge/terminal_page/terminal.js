// The edge's terminal page: ask for a token (or take one from the URL's
// fragment), open WS /ws/terminal/ID, render with xterm.js, follow the
// window's size, and show why the session ended.  The protocol: binary
// messages are the terminal's bytes; text messages are JSON objects with a
// "type": ready, resize, close (reason, message), error, heartbeat.
"use strict";

(function () {
  const status = document.getElementById("status");
  const form = document.getElementById("ask");
  const say = (text, state) => {
    status.textContent = text;
    status.dataset.state = state || "";
  };
  // What tests and people can read: the session's state and close reason.
  window.tunneldTerminal = { state: "starting", reason: null, message: null };

  if (typeof Terminal === "undefined" || typeof FitAddon === "undefined") {
    say("xterm.js is not installed on this edge (scripts/setup installs it)", "closed");
    return;
  }

  const params = new URLSearchParams(location.hash.slice(1));
  // A token is single-use: it leaves the address bar (and history) at once.
  if (location.hash) {
    history.replaceState(null, "", location.pathname + location.search);
  }

  const term = new Terminal({ cursorBlink: true, scrollback: 5000 });
  const fit = new FitAddon.FitAddon();
  term.loadAddon(fit);
  term.open(document.getElementById("terminal"));
  fit.fit();
  window.tunneldTerminal.term = term;

  function connect(allocation, token) {
    const url = new URL("/ws/terminal/" + encodeURIComponent(allocation), location.href);
    url.protocol = location.protocol === "https:" ? "wss:" : "ws:";
    url.searchParams.set("token", token);
    url.searchParams.set("rows", String(term.rows));
    url.searchParams.set("cols", String(term.cols));
    const ws = new WebSocket(url);
    ws.binaryType = "arraybuffer";
    const encoder = new TextEncoder();
    let closed = false;
    const state = window.tunneldTerminal;
    state.state = "pending";
    say("connecting to " + allocation + "…", "pending");

    const end = (reason, message) => {
      if (closed) return;
      closed = true;
      state.state = "closed";
      state.reason = reason;
      state.message = message;
      say("session closed: " + reason + (message ? " — " + message : ""), "closed");
      term.write("\r\n\x1b[31m[session closed: " + reason + "]\x1b[0m\r\n");
    };

    ws.onmessage = (event) => {
      if (typeof event.data !== "string") {
        term.write(new Uint8Array(event.data));
        return;
      }
      const message = JSON.parse(event.data);
      if (message.type === "ready") {
        state.state = "ready";
        state.session = message.session;
        say("connected to " + allocation + " (session " + message.session + ")", "ready");
        term.focus();
      } else if (message.type === "close") {
        end(message.reason, message.message);
      } else if (message.type === "error") {
        say("error: " + message.reason + " — " + message.message, state.state);
      } else if (message.type === "heartbeat") {
        ws.send(JSON.stringify({ type: "heartbeat" }));
      }
    };
    ws.onclose = (event) => end(event.reason || "browser_gone", "connection closed (code " + event.code + ")");
    term.onData((data) => {
      if (ws.readyState === WebSocket.OPEN) ws.send(encoder.encode(data));
    });
    term.onBinary((data) => {
      if (ws.readyState !== WebSocket.OPEN) return;
      const bytes = new Uint8Array(data.length);
      for (let i = 0; i < data.length; i++) bytes[i] = data.charCodeAt(i) & 255;
      ws.send(bytes);
    });
    term.onResize(({ rows, cols }) => {
      if (ws.readyState === WebSocket.OPEN) ws.send(JSON.stringify({ type: "resize", rows, cols }));
    });
    let pending = null;
    window.addEventListener("resize", () => {
      clearTimeout(pending);
      pending = setTimeout(() => fit.fit(), 50);
    });
    state.close = () => ws.send(JSON.stringify({ type: "close", message: "closed from the page" }));
  }

  async function ask(allocation, credential) {
    say("asking for a token…", "pending");
    const response = await fetch(
      "/api/v1/allocations/" + encodeURIComponent(allocation) + "/terminal-token",
      { method: "POST", headers: { Authorization: "Bearer " + credential } });
    const body = await response.json();
    if (!response.ok) {
      say("no token: " + (body.message || body.error), "closed");
      return;
    }
    form.hidden = true;
    connect(allocation, body.token);
  }

  if (params.get("token") && params.get("allocation")) {
    connect(params.get("allocation"), params.get("token"));
  } else {
    form.hidden = false;
    document.getElementById("allocation").value = params.get("allocation") || "";
    say("give an allocation and your operator token", "");
    form.addEventListener("submit", (event) => {
      event.preventDefault();
      ask(document.getElementById("allocation").value, document.getElementById("credential").value)
        .catch((error) => say("no token: " + error, "closed"));
    });
  }
})();
