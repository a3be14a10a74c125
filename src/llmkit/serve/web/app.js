// llmkit's web page: chat, applications, a blind A/B arena, ratings and a leaderboard, over the server's public API
// (/v1/...) and its votes API (/arena/..., /ratings). Plain JavaScript, no build step, nothing from the internet.
// Model text is always escaped before the small markdown subset below turns it into HTML.
"use strict";

const $ = (id) => document.getElementById(id);
const store = {
  get(key, fallback) { try { const v = localStorage.getItem("llmkit." + key); return v === null ? fallback : JSON.parse(v); } catch { return fallback; } },
  set(key, value) { localStorage.setItem("llmkit." + key, JSON.stringify(value)); },
};
const state = {
  key: store.get("key", ""),
  session: store.get("session", null) || (() => { const s = (crypto.randomUUID ? crypto.randomUUID() : String(Math.random()).slice(2)); store.set("session", s); return s; })(),
  models: [],
  conversations: store.get("conversations", []),
  current: null,
  presets: null,
  preset: "assistant",
  toRate: null,
  battle: null,
};

// --- talking to the server ----------------------------------------------------------------------------------------

class ApiError extends Error {
  constructor(status, message, retryAfter, code) { super(message); this.status = status; this.retryAfter = retryAfter; this.code = code; }
}

function headers() {
  const h = { "Content-Type": "application/json", "X-Llmkit-Session": state.session };
  if (state.key) h.Authorization = "Bearer " + state.key;
  return h;
}

async function errorOf(response) {
  let message = "HTTP " + response.status, code = null;
  try { const body = await response.json(); message = (body.error && body.error.message) || message; code = body.error && body.error.code; } catch { /* not JSON */ }
  return new ApiError(response.status, message, response.headers.get("Retry-After"), code);
}

async function api(path, body) {
  let response;
  try {
    response = await fetch(path, body === undefined ? { headers: headers() } : { method: "POST", headers: headers(), body: JSON.stringify(body) });
  } catch (e) { throw new ApiError(0, "cannot reach the server (" + e.message + ")"); }
  if (!response.ok) throw await errorOf(response);
  return response.json();
}

// Server-sent events of a POST: yields each `data:` object until [DONE].
async function* events(path, body, signal) {
  let response;
  try {
    response = await fetch(path, { method: "POST", headers: headers(), body: JSON.stringify(body), signal });
  } catch (e) {
    if (e.name === "AbortError") throw e;
    throw new ApiError(0, "cannot reach the server (" + e.message + ")");
  }
  if (!response.ok) throw await errorOf(response);
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      for (const line of block.split("\n")) {
        if (!line.startsWith("data: ")) continue;
        const data = line.slice(6);
        if (data === "[DONE]") return;
        const obj = JSON.parse(data);
        if (obj.error) throw new ApiError(500, obj.error.message, null, obj.error.code);
        yield obj;
      }
    }
  }
}

// An error in words a person can act on.
function explain(err) {
  if (err.status === 401) { askKey(); return "The server needs an API key, or the key given is wrong. Enter it with the “API key” button."; }
  if (err.status === 429) {
    const wait = err.retryAfter ? err.retryAfter + (err.retryAfter === "1" ? " second" : " seconds") : "a few seconds";
    return (err.code === "vote_rate_limit" ? "Too many votes in a minute. " : "The server is busy: its queue is full. ") + "Try again in " + wait + ".";
  }
  if (err.status === 503) return "The server is not ready (loading its models, or shutting down). Try again shortly.";
  if (err.code === "context_length_exceeded") return "Too long for the model: " + err.message + " Start a new conversation or shorten the text.";
  if (err.status === 0) return "Cannot reach the server. Is llmkit serve still running?";
  return "The server said: " + err.message;
}

function notice(text, kind) {
  const box = $("notice");
  box.textContent = text;
  box.className = "notice" + (kind === "info" ? " info" : "");
}
function clearNotice() { $("notice").className = "notice hidden"; }

function askKey() {
  const dialog = $("key-dialog");
  if (!dialog.open) { $("key-input").value = state.key; dialog.showModal(); }
}

// --- safe markdown ----------------------------------------------------------------------------------------------

