// The diffsearch page: submit a search, watch its candidates arrive over server-sent events.
// Requests carry the bearer token from sessionStorage, so progress is read with fetch() (an
// EventSource cannot send headers) and images are fetched into blob URLs.
"use strict";

const TOKEN_KEY = "diffsearch-token";
const $ = (id) => document.getElementById(id);
const COLOURS = ["#2b6cb0", "#c05621", "#2f855a", "#6b46c1", "#b83280", "#2c7a7b"];
const ACTIVE = ["queued", "running"];  // what Cancel acts on; the stream ends on any other status
let info = null;          // /v1/info
let watching = null;      // {id, abort, prompts: [{...}], nfeTotal, started}

function headers(extra = {}) {
  const token = sessionStorage.getItem(TOKEN_KEY);
  return token ? { ...extra, Authorization: `Bearer ${token}` } : extra;
}

async function api(path, options = {}) {
  const response = await fetch(path, { ...options, headers: headers(options.headers) });
  if (response.status === 401) {
    $("auth-state").textContent = "token needed";
    throw new Error("the service needs a valid token (top right)");
  }
  if (!response.ok) {
    let detail = `${response.status} ${response.statusText}`;
    try { detail = (await response.json()).detail || detail; } catch (e) { /* not JSON */ }
    throw new Error(detail);
  }
  return response;
}

// An image is announced while the server's encoder is still writing it: try again briefly.
async function imageUrl(path, attempts = 5) {
  for (let attempt = 1; ; attempt++) {
    try {
      return URL.createObjectURL(await (await api(path)).blob());
    } catch (error) {
      if (attempt === attempts) throw error;
      await new Promise((resolve) => setTimeout(resolve, 200 * attempt));
    }
  }
}

// ---- setup -------------------------------------------------------------------------------------
function fill(select, names, preferred) {
  select.replaceChildren(...names.map((name) => new Option(name, name)));
  if (names.includes(preferred)) select.value = preferred;
}

async function loadInfo() {
  try {
    info = await (await api("/v1/info")).json();
  } catch (error) {
    $("form-error").textContent = error.message;
    return;
  }
  $("auth-state").textContent = info.auth ? "token accepted" : "no token needed";
  $("form-error").textContent = "";
  fill($("model"), info.models, "shapes");
  fill($("strategy"), info.strategies, "best-of-n");
  fill($("verifier"), info.verifiers, "shapes-clip");
  await refreshList();
}

$("token-form").addEventListener("submit", (event) => {
  event.preventDefault();
  sessionStorage.setItem(TOKEN_KEY, $("token").value.trim());
  $("token").value = "";
  loadInfo();
});

$("search-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  $("form-error").textContent = "";
  const budget = $("budget").value.trim();
  const body = {
    prompts: [$("prompt").value],
    model: $("model").value,
    strategy: { name: $("strategy").value },
    verifier: $("verifier").value,
    budget: /^\d+$/.test(budget) ? Number(budget) : budget,
    seed: Number($("seed").value || 0),
  };
  $("submit").disabled = true;
  try {
    const response = await api("/v1/searches", {
      method: "POST", body: JSON.stringify(body), headers: { "Content-Type": "application/json" },
    });
    const created = await response.json();
    refreshList();
    watch(created.id);
  } catch (error) {
    $("form-error").textContent = error.message;
  } finally {
    $("submit").disabled = false;
  }
});

$("cancel").addEventListener("click", async () => {
  if (!watching) return;
  try {
    await api(`/v1/searches/${watching.id}/cancel`, { method: "POST" });
  } catch (error) {
    $("search-error").textContent = error.message;
  }
});

$("resume").addEventListener("click", async () => {
  if (!watching) return;
  const { id } = watching;
  $("resume").disabled = true;
  try {
    await api(`/v1/searches/${id}/resume`, { method: "POST" });
    refreshList();
    await watch(id);  // its stream ended when it stopped: follow it again
  } catch (error) {
    $("search-error").textContent = error.message;
  } finally {
    $("resume").disabled = false;
  }
});

async function refreshList() {
  const { searches } = await (await api("/v1/searches")).json();
  $("search-list").replaceChildren(...searches.slice().reverse().map((search) => {
    const item = document.createElement("li");
    item.textContent = `${search.id} · ${search.status} · ${search.prompts[0]}`;
    item.addEventListener("click", () => watch(search.id));
    return item;
  }));
}

