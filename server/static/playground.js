// SliME playground: plain JS, no build step, no network beyond this server.
"use strict";

const $ = (id) => document.getElementById(id);
const VIEW = 336, CELLS = 12;  // CLIP view side and local tokens per tile side
const state = { model: null, history: [], pending: [], controller: null };

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api-key").value.trim();
  if (key) h.Authorization = "Bearer " + key;
  return h;
}

function showError(message) {
  const box = $("error");
  box.textContent = message;
  box.hidden = !message;
}

async function loadModel() {
  try {
    const r = await fetch("/v1/models", { headers: headers() });
    const body = await r.json();
    if (!r.ok) throw new Error(body.error ? body.error.message : r.statusText);
    state.model = body.data[0].id;
    $("model").textContent = "model: " + state.model;
  } catch (e) {
    $("model").textContent = "model unavailable: " + e.message;
  }
}

function readFile(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}

async function addFiles(files) {
  for (const file of files) {
    if (!file.type.startsWith("image/")) continue;
    state.pending.push({ url: await readFile(file), name: file.name || "pasted image" });
  }
  renderPending();
}

function renderPending() {
  const list = $("pending");
  list.replaceChildren();
  state.pending.forEach((p, i) => {
    const li = document.createElement("li");
    const img = document.createElement("img");
    img.src = p.url; img.alt = p.name;
    const rm = document.createElement("button");
    rm.type = "button"; rm.textContent = "remove"; rm.setAttribute("aria-label", "remove " + p.name);
    rm.onclick = (ev) => { ev.stopPropagation(); state.pending.splice(i, 1); renderPending(); };
    li.append(img, rm);
    list.append(li);
  });
}

function addMessage(role, text, images) {
  const li = document.createElement("li");
  li.className = role;
  for (const url of images || []) {
    const img = document.createElement("img");
    img.src = url; img.alt = "attached image";
    li.append(img, document.createElement("br"));
  }
  const span = document.createElement("span");
  span.className = "text";
  span.textContent = text;
  li.append(span);
  $("messages").append(li);
  li.scrollIntoView({ block: "end" });
  return span;
}

function apiMessages() {
  return state.history.map((m) => {
    if (m.role !== "user" || !m.images.length) return { role: m.role, content: m.text };
    return { role: "user", content: [{ type: "text", text: m.text },
      ...m.images.map((url) => ({ type: "image_url", image_url: { url } }))] };
  });
}

// Where the resized image sits inside the padded canvas (SliME's resize-and-pad).
function placement(w, h, cols, rows) {
  const tw = cols * VIEW, th = rows * VIEW, sw = tw / w, sh = th / h;
  const [nw, nh] = sw < sh ? [tw, Math.min(Math.ceil(h * sw), th)] : [Math.min(Math.ceil(w * sh), tw), th];
  return { tw, th, nw, nh, x: Math.floor((tw - nw) / 2), y: Math.floor((th - nh) / 2) };
}

function loadImage(url) {
  return new Promise((resolve, reject) => { const im = new Image(); im.onload = () => resolve(im); im.onerror = reject; im.src = url; });
}

async function drawSelection(report, urls) {
  const box = $("overlays");
  box.replaceChildren();
  $("vision-help").hidden = report.length > 0;
  for (let i = 0; i < report.length; i++) {
    const r = report[i], im = await loadImage(urls[i]);
    const fig = document.createElement("figure");
    fig.className = "overlay";
    const canvas = document.createElement("canvas");
    const caption = document.createElement("p");
    const mask = r.kept_mask || "";
    const kept = [...mask].filter((c) => c === "1").length;
    fig.dataset.global = r.global_tokens; fig.dataset.local = r.local_tokens; fig.dataset.kept = r.local_kept;
    fig.dataset.maskKept = kept; fig.dataset.cells = mask.length;
    if (!r.grid) {
      canvas.width = im.naturalWidth; canvas.height = im.naturalHeight;
      canvas.getContext("2d").drawImage(im, 0, 0);
      caption.textContent = `${r.global_tokens} global tokens (no local branch)`;
    } else {
      const [cols, rows] = r.grid, p = placement(im.naturalWidth, im.naturalHeight, cols, rows);
      const scale = Math.min(1, 672 / p.tw);
      canvas.width = Math.round(p.tw * scale); canvas.height = Math.round(p.th * scale);
      const g = canvas.getContext("2d");
      g.scale(scale, scale);
      g.fillStyle = "#000"; g.fillRect(0, 0, p.tw, p.th);
      g.drawImage(im, p.x, p.y, p.nw, p.nh);
      // Heat map: dropped local tokens dimmed, kept ones tinted.
      const n = VIEW / CELLS, across = cols * CELLS;
      for (let k = 0; k < mask.length; k++) {
        const cx = (k % across) * n, cy = Math.floor(k / across) * n;
        g.fillStyle = mask[k] === "1" ? "rgba(255, 200, 0, 0.25)" : "rgba(0, 0, 0, 0.55)";
        g.fillRect(cx, cy, n, n);
      }
      g.strokeStyle = "rgba(99, 164, 255, 0.95)"; g.lineWidth = 3 / scale;
      for (let c = 0; c <= cols; c++) { g.beginPath(); g.moveTo(c * VIEW, 0); g.lineTo(c * VIEW, p.th); g.stroke(); }
      for (let w = 0; w <= rows; w++) { g.beginPath(); g.moveTo(0, w * VIEW); g.lineTo(p.tw, w * VIEW); g.stroke(); }
      const pct = r.local_tokens ? Math.round((100 * r.local_kept) / r.local_tokens) : 0;
      caption.textContent = `grid ${cols} x ${rows} · ${r.global_tokens} global · ${r.local_tokens} local · ` +
        `${r.local_kept} kept (${pct}%)`;
    }
    canvas.setAttribute("role", "img");
    canvas.setAttribute("aria-label", "image " + (i + 1) + ": " + caption.textContent);
    fig.append(canvas, caption);
    box.append(fig);
  }
}