function escapeHtml(s) {
  return s.replace(/&/g, "&amp;").replace(/</g, "&lt;").replace(/>/g, "&gt;").replace(/"/g, "&quot;").replace(/'/g, "&#39;");
}

function inline(s) {  // s is already escaped
  return s.replace(/`([^`]+)`/g, "<code>$1</code>").replace(/\*\*([^*]+)\*\*/g, "<strong>$1</strong>")
    .replace(/(^|[^*])\*([^*\s][^*]*)\*/g, "$1<em>$2</em>");
}

// Paragraphs, headings, bullet and numbered lists, code blocks, `code`, **bold**, *italic*; everything else is text.
function markdown(text) {
  const parts = text.split("```");
  let html = "";
  parts.forEach((part, i) => {
    if (i % 2 === 1) {
      const body = part.replace(/^[^\n]*\n/, "");
      html += "<pre><code>" + escapeHtml(body) + "</code></pre>";
      return;
    }
    let list = null, para = [];
    const flush = () => {
      if (para.length) { html += "<p>" + para.join("<br>") + "</p>"; para = []; }
      if (list) { html += "</" + list + ">"; list = null; }
    };
    for (const raw of part.split("\n")) {
      const line = escapeHtml(raw);
      let m;
      if (!raw.trim()) { flush(); continue; }
      if ((m = raw.match(/^(#{1,3})\s+(.*)$/))) { flush(); html += "<h4>" + inline(escapeHtml(m[2])) + "</h4>"; continue; }
      const bullet = raw.match(/^\s*[-*]\s+(.*)$/), number = raw.match(/^\s*\d+[.)]\s+(.*)$/);
      if (bullet || number) {
        const kind = bullet ? "ul" : "ol";
        if (para.length) { html += "<p>" + para.join("<br>") + "</p>"; para = []; }
        if (list !== kind) { if (list) html += "</" + list + ">"; html += "<" + kind + ">"; list = kind; }
        html += "<li>" + inline(escapeHtml((bullet || number)[1])) + "</li>";
        continue;
      }
      if (list) { html += "</" + list + ">"; list = null; }
      para.push(inline(line));
    }
    flush();
  });
  return html;
}

function setAnswer(el, text) { el.innerHTML = markdown(text); }

// --- tabs, status, models --------------------------------------------------------------------------------------

function showTab(name) {
  document.querySelectorAll("#tabs button").forEach((b) => b.classList.toggle("active", b.dataset.tab === name));
  document.querySelectorAll(".tab").forEach((t) => t.classList.toggle("hidden", t.id !== "tab-" + name));
  if (name === "board") loadBoard();
  if (name === "arena") watchTraining();
}

async function loadModels() {
  try {
    const health = await fetch("/health").then((r) => r.json());
    if (health.status !== "ok") { $("status").textContent = "models " + health.status + "…"; setTimeout(loadModels, 1500); return; }
    const list = await api("/v1/models");
    state.models = list.data.filter((m) => m.kind !== "embedding").map((m) => m.id);
    $("status").textContent = "ready: " + list.data.map((m) => m.id).join(", ");
    document.querySelectorAll(".model-select").forEach((select) => {
      const keep = select.value;
      select.innerHTML = "";
      for (const id of state.models) { const o = document.createElement("option"); o.value = o.textContent = id; select.appendChild(o); }
      if (state.models.includes(keep)) select.value = keep;
    });
    clearNotice();
    loadPresets();
  } catch (err) {
    $("status").textContent = "not connected";
    notice(explain(err));
  }
}

// --- chat ---------------------------------------------------------------------------------------------------------

function saveConversations() { store.set("conversations", state.conversations); }

function newConversation() {
  const c = { id: Date.now().toString(36), title: "New conversation", created: new Date().toISOString(), system: $("chat-system").value, messages: [] };
  state.conversations.unshift(c);
  state.current = c;
  saveConversations();
  renderConversations();
  renderMessages();
}

function renderConversations() {
  const ul = $("conversations");
  ul.innerHTML = "";
  for (const c of state.conversations) {
    const li = document.createElement("li");
    li.textContent = c.title;
    li.className = c === state.current ? "active" : "";
    li.onclick = () => { state.current = c; $("chat-system").value = c.system || ""; renderConversations(); renderMessages(); };
    ul.appendChild(li);
  }
}

function messageElement(m) {
  const div = document.createElement("div");
  div.className = "msg " + m.role;
  const who = document.createElement("div");
  who.className = "who";
  who.textContent = m.role === "user" ? "you" : (m.model || "assistant");
  const body = document.createElement("div");
  body.className = "body";
  if (m.role === "user") body.textContent = m.content; else setAnswer(body, m.content);
  const meta = document.createElement("div");
  meta.className = "meta";
  div.append(who, body, meta);
  if (m.role === "assistant") fillMeta(meta, m);
  return div;
}

function fillMeta(meta, m) {
  meta.textContent = m.note || "";
  if (m.answer_id) {
    const a = document.createElement("a");
    a.textContent = "Rate";
    a.onclick = () => { state.toRate = { answer_id: m.answer_id, text: m.content, model: m.model }; showRate(); showTab("rate"); };
    meta.appendChild(a);
  }
}

function renderMessages() {
  const box = $("messages");
  box.innerHTML = "";
  for (const m of (state.current ? state.current.messages : [])) box.appendChild(messageElement(m));
  box.scrollTop = box.scrollHeight;
}

let chatAbort = null;

async function sendChat(event) {
  event.preventDefault();
  const text = $("chat-input").value.trim();
  if (!text || chatAbort) return;
  if (!state.current) newConversation();
  const c = state.current;
  c.system = $("chat-system").value;
  if (c.messages.length === 0) c.title = text.slice(0, 40);
  c.messages.push({ role: "user", content: text });
  $("chat-input").value = "";
  const answer = { role: "assistant", content: "", model: $("chat-model").value };
  c.messages.push(answer);
  renderConversations();
  renderMessages();
  const box = $("messages");
  const el = box.lastChild;
  const body = el.querySelector(".body"), meta = el.querySelector(".meta");
  const history = (c.system ? [{ role: "system", content: c.system }] : []).concat(c.messages.slice(0, -1).map((m) => ({ role: m.role, content: m.content })));
  const request = { model: answer.model, messages: history, stream: true, stream_options: { include_usage: true },
    temperature: Number($("chat-temperature").value), top_p: Number($("chat-top-p").value), max_tokens: Number($("chat-max-tokens").value) };
  chatAbort = new AbortController();
  $("chat-send").disabled = true;
  $("chat-stop").disabled = false;
  clearNotice();
  try {
    for await (const chunk of events("/v1/chat/completions", request, chatAbort.signal)) {
      if (chunk.answer_id) answer.answer_id = chunk.answer_id;
      if (chunk.usage) answer.note = chunk.usage.completion_tokens + " tokens";
      for (const choice of chunk.choices || []) {
        if (choice.delta && choice.delta.content) { answer.content += choice.delta.content; setAnswer(body, answer.content); box.scrollTop = box.scrollHeight; }
        if (choice.finish_reason === "length") answer.note = "stopped at the token limit";
      }
    }
  } catch (err) {
    if (err.name === "AbortError") answer.note = "stopped";
    else { answer.note = "failed"; notice(explain(err)); if (!answer.content) c.messages.splice(-2, 2); }
  } finally {
    chatAbort = null;
    $("chat-send").disabled = false;
    $("chat-stop").disabled = true;
    saveConversations();
    if (c.messages.includes(answer)) fillMeta(meta, answer); else renderMessages();
  }
}

function exportConversation() {
  const c = state.current;
  if (!c) { notice("There is no conversation to export yet.", "info"); return; }
  const blob = new Blob([JSON.stringify(c, null, 2)], { type: "application/json" });
  const a = document.createElement("a");
  a.href = URL.createObjectURL(blob);
  a.download = "conversation-" + c.id + ".json";
  document.body.appendChild(a);
  a.click();
  a.remove();
}

async function importConversation(event) {
  const file = event.target.files[0];
  if (!file) return;
  try {
    const data = JSON.parse(await file.text());
    const list = Array.isArray(data) ? data : [data];
    for (const c of list) {
      if (!c || !Array.isArray(c.messages) || !c.messages.every((m) => ["user", "assistant"].includes(m.role) && typeof m.content === "string"))
        throw new Error("not a conversation (it needs messages with role and content)");
      c.id = c.id || Date.now().toString(36);
      c.title = String(c.title || "Imported");
      state.conversations.unshift(c);
    }
    state.current = state.conversations[0];
    saveConversations();
    renderConversations();
    renderMessages();
    notice("Imported " + list.length + " conversation(s).", "info");
  } catch (err) {
    notice("Cannot import " + file.name + ": " + err.message);
  }
  event.target.value = "";
}

// --- applications ---------------------------------------------------------------------------------------------

async function loadPresets() {
  if (state.presets) return;
  try {
    state.presets = await api("/applications");
  } catch (err) { notice(explain(err)); return; }
  const box = $("presets");
  box.innerHTML = "";
  for (const [name, p] of Object.entries(state.presets.presets)) {
    const b = document.createElement("button");
    b.textContent = p.title;
    b.dataset.preset = name;
    b.onclick = () => choosePreset(name);
    box.appendChild(b);
  }
  for (const [code, language] of Object.entries(state.presets.languages)) $("app-to").add(new Option(language, code));
  for (const [kind, label] of Object.entries(state.presets.kinds)) $("app-kind").add(new Option(label, kind));
  choosePreset(state.preset);
}

function choosePreset(name) {
  const p = state.presets.presets[name];
  state.preset = name;
  document.querySelectorAll("#presets button").forEach((b) => b.classList.toggle("active", b.dataset.preset === name));
  $("app-system").value = p.system;
  $("app-user").value = p.user;
  $("app-max-tokens").value = p.max_tokens;
  $("app-text").placeholder = p.placeholder || "";
  const options = p.options || {};
  $("app-to-label").classList.toggle("hidden", !options.to);
  $("app-kind-label").classList.toggle("hidden", !options.kind);
  if (p.defaults && p.defaults.to) $("app-to").value = p.defaults.to;
  if (p.defaults && p.defaults.kind) $("app-kind").value = p.defaults.kind;
}

let appAbort = null;

async function runApp() {
  const text = $("app-text").value.trim();
  if (!text) { notice("Write or paste a text for the application first.", "info"); return; }
  // the template's own placeholders first, the text last: a text that says "{language}" stays as written
  const fill = (t) => t.split("{language}").join($("app-to").selectedOptions[0] ? $("app-to").selectedOptions[0].text : "")
    .split("{kind}").join(state.presets.kinds[$("app-kind").value] || "").split("{text}").join(text);
  const messages = [{ role: "system", content: fill($("app-system").value) }, { role: "user", content: fill($("app-user").value) }];
  const out = $("app-output");
  let answer = "";
  out.innerHTML = "";
  appAbort = new AbortController();
  $("app-run").disabled = true;
  $("app-stop").disabled = false;
  clearNotice();
  try {
    const request = { model: $("app-model").value, messages, stream: true, temperature: 0.3, max_tokens: Number($("app-max-tokens").value) };
    for await (const chunk of events("/v1/chat/completions", request, appAbort.signal)) {
      for (const choice of chunk.choices || []) if (choice.delta && choice.delta.content) { answer += choice.delta.content; setAnswer(out, answer); }
    }
  } catch (err) {
    if (err.name !== "AbortError") notice(explain(err));
  } finally {
    appAbort = null;
    $("app-run").disabled = false;
    $("app-stop").disabled = true;
  }
}

// --- arena --------------------------------------------------------------------------------------------------------

let arenaAbort = null;

async function startBattle() {
  const prompt = $("arena-prompt").value.trim();
  if (!prompt) { notice("Write a prompt for the two models first.", "info"); return; }
  const texts = { a: "", b: "" };
  for (const side of ["a", "b"]) { $("arena-" + side).innerHTML = ""; $("arena-name-" + side).textContent = ""; }
  $("arena-result").textContent = "";
  setVotes(false);
  $("arena-start").disabled = true;
  $("arena-stop").disabled = false;
  clearNotice();
  state.battle = null;
  arenaAbort = new AbortController();
  try {
    for await (const event of events("/arena/battles?stream=true", { prompt, max_tokens: Number($("arena-max-tokens").value) }, arenaAbort.signal)) {
      if (event.side && event.delta) { texts[event.side] += event.delta; setAnswer($("arena-" + event.side), texts[event.side]); }
      if (event.battle_id) state.battle = event.battle_id;
    }
    if (state.battle) { setVotes(true); $("arena-result").textContent = "Which answer is better?"; }
  } catch (err) {
    if (err.name === "AbortError") $("arena-result").textContent = "Stopped: this battle is not counted.";
    else notice(explain(err));
  } finally {
    arenaAbort = null;
    $("arena-start").disabled = false;
    $("arena-stop").disabled = true;
  }
}

function setVotes(on) { document.querySelectorAll("#arena-votes button").forEach((b) => { b.disabled = !on; }); }

async function vote(winner) {
  if (!state.battle) return;
  setVotes(false);
  try {
    const names = await api("/arena/votes", { battle_id: state.battle, winner });
    $("arena-name-a").textContent = "— " + names.a;
    $("arena-name-b").textContent = "— " + names.b;
    const words = { a: "A is better", b: "B is better", tie: "a tie", both_bad: "both are bad" }[winner];
    $("arena-result").textContent = "You voted: " + words + ". Thank you! The leaderboard counts it.";
    state.battle = null;
  } catch (err) {
    notice(explain(err));
    if (err.status !== 409 && err.status !== 404) setVotes(true);  // a vote that can never count is not offered again
  }
}

// --- training on the votes (DPO) -------------------------------------------------------------------------------------

let trainTimer = null;

function describeTraining(job) {
  if (job.status === "idle") return "No run yet: vote on at least " + job.min_pairs + " battles (A or B better), then train.";
  const on = job.model + " (DPO of " + job.base + " on " + job.pairs + " pairs from the votes, " + job.held_out + " held out)";
  if (job.status === "running") return "Training " + on + ": step " + job.step + " of " + job.steps + ", " + Math.round(job.seconds) + " s so far.";
  if (job.status === "loading") return "Trained " + on + "; loading it into the server…";
  if (job.status === "failed") return "The run of " + on + " failed: " + job.error;
  const after = job.after || {};
  const num2 = (v) => (v === undefined ? "–" : Number(v).toFixed(2));
  // before training the policy is its reference: margins 0, accuracy 0 by definition; the held-out values after say what moved
  return job.model + " is served: " + job.pairs + " pairs, " + job.step + " steps in " + Math.round(job.seconds)
    + " s; on the " + job.held_out + " held-out pair(s), the chosen answer's reward margin over the rejected one is "
    + num2(after["rewards/margins"]) + " (accuracy " + num2(after["rewards/accuracies"]) + "). The arena now draws it too.";
}

async function watchTraining() {
  clearTimeout(trainTimer);
  try {
    const job = await api("/arena/train");
    $("train-status").textContent = describeTraining(job);
    const busy = job.status === "running" || job.status === "loading";
    $("train-start").disabled = busy;
    if (busy) trainTimer = setTimeout(watchTraining, 2000);
    else if (job.status === "ready" && !state.models.includes(job.model)) loadModels();
  } catch (err) {
    if (err.status === 404) { $("train").classList.add("hidden"); return; }  // a server without a votes database
    $("train-status").textContent = explain(err);
  }
}

async function startTraining() {
  $("train-start").disabled = true;
  clearNotice();
  try {
    const job = await api("/arena/train", { model: $("train-model").value || undefined, steps: Number($("train-steps").value) });
    $("train-status").textContent = describeTraining(job);
    watchTraining();
  } catch (err) {
    notice(explain(err));
    $("train-start").disabled = false;
  }
}

// --- rate ------------------------------------------------------------------------------------------------------------

function buildStars() {
  document.querySelectorAll(".stars").forEach((box) => {
    for (let i = 1; i <= 5; i++) {
      const label = document.createElement("label");
      const input = document.createElement("input");
      input.type = "radio";
      input.name = box.dataset.name;
      input.value = String(i);
      input.onchange = () => { $("rate-submit").disabled = !state.toRate || !document.querySelector("input[name=score]:checked"); };
      label.append(input, document.createTextNode(String(i)));
      box.appendChild(label);
    }
  });
}

function showRate() {
  const r = state.toRate;
  if (r) setAnswer($("rate-answer"), r.text); else $("rate-answer").innerHTML = "";
  document.querySelectorAll("#rate-form input[type=radio]").forEach((i) => { i.checked = false; });
  $("rate-comment").value = "";
  $("rate-result").textContent = r ? "Answer from " + (r.model || "the model") + "." : "";
  $("rate-submit").disabled = true;
}

async function rateGenerate() {
  const prompt = $("rate-prompt").value.trim();
  if (!prompt) { notice("Write a prompt first.", "info"); return; }
  $("rate-generate").disabled = true;
  clearNotice();
  try {
    const model = $("rate-model").value;
    const r = await api("/v1/chat/completions", { model, messages: [{ role: "user", content: prompt }], temperature: 0.7, max_tokens: 200 });
    state.toRate = { answer_id: r.answer_id, text: r.choices[0].message.content, model };
    showRate();
  } catch (err) {
    notice(explain(err));
  } finally {
    $("rate-generate").disabled = false;
  }
}

async function submitRating(event) {
  event.preventDefault();
  const pick = (name) => { const i = document.querySelector("input[name=" + name + "]:checked"); return i ? Number(i.value) : undefined; };
  if (!state.toRate || !state.toRate.answer_id) { notice("There is no answer from this server to rate.", "info"); return; }
  const body = { answer_id: state.toRate.answer_id, score: pick("score"), correctness: pick("correctness"), fluency: pick("fluency"),
    comment: $("rate-comment").value.trim() || undefined };
  try {
    await api("/ratings", body);
    $("rate-result").textContent = "Thank you: your rating of " + state.toRate.model + " is saved.";
    $("rate-submit").disabled = true;
    state.toRate = null;
  } catch (err) {
    notice(explain(err));
  }
}

// --- leaderboard ---------------------------------------------------------------------------------------------------

const num = (x, digits) => (x === null || x === undefined ? "–" : Number(x).toFixed(digits));

async function loadBoard() {
  try {
    const board = await api("/arena/leaderboard");
    const tbody = $("board-table").querySelector("tbody");
    tbody.innerHTML = "";
    board.models.forEach((m, i) => {
      const tr = document.createElement("tr");
      const cells = [i + 1, m.model, num(m.bt, 0) + (m.bt_low === null ? "" : " (" + num(m.bt_low, 0) + " – " + num(m.bt_high, 0) + ")")
        + (m.provisional ? " provisional: " + m.games + " games" : ""),
        num(m.elo, 0), m.games, m.wins + " / " + m.ties + " / " + m.losses,
        m.mean_rating === null ? "–" : num(m.mean_rating, 2) + (m.rating_low === null ? "" : " (" + num(m.rating_low, 2) + " – " + num(m.rating_high, 2) + ")") + " from " + m.ratings];
      for (const c of cells) { const td = document.createElement("td"); td.textContent = String(c); tr.appendChild(td); }
      tbody.appendChild(tr);
    });
    $("board-summary").textContent = board.battles + " votes";
    const matrix = $("board-matrix");
    matrix.innerHTML = "";
    const names = board.models.map((m) => m.model);
    const head = document.createElement("tr");
    for (const name of [""].concat(names)) { const th = document.createElement("th"); th.textContent = name; head.appendChild(th); }
    matrix.appendChild(head);
    for (const a of names) {
      const tr = document.createElement("tr");
      const th = document.createElement("th"); th.textContent = a; tr.appendChild(th);
      for (const b of names) {
        const td = document.createElement("td");
        const v = a === b ? null : (board.win_rates[a] || {})[b];
        td.textContent = v === null || v === undefined ? "–" : Math.round(v * 100) + "%";
        tr.appendChild(td);
      }
      matrix.appendChild(tr);
    }
  } catch (err) {
    notice(explain(err));
  }
}

// --- wiring ----------------------------------------------------------------------------------------------------------

document.querySelectorAll("#tabs button").forEach((b) => { b.onclick = () => showTab(b.dataset.tab); });
$("chat-form").onsubmit = sendChat;
$("chat-input").addEventListener("keydown", (e) => { if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); $("chat-form").requestSubmit(); } });
$("chat-stop").onclick = () => { if (chatAbort) chatAbort.abort(); };
$("chat-new").onclick = newConversation;
$("chat-export").onclick = exportConversation;
$("chat-import").onchange = importConversation;
$("app-run").onclick = runApp;
$("app-stop").onclick = () => { if (appAbort) appAbort.abort(); };
$("arena-start").onclick = startBattle;
$("arena-stop").onclick = () => { if (arenaAbort) arenaAbort.abort(); };
document.querySelectorAll("#arena-votes button").forEach((b) => { b.onclick = () => vote(b.dataset.vote); });
$("train-start").onclick = startTraining;
$("rate-generate").onclick = rateGenerate;
$("rate-form").onsubmit = submitRating;
$("board-refresh").onclick = loadBoard;
$("key-button").onclick = askKey;
$("key-form").addEventListener("submit", (e) => {
  if (e.submitter && e.submitter.value === "save") { state.key = $("key-input").value.trim(); store.set("key", state.key); loadModels(); }
});
buildStars();
state.current = state.conversations[0] || null;
if (state.current) $("chat-system").value = state.current.system || "";
renderConversations();
renderMessages();
loadModels();
