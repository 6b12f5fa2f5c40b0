// The guard console: a chat over this server's /v1/chat/completions that draws, under each
// answer, the probe's score and EMA per token, the thresholds, pause points and the verdicts
// over the tokens they cover, as the stream arrives. Model text is only ever written as text
// (textContent, text nodes), never parsed as HTML. What the guard held never reaches the page:
// the server sends released text only, and the trace carries numbers, not tokens.
"use strict";

const $ = (id) => document.getElementById(id);
const SVG_NS = "http://www.w3.org/2000/svg";
const KEY_STORAGE = "oc-engine-api-key";
const METRICS_EVERY_MS = 2000;

const state = {
  key: sessionStorage.getItem(KEY_STORAGE),
  settings: null,
  history: [], // the conversation so far: {role, content}, as the user saw it
  controller: null, // the AbortController of the answer streaming now
  answers: [],
  metrics: null, // the previous /metrics reading, for rates
};

// -- talking to the server ---------------------------------------------------------------
function api(path, options = {}) {
  const headers = Object.assign({}, options.headers || {});
  if (state.key) headers.authorization = `Bearer ${state.key}`;
  return fetch(path, Object.assign({}, options, { headers }));
}

async function errorMessage(response) {
  try {
    const body = await response.json();
    if (body && body.error && body.error.message) return body.error.message;
  } catch (_) { /* not JSON */ }
  return `HTTP ${response.status}`;
}

// Server-sent events from a fetch body: calls onData with each parsed `data:` payload until [DONE].
async function readEvents(response, onData) {
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
        const payload = line.slice(6);
        if (payload === "[DONE]") return;
        onData(JSON.parse(payload));
      }
    }
  }
}

// -- the risk trace of one answer ----------------------------------------------------------
// x: token index; y: probability in [0, 1]. Redrawn at most once per animation frame, so a
// burst of tokens costs one drawing.
class Trace {
  constructor(parent, thresholds) {
    this.thresholds = thresholds;
    this.points = []; // by token index: {score, ema} (null: not finite)
    this.count = 0; // tokens scored
    this.pauses = [];
    this.verdicts = []; // {from, covers, verdict, p_unsafe, input, final}
    this.judged = 0; // tokens covered by the last answer check (a verdict's span starts there)
    this.scheduled = false;
    this.root = document.createElement("div");
    this.root.className = "trace";
    this.root.dataset.points = "0";
    this.svg = document.createElementNS(SVG_NS, "svg");
    this.svg.setAttribute("viewBox", "0 0 1000 150");
    this.svg.setAttribute("preserveAspectRatio", "none");
    this.svg.setAttribute("role", "img");
    this.svg.setAttribute("aria-label", "the probe's score and EMA per token");
    this.caption = document.createElement("div");
    this.caption.className = "caption";
    this.root.append(this.svg, this.caption);
    parent.append(this.root);
    this.draw();
  }

  add(index, score, ema) {
    if (!this.points[index]) this.count += 1;
    this.points[index] = { score, ema };
    this.root.dataset.points = String(this.count);
    this.schedule();
  }

  pause(index) {
    this.pauses.push(index);
    this.schedule();
  }

  verdict(v) {
    const from = v.input ? 0 : Math.min(this.judged, v.covers);
    this.verdicts.push(Object.assign({ from }, v));
    if (!v.input && v.verdict === "allow") this.judged = Math.max(this.judged, v.covers);
    this.schedule();
  }

  schedule() {
    if (this.scheduled) return;
    this.scheduled = true;
    requestAnimationFrame(() => { this.scheduled = false; this.draw(); });
  }