// ---- watching a search -------------------------------------------------------------------------
async function watch(id) {
  if (watching) watching.abort.abort();
  const detail = await (await api(`/v1/searches/${id}`)).json();
  watching = { id, abort: new AbortController(), prompts: [], nfeTotal: null,
               started: detail.started_at !== null };
  $("watch").hidden = false;
  $("search-id").textContent = id;
  $("search-error").textContent = "";
  const container = $("prompts");
  container.replaceChildren();
  detail.prompts.forEach((text, index) => {
    const node = $("prompt-template").content.firstElementChild.cloneNode(true);
    node.querySelector(".prompt-text").textContent = text;
    node.dataset.promptIndex = index;
    container.append(node);
    watching.prompts.push({ node, tiles: new Map(), points: [], scores: [], best: null, nfe: 0 });
  });
  showStatus(watching, detail.status, detail.error);
  follow(watching).catch((error) => {
    if (error.name !== "AbortError") $("search-error").textContent = error.message;
  });
}

async function follow(state) {
  const response = await api(`/v1/searches/${state.id}/events`, { signal: state.abort.signal });
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += value;
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const frame = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      let kind = "message";
      let data = null;
      for (const line of frame.split("\n")) {
        if (line.startsWith("event: ")) kind = line.slice(7);
        else if (line.startsWith("data: ")) data = JSON.parse(line.slice(6));
      }
      if (data !== null && state === watching) await handle(state, kind, data);
    }
  }
}

async function handle(state, kind, data) {
  if (kind === "status") {
    if (data.status === "running") state.started = true;
    showStatus(state, data.status, data.error);
    if (!ACTIVE.includes(data.status)) await finish(state, data.status);
    return;
  }
  if (kind === "snapshot") {  // events before the kept ones were dropped: where they led
    if (data.status === "running") state.started = true;
    showStatus(state, data.status, data.error);
    showProgress(state, data.nfe_done, data.nfe_total);
    for (const [index, best] of data.best.entries()) {
      if (!best) continue;
      await offerBest(state, index, best);
      drawPlot(state, state.prompts[index]);
    }
    return;
  }
  if (kind !== "progress") return;
  showProgress(state, data.nfe_done, data.nfe_total);
  const prompt = state.prompts[data.prompt_index];
  prompt.nfe = data.nfe_done;
  for (const candidate of data.candidates) {
    addTile(state.prompts[candidate.prompt_index], candidate);
    if (candidate.reward !== null) prompt.scores.push([data.nfe_done, candidate.reward]);
  }
  if (data.best) await offerBest(state, data.prompt_index, data.best);
  drawPlot(state, prompt);
}

function showProgress(state, nfeDone, nfeTotal) {
  state.nfeTotal = nfeTotal;
  $("progress").max = nfeTotal;
  $("progress").value = nfeDone;
  $("nfe").textContent = `${nfeDone} / ${nfeTotal} NFE`;
}

async function offerBest(state, index, best) {
  const prompt = state.prompts[index];
  if (prompt.best && best.candidate === prompt.best.candidate) return;
  prompt.best = best;
  prompt.points.push([best.nfe, best.score]);
  await showBest(state, index);
}

function addTile(prompt, candidate) {
  const tile = document.createElement("div");
  tile.className = "tile" + (candidate.error ? " failed" : "");
  tile.title = candidate.error || JSON.stringify(candidate.scores);
  const img = document.createElement("img");
  img.alt = `candidate ${candidate.candidate}`;
  const caption = document.createElement("div");
  const score = candidate.reward === null ? "–" : candidate.reward.toFixed(4);
  caption.textContent = `#${candidate.candidate} · ${score}`;
  tile.append(img, caption);
  prompt.node.querySelector(".candidates").append(tile);
  prompt.tiles.set(candidate.candidate, tile);
  if (candidate.image) {
    const side = Math.min(160, info ? info.limits.max_image_side : 160);
    imageUrl(`${candidate.image}?size=${side}`).then((url) => { img.src = url; }, () => {});
  }
}

