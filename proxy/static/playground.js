// The playground: a chat page over the gateway's /chat/ws (README, "Playground").
// No framework, no build step, nothing fetched from the internet.
"use strict";
(() => {
  const root = document.body.dataset.root || "";
  const $ = (id) => document.getElementById(id);
  const keyInput = $("key");
  const modelSelect = $("model");
  const transcript = $("transcript");
  const prompt = $("prompt");
  const sendButton = $("send");
  const stopButton = $("stop");
  const statusPill = $("status");
  const KEY_STORE = "vllm-wrapper.playground.key";

  let socket = null;          // the open WebSocket, once "ready"
  let connecting = null;      // a Promise while the socket opens
  let history = [];           // the conversation sent with every turn
  let current = null;         // the answer being streamed
  let turns = 0;

  keyInput.value = sessionStorage.getItem(KEY_STORE) || "";

  function setStatus(state, text) {
    statusPill.dataset.state = state;
    statusPill.textContent = text;
  }

  function authHeaders() {
    const key = keyInput.value.trim();
    return key ? { Authorization: "Bearer " + key } : {};
  }

  async function loadModels() {
    modelSelect.innerHTML = "";
    let response;
    try {
      response = await fetch(root + "/models", { headers: authHeaders() });
    } catch (err) {
      setStatus("error", "gateway unreachable");
      return;
    }
    if (response.status === 401) {
      modelSelect.append(new Option("enter the API key", ""));
      setStatus("error", "API key needed");
      keyInput.focus();
      return;
    }
    if (!response.ok) {
      modelSelect.append(new Option("models unavailable (" + response.status + ")", ""));
      setStatus("error", "upstream unavailable");
      return;
    }
    const body = await response.json();
    for (const model of body.data || []) modelSelect.append(new Option(model.id, model.id));
    if (!modelSelect.options.length) modelSelect.append(new Option("(default model)", ""));
    if (!socket) setStatus("idle", "ready to connect");
  }

  function socketUrl() {
    const scheme = location.protocol === "https:" ? "wss:" : "ws:";
    return scheme + "//" + location.host + root + "/chat/ws";
  }

  function connect() {
    if (socket) return Promise.resolve(socket);
    if (connecting) return connecting;
    setStatus("connecting", "connecting");
    connecting = new Promise((resolve, reject) => {
      const ws = new WebSocket(socketUrl());
      let opened = false;
      ws.onopen = () => {
        const key = keyInput.value.trim();
        // Browsers cannot set an Authorization header on a WebSocket: the key goes first.
        if (key) ws.send(JSON.stringify({ type: "auth", api_key: key }));
      };
      ws.onmessage = (event) => {
        const message = JSON.parse(event.data);
        if (message.type === "ready") {
          opened = true;
          socket = ws;
          connecting = null;
          setStatus("connected", "connected");
          resolve(ws);
        } else {
          onMessage(message);
        }
      };
      ws.onclose = (event) => {
        socket = null;
        connecting = null;
        if (!opened) {
          setStatus("error", event.code === 1008 ? "API key refused" : "cannot connect");
          reject(new Error(event.code === 1008 ? "the API key was refused" : "could not connect to " + socketUrl()));
          return;
        }
        setStatus("idle", "disconnected");
        if (current) fail(current, "the connection closed (" + event.code + ")");
      };
    });
    return connecting;
  }

  function bubble(role, text) {
    $("empty")?.remove();
    const box = document.createElement("div");
    box.className = "msg " + role;
    const who = document.createElement("div");
    who.className = "who";
    who.textContent = role === "user" ? "You" : "Assistant";
    const body = document.createElement("div");
    body.className = "text";
    body.textContent = text;
    const stats = document.createElement("div");
    stats.className = "stats";
    box.append(who, body, stats);
    transcript.append(box);
    transcript.scrollTop = transcript.scrollHeight;
    return { box, body, stats };
  }

  function setBusy(busy) {
    sendButton.hidden = busy;
    stopButton.hidden = !busy;
    prompt.disabled = busy;
    if (!busy) prompt.focus();
  }

  function onMessage(message) {
    if (message.type === "ping" || message.type === "pong") return;
    const answer = current;
    if (message.type === "error" && (message.id === null || !answer || message.id !== answer.id)) {
      if (answer && message.id === null) fail(answer, message.error.message);
      else setStatus("error", message.error.message);
      return;
    }
    if (!answer || message.id !== answer.id) return;
    if (message.type === "delta") {
      if (answer.firstAt === null) answer.firstAt = performance.now();
      answer.text += message.content;
      answer.view.body.textContent = answer.text;
      answer.view.box.dataset.chunks = String(++answer.chunks);
      transcript.scrollTop = transcript.scrollHeight;
    } else if (message.type === "done") {
      finish(answer, message);
    } else if (message.type === "error") {
      fail(answer, message.error.message);
    }
  }

  function finish(answer, done) {
    const ms = (t) => (t < 1000 ? Math.round(t) + " ms" : (t / 1000).toFixed(2) + " s");
    const parts = [];
    if (done.finish_reason === "cancelled") {
      parts.push('<span class="stopped">stopped</span>');
    }
    if (done.usage) {
      parts.push(done.usage.prompt_tokens + " prompt + " + done.usage.completion_tokens + " completion tokens");
    }
    if (answer.firstAt !== null) parts.push("first token " + ms(answer.firstAt - answer.startedAt));
    parts.push("total " + ms(performance.now() - answer.startedAt));
    if (done.model) parts.push(done.model);
    answer.view.stats.innerHTML = parts.join(" &middot; ");
    answer.view.box.classList.remove("streaming");
    answer.view.box.dataset.finish = done.finish_reason || "";
    if (answer.text && !answer.orphan) history.push({ role: "assistant", content: answer.text });
    current = null;
    setBusy(false);
  }

  function fail(answer, why) {
    answer.view.box.classList.remove("streaming");
    answer.view.box.classList.add("failed");
    answer.view.box.dataset.finish = "error";
    answer.view.body.textContent = (answer.text ? answer.text + "\n\n" : "") + "Error: " + why;
    if (!answer.orphan && history.length && history[history.length - 1].role === "user") {
      history.pop(); // the question that got no answer
    }
    current = null;
    setBusy(false);
  }

  async function ask(text) {
    history.push({ role: "user", content: text });
    bubble("user", text);
    const view = bubble("assistant", "");
    view.box.classList.add("streaming");
    const answer = { id: "turn-" + ++turns, text: "", chunks: 0, view, startedAt: performance.now(), firstAt: null };
    current = answer;
    setBusy(true);
    let ws;
    try {
      ws = await connect();
    } catch (err) {
      fail(answer, err.message);
      return;
    }
    const request = { type: "chat", id: answer.id, messages: history };
    if (modelSelect.value) request.model = modelSelect.value;
    const temperature = parseFloat($("temperature").value);
    if (!Number.isNaN(temperature)) request.temperature = temperature;
    const maxTokens = parseInt($("max-tokens").value, 10);
    if (!Number.isNaN(maxTokens)) request.max_tokens = maxTokens;
    answer.startedAt = performance.now();
    ws.send(JSON.stringify(request));
  }

  $("composer").addEventListener("submit", (event) => {
    event.preventDefault();
    const text = prompt.value.trim();
    if (!text || current) return;
    prompt.value = "";
    ask(text);
  });
  prompt.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey) {
      event.preventDefault();
      $("composer").requestSubmit();
    }
  });
  stopButton.addEventListener("click", () => {
    if (current && socket) socket.send(JSON.stringify({ type: "cancel", id: current.id }));
  });
  $("new").addEventListener("click", () => {
    if (current) {
      current.orphan = true;
      if (socket) socket.send(JSON.stringify({ type: "cancel", id: current.id }));
    }
    history = [];
    transcript.replaceChildren();
    prompt.focus();
  });
  keyInput.addEventListener("change", () => {
    sessionStorage.setItem(KEY_STORE, keyInput.value.trim());
    if (socket) socket.close(); // the next turn reconnects with the new key
    loadModels();
  });

  loadModels();
  prompt.focus();
})();