  draw() {
    const left = 34, right = 992, top = 8, bottom = 118, strip = 126;
    const n = Math.max(this.points.length, 16);
    const x = (i) => left + (right - left) * (i + 0.5) / n;
    const y = (p) => bottom - (bottom - top) * p;
    const parts = [];
    const line = (cls, x1, y1, x2, y2) => parts.push(["line", { class: cls, x1, y1, x2, y2 }]);
    const { warn, pause } = this.thresholds;
    parts.push(["rect", { class: "pause-band", x: left, y: top, width: right - left, height: y(pause) - top }]);
    line("axis", left, bottom, right, bottom);
    line("axis", left, top, left, bottom);
    line("warn", left, y(warn), right, y(warn));
    line("pause", left, y(pause), right, y(pause));
    parts.push(["text", { x: 4, y: top + 8 }, "1"], ["text", { x: 4, y: bottom }, "0"],
               ["text", { x: right - 60, y: 148 }, `${this.points.length} tokens`]);
    for (const key of ["score", "ema"]) {
      // A non-finite value (which pauses) breaks the line and is marked.
      let run = [];
      const flush = () => { if (run.length) parts.push(["polyline", { class: key, points: run.join(" ") }]); run = []; };
      this.points.forEach((point, i) => {
        const value = point && point[key];
        if (value === null || value === undefined) {
          flush();
          if (point && key === "score") parts.push(["circle", { class: "nonfinite", cx: x(i), cy: top + 4, r: 3 }]);
        } else {
          run.push(`${x(i).toFixed(1)},${y(value).toFixed(1)}`);
        }
      });
      flush();
    }
    for (const index of this.pauses) line("pausemark", x(index) - (right - left) / n / 2, top, x(index) - (right - left) / n / 2, bottom);
    for (const v of this.verdicts) {
      const x0 = v.input ? left : x(v.from) - (right - left) / n / 2;
      const x1 = v.input ? left + 6 : Math.max(x(v.covers - 1) + (right - left) / n / 2, x0 + 3);
      const p = v.p_unsafe === null || v.p_unsafe === undefined ? "" : ` p(unsafe)=${v.p_unsafe.toFixed(3)}`;
      parts.push(["rect", { class: `span-${v.verdict}`, x: x0, y: strip, width: x1 - x0, height: 10 },
                  `${v.input ? "input check" : v.final ? "final check" : "check"} of ${v.covers} tokens: ${v.verdict}${p}`]);
    }
    this.svg.replaceChildren(...parts.map(([tag, attrs, text]) => {
      const el = document.createElementNS(SVG_NS, tag);
      for (const [name, value] of Object.entries(attrs)) el.setAttribute(name, value);
      if (text !== undefined) {
        if (tag === "text") el.textContent = text;
        else { const title = document.createElementNS(SVG_NS, "title"); title.textContent = text; el.append(title); }
      }
      return el;
    }));
    const last = this.points[this.points.length - 1];
    this.caption.textContent = last && last.ema !== null
      ? `last token: score ${fmt(last.score)}, EMA ${last.ema.toFixed(3)} (warn ${warn}, pause ${pause})`
      : `warn ${warn}, pause ${pause}`;
  }
}

const fmt = (value) => value === null || value === undefined ? "n/a" : value.toFixed(3);

// -- one answer in the chat ----------------------------------------------------------------
class Answer {
  constructor(settings) {
    this.shown = ""; // the text the server released, then the refusal: what the user saw
    this.root = element("div", "msg assistant");
    this.root.append(element("div", "role", "assistant"));
    this.text = element("div", "text");
    this.badges = element("div", "badges");
    this.root.append(this.text, this.badges);
    this.node = null; // the text node that released text is appended to
    this.trace = settings.guard_details && settings.thresholds ? new Trace(this.root, settings.thresholds) : null;
  }

  append(piece) {
    if (!this.node) {
      this.node = document.createTextNode("");
      this.text.append(this.node);
    }
    this.node.data += piece;
    this.shown += piece;
  }

  marker(classes, label, title) {
    const mark = element("span", `marker ${classes}`, label);
    mark.title = title;
    this.text.append(mark);
    this.node = null; // text after the marker goes after it
  }

  guardEvent(event) {
    if (event.event === "score") {
      if (this.trace) this.trace.add(event.token_index, event.score, event.ema);
    } else if (event.event === "paused") {
      this.marker("paused", `paused at token ${event.token_index}, held`,
                  "The probe's EMA crossed the pause threshold: this token and the ones after it are held " +
                  "until the classifier allows them.");
      if (this.trace) this.trace.pause(event.token_index);
    } else if (event.event === "verdict") {
      const what = event.input ? "input check" : event.final ? "final check" : `check of ${event.covers} tokens`;
      const p = event.p_unsafe === null || event.p_unsafe === undefined ? "" : ` p(unsafe) ${event.p_unsafe.toFixed(3)}`;
      this.marker(`verdict ${event.verdict}`, `${event.verdict}${p}`, `${what}: ${event.verdict}${p}` +
                  (event.latency_ms ? `, ${event.latency_ms.toFixed(0)} ms` : "") + (event.error ? ` (${event.error})` : ""));
      if (this.trace) this.trace.verdict(event);
    }
  }