async function showBest(state, index) {
  const prompt = state.prompts[index];
  for (const [candidate, tile] of prompt.tiles) {
    tile.classList.toggle("best", candidate === prompt.best.candidate);
  }
  const image = prompt.node.querySelector(".best-image");
  image.src = await imageUrl(`/v1/searches/${state.id}/images/${index}/${prompt.best.candidate}.png`);
  image.dataset.candidate = prompt.best.candidate;
  prompt.node.querySelector(".best-caption").textContent =
    `best: #${prompt.best.candidate}, score ${prompt.best.score.toFixed(4)} at ${prompt.best.nfe} NFE`;
}

async function finish(state, status) {
  refreshList();
  if (status !== "done") return;
  const detail = await (await api(`/v1/searches/${state.id}`)).json();
  for (const result of detail.result.prompts) {
    const prompt = state.prompts[result.index];
    if (!result.best) continue;
    prompt.best = { candidate: result.best.candidate, score: result.best.score,
                    nfe: prompt.best ? prompt.best.nfe : result.nfe };
    await showBest(state, result.index);
    const link = prompt.node.querySelector(".download");
    link.href = prompt.node.querySelector(".best-image").src;
    link.download = `${state.id}-prompt${result.index}-best.png`;
    link.hidden = false;
    prompt.node.querySelector(".best").classList.add("final");
    drawPlot(state, prompt);
  }
}

function showStatus(state, status, error) {
  const badge = $("status");
  badge.textContent = status;
  badge.className = `badge ${status}`;
  $("cancel").disabled = !ACTIVE.includes(status);
  // an interrupted search resumes, and so does a cancelled one that had started (the server
  // refuses, saying why, one that has nothing to go on from)
  $("resume").hidden = !(status === "interrupted" || (status === "cancelled" && state.started));
  if (error) $("search-error").textContent = error;
}

// ---- the plot: every scored candidate (grey) and the best so far (a step line) against NFE ----------
function drawPlot(state, prompt) {
  const canvas = prompt.node.querySelector(".plot");
  const ctx = canvas.getContext("2d");
  const { width, height } = canvas;
  const pad = { left: 48, right: 10, top: 10, bottom: 24 };
  ctx.clearRect(0, 0, width, height);
  ctx.strokeStyle = "#a0aec0";
  ctx.fillStyle = "#4a5568";
  ctx.font = "11px system-ui";
  ctx.beginPath();
  ctx.moveTo(pad.left, pad.top);
  ctx.lineTo(pad.left, height - pad.bottom);
  ctx.lineTo(width - pad.right, height - pad.bottom);
  ctx.stroke();
  const points = prompt.points;
  if (!points.length) return;
  const maxX = Math.max(state.nfeTotal || 1, ...points.map((p) => p[0]));
  const scores = prompt.scores.map((p) => p[1]).concat(points.map((p) => p[1]));
  let [low, high] = [Math.min(...scores), Math.max(...scores)];
  if (high - low < 1e-9) { low -= 0.5; high += 0.5; }
  const x = (nfe) => pad.left + (nfe / maxX) * (width - pad.left - pad.right);
  const y = (s) => height - pad.bottom - ((s - low) / (high - low)) * (height - pad.top - pad.bottom);
  ctx.fillText(high.toFixed(3), 2, pad.top + 8);
  ctx.fillText(low.toFixed(3), 2, height - pad.bottom);
  ctx.fillText("0", pad.left - 3, height - 8);
  ctx.fillText(`${maxX} NFE`, width - pad.right - 52, height - 8);
  ctx.fillStyle = "rgba(113, 128, 150, 0.55)";
  for (const [nfe, score] of prompt.scores) ctx.fillRect(x(nfe) - 1.5, y(score) - 1.5, 3, 3);
  ctx.strokeStyle = COLOURS[Number(prompt.node.dataset.promptIndex) % COLOURS.length];
  ctx.lineWidth = 2;
  ctx.beginPath();
  points.forEach(([nfe, score], i) => {
    if (i === 0) ctx.moveTo(x(nfe), y(score));
    else { ctx.lineTo(x(nfe), y(points[i - 1][1])); ctx.lineTo(x(nfe), y(score)); }
  });
  const last = points[points.length - 1];
  ctx.lineTo(x(Math.max(last[0], prompt.nfe)), y(last[1]));  // flat until now
  ctx.stroke();
  ctx.fillStyle = ctx.strokeStyle;
  for (const [nfe, score] of points) ctx.fillRect(x(nfe) - 2, y(score) - 2, 4, 4);
}

$("token").value = "";
loadInfo();