function setBusy(busy) {
  $("send").disabled = busy; $("stop").disabled = !busy;
}

async function send(ev) {
  ev.preventDefault();
  const text = $("question").value.trim();
  if (!text && !state.pending.length) return;
  showError("");
  let responseFormat = null;
  if ($("json-mode").checked) {
    const schemaText = $("json-schema").value.trim();
    if (!schemaText) {
      responseFormat = { type: "json_object" };
    } else {
      try { responseFormat = { type: "json_schema", json_schema: { name: "playground", schema: JSON.parse(schemaText) } }; }
      catch (e) { showError("The JSON schema does not parse: " + e.message); return; }
    }
  }
  const images = state.pending.map((p) => p.url);
  state.history.push({ role: "user", text, images });
  addMessage("user", text, images);
  state.pending = []; renderPending(); $("question").value = "";
  const body = {
    model: state.model || "unknown", messages: apiMessages(), stream: true,
    stream_options: { include_usage: true }, slime_selection: true,
    temperature: Number($("temperature").value), max_tokens: Number($("max-tokens").value),
  };
  if (responseFormat) body.response_format = responseFormat;
  const controller = new AbortController();
  state.controller = controller;
  setBusy(true);
  const started = performance.now();
  let first = null, answer = "", out = null, usage = null;
  try {
    const r = await fetch("/v1/chat/completions", { method: "POST", headers: headers(), body: JSON.stringify(body), signal: controller.signal });
    if (!r.ok) {
      let msg = r.status + " " + r.statusText;
      try { const e = await r.json(); if (e.error) msg = e.error.message; } catch (_) { /* not JSON */ }
      throw new Error(msg);
    }
    out = addMessage("assistant", "", []);
    const reader = r.body.getReader(), decoder = new TextDecoder();
    let buf = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buf += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buf.indexOf("\n\n")) >= 0) {
        const line = buf.slice(0, cut).trim(); buf = buf.slice(cut + 2);
        if (!line.startsWith("data: ") || line === "data: [DONE]") continue;
        const chunk = JSON.parse(line.slice(6));
        if (chunk.error) throw new Error(chunk.error.message);
        if (chunk.usage) usage = chunk.usage;
        if (chunk.slime) await drawSelection(chunk.slime.images, state.history.flatMap((m) => m.images || []));
        const delta = chunk.choices && chunk.choices[0] && chunk.choices[0].delta;
        if (delta && delta.content) {
          if (first === null) { first = performance.now(); $("ttft").textContent = Math.round(first - started) + " ms"; }
          answer += delta.content; out.textContent = answer;
        }
      }
    }
  } catch (e) {
    if (e.name !== "AbortError") {
      showError(e.message);
      if (!answer) { state.history.pop(); }
    }
  } finally {
    state.controller = null;
    setBusy(false);
    if (answer) state.history.push({ role: "assistant", text: answer, images: [] });
    const tokens = usage ? usage.completion_tokens : null;
    if (first !== null && tokens) {
      const secs = (performance.now() - first) / 1000;
      $("tps").textContent = tokens > 1 && secs > 0 ? ((tokens - 1) / secs).toFixed(1) : "–";
    }
    if (usage) $("prompt-tokens").textContent = usage.prompt_tokens;
    $("question").focus();
  }
}

function init() {
  $("composer").addEventListener("submit", send);
  $("stop").addEventListener("click", () => state.controller && state.controller.abort());
  $("clear").addEventListener("click", () => {
    state.history = []; $("messages").replaceChildren(); $("overlays").replaceChildren(); showError("");
  });
  $("question").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); $("composer").requestSubmit(); }
  });
  const drop = $("drop");
  drop.addEventListener("click", () => $("file").click());
  drop.addEventListener("keydown", (e) => { if (e.key === "Enter" || e.key === " ") { e.preventDefault(); $("file").click(); } });
  $("file").addEventListener("change", (e) => { addFiles(e.target.files); e.target.value = ""; });
  $("json-mode").addEventListener("change", () => { $("json-schema").hidden = !$("json-mode").checked; });
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => { e.preventDefault(); drop.classList.remove("over"); addFiles(e.dataTransfer.files); });
  document.addEventListener("paste", (e) => { if (e.clipboardData && e.clipboardData.files.length) addFiles(e.clipboardData.files); });
  $("api-key").addEventListener("change", loadModel);
  loadModel();
}

init();