  finish(reason, report) {
    this.root.dataset.finish = reason;
    if (report && report.refusal && (report.status === "blocked" || reason === "content_filter")) this.markRefusal(report.refusal);
    this.badge(reason, reason === "content_filter" ? "content_filter" : "");
    if (report && report.guarded) this.badge(`guard: ${report.status}`);
    if (report && report.released_tokens !== undefined) this.badge(`${report.released_tokens} tokens shown`);
    if (report && report.generated_tokens !== undefined && report.generated_tokens !== report.released_tokens) {
      this.badge(`${report.generated_tokens - report.released_tokens} held, never shown`);
    }
  }

  // The refusal came as the last text of a blocked answer: set it apart.
  markRefusal(refusal) {
    const node = this.node;
    if (!node || !node.data.endsWith(refusal)) return;
    const tail = node.splitText(node.data.length - refusal.length);
    const span = element("span", "refusal");
    tail.replaceWith(span);
    span.append(tail);
    this.node = null;
  }

  badge(label, classes = "") {
    this.badges.append(element("span", `badge ${classes}`, label));
  }

  fail(message) {
    this.root.dataset.finish = "error";
    this.badge("error", "error");
    this.badges.append(element("span", "hint", message));
  }
}

function element(tag, className, text) {
  const el = document.createElement(tag);
  if (className) el.className = className;
  if (text !== undefined) el.textContent = text;
  return el;
}

// -- the chat ------------------------------------------------------------------------------
async function send(prompt) {
  const settings = state.settings;
  const messages = [];
  const system = $("system").value.trim();
  if (system) messages.push({ role: "system", content: system });
  messages.push(...state.history, { role: "user", content: prompt });

  const user = element("div", "msg user");
  user.append(element("div", "role", "user"), element("div", "text", prompt));
  const answer = new Answer(settings);
  $("messages").append(user, answer.root);
  state.answers.push(answer);
  answer.root.scrollIntoView({ block: "end" });

  const body = {
    model: settings.model, messages, stream: true,
    max_tokens: Number($("max-tokens").value) || 256, temperature: Number($("temperature").value) || 0,
  };
  if (answer.trace) body.oc_engine = { trace: true };
  busy(true);
  state.controller = new AbortController();
  let finished = false;
  try {
    const response = await api("/v1/chat/completions", {
      method: "POST", headers: { "content-type": "application/json" }, body: JSON.stringify(body),
      signal: state.controller.signal,
    });
    if (!response.ok) {
      answer.fail(await errorMessage(response));
      if (response.status === 401) showKeyForm("The key was refused.");
      return;
    }
    await readEvents(response, (chunk) => { finished = handleChunk(answer, chunk) || finished; });
  } catch (error) {
    if (error.name === "AbortError") answer.finish("cancelled", null);
    else answer.fail(String(error));
    finished = true;
  } finally {
    state.controller = null;
    busy(false);
    if (!finished) answer.fail("the stream ended without a finish");
  }
  // The conversation goes on from what the user saw; a request that failed is not part of it.
  if (answer.root.dataset.finish !== "error") {
    state.history.push({ role: "user", content: prompt }, { role: "assistant", content: answer.shown });
  }
}

// One chunk of the stream into its answer; returns whether the answer ended.
function handleChunk(answer, chunk) {
  if (chunk.error) { answer.fail(chunk.error.message); return true; }
  const report = chunk.oc_engine;
  if (report && report.event) answer.guardEvent(report);
  const choice = chunk.choices && chunk.choices[0];
  if (!choice) return false;
  if (choice.delta && choice.delta.content) answer.append(choice.delta.content);
  if (!choice.finish_reason) return false;
  answer.finish(choice.finish_reason, report);
  return true;
}

function busy(on) {
  $("send").disabled = on;
  $("stop").disabled = !on;
  $("prompt").disabled = on;
  if (!on) $("prompt").focus();
}

// -- the server's state, from /metrics -----------------------------------------------------
function parseMetrics(text) {
  const sums = {};
  for (const line of text.split("\n")) {
    if (!line || line[0] === "#") continue;
    const match = line.match(/^([a-zA-Z_:][\w:]*)(?:\{[^}]*\})?\s+(\S+)/);
    if (match) sums[match[1]] = (sums[match[1]] || 0) + Number(match[2]);
  }
  return sums;
}

async function pollMetrics() {
  try {
    const response = await api("/metrics");
    if (!response.ok) {
      $("metrics-note").textContent = `/metrics: ${await errorMessage(response)}`;
      return;
    }
    const sums = parseMetrics(await response.text());
    const now = performance.now();
    const get = (name) => sums[name] || 0;
    const tokens = get("oc_engine_generation_tokens_total");
    const previous = state.metrics;
    const rate = previous ? (tokens - previous.tokens) / ((now - previous.at) / 1000) : null;
    state.metrics = { tokens, at: now };
    const checks = get("oc_engine_classifier_latency_seconds_count");
    show("running", get("oc_engine_requests_running"));
    show("waiting", get("oc_engine_requests_waiting"));
    show("tokens_per_s", rate === null ? "…" : rate.toFixed(1));
    show("requests", get("oc_engine_requests_total"));
    show("pauses", get("oc_engine_guard_pauses_total"));
    show("blocks", get("oc_engine_guard_blocks_total"));
    show("fail_closed", get("oc_engine_guard_fail_closed_total"));
    show("check_latency", checks ? `${(1000 * get("oc_engine_classifier_latency_seconds_sum") / checks).toFixed(0)} ms` : "–");
    $("metrics-note").textContent = `from /metrics, every ${METRICS_EVERY_MS / 1000} s`;
  } catch (error) {
    $("metrics-note").textContent = `/metrics: ${error}`;
  }
}

function show(name, value) {
  document.querySelector(`[data-metric="${name}"]`).textContent = String(value);
}

// -- start-up ------------------------------------------------------------------------------
function setStatus(text, kind = "") {
  const status = $("status");
  status.textContent = text;
  status.className = `status ${kind}`;
}

function showKeyForm(message) {
  const form = $("key-form");
  form.hidden = false;
  if (message) form.querySelector(".hint").textContent = message;
  $("key").focus();
}

async function connect() {
  let response;
  try {
    response = await api("/console/settings");
  } catch (error) {
    setStatus("server unreachable; retrying", "bad");
    setTimeout(connect, 1000);
    return;
  }
  if (response.status === 401) {
    setStatus("API key needed", "bad");
    showKeyForm(state.key ? "That key was refused." : null);
    return;
  }
  if (!response.ok) {
    setStatus(`${await errorMessage(response)}; retrying`, "bad");
    setTimeout(connect, 1000);
    return;
  }
  state.settings = await response.json();
  ready(state.settings);
}

function ready(settings) {
  state.readyAt = performance.now(); // since navigation started (for `oc-engine bench console`)
  $("key-form").hidden = true;
  $("model").textContent = settings.model;
  setStatus("ready", "ok");
  show("guard", settings.guarded ? "on" : "off");
  const notice = $("notice");
  if (!settings.guarded) {
    notice.textContent = "This server runs without a guard (--no-guard): answers are not watched.";
    notice.hidden = false;
  } else if (!settings.guard_details) {
    notice.textContent = "This server does not send the guard's details, so the risk trace, pauses and verdicts " +
      "are hidden; blocks still show. Start it with --guard-details to see them.";
    notice.hidden = false;
  }
  if (settings.max_tokens) {  // the server's cap on a request
    $("max-tokens").max = settings.max_tokens;
    $("max-tokens").value = Math.min(Number($("max-tokens").value), settings.max_tokens);
  }
  $("prompt").disabled = false;
  $("send").disabled = false;
  $("prompt").focus();
  pollMetrics();
  setInterval(pollMetrics, METRICS_EVERY_MS);
}

function wire() {
  $("key-form").addEventListener("submit", (event) => {
    event.preventDefault();
    state.key = $("key").value.trim() || null;
    if (state.key) sessionStorage.setItem(KEY_STORAGE, state.key);
    connect();
  });
  $("chat-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const prompt = $("prompt").value.trim();
    if (!prompt || state.controller || !state.settings) return;
    $("prompt").value = "";
    send(prompt);
  });
  $("prompt").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey) {
      event.preventDefault();
      $("chat-form").requestSubmit();
    }
  });
  $("stop").addEventListener("click", () => { if (state.controller) state.controller.abort(); });
  $("clear").addEventListener("click", () => {
    if (state.controller) state.controller.abort();
    state.history = [];
    state.answers = [];
    $("messages").replaceChildren();
  });
}

// For tests and benchmarks (`oc-engine bench console` replays a stream through these).
window.ocConsole = { state, Answer, Trace, readEvents, handleChunk };
wire();
connect();
