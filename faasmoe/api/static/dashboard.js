// FaaSMoE live view: polls /admin/dashboard.json with the admin key and redraws. No dependencies.
"use strict";

const POLL_MS = 1500;
const KEY_ITEM = "faasmoe.dashboard.key";  // sessionStorage: this tab only, gone when it closes
const PRICE_ITEM = "faasmoe.dashboard.prices";  // localStorage: display prices are not secret
const $ = (id) => document.getElementById(id);

// A fragment (#key=...) is never sent to the server: take it once, then clear it from the address bar.
(function takeKeyFromFragment() {
  const params = new URLSearchParams(location.hash.slice(1));
  if (params.has("key")) {
    sessionStorage.setItem(KEY_ITEM, params.get("key"));
    history.replaceState(null, "", location.pathname + location.search);
  }
})();

function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined) continue;
    if (k === "class") el.className = v;
    else if (k === "text") el.textContent = v;
    else el.setAttribute(k, v);
  }
  for (const c of children) el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return el;
}

function svg(tag, attrs) {
  const el = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [k, v] of Object.entries(attrs || {})) el.setAttribute(k, v);
  return el;
}

function bytes(n) {
  if (n === null || n === undefined) return "–";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (Math.abs(n) >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return (i ? n.toFixed(n < 10 ? 2 : 1) : String(n)) + " " + units[i];
}

const num = (n, digits = 0) => (n === null || n === undefined) ? "–" :
  Number(n).toLocaleString("en-US", {maximumFractionDigits: digits, minimumFractionDigits: digits});

function setStatus(text, error) {
  const el = $("status");
  el.textContent = text;
  el.className = "status" + (error ? " error" : "");
}

function showLogin(why) {
  $("view").hidden = true;
  $("forget").hidden = true;
  $("login").hidden = false;
  if (why) $("login-why").textContent = why;
  $("key").focus();
}

$("login").addEventListener("submit", (ev) => {
  ev.preventDefault();
  const key = $("key").value.trim();
  if (!key) return;
  sessionStorage.setItem(KEY_ITEM, key);
  $("key").value = "";
  $("login").hidden = true;
  poll();
});

$("forget").addEventListener("click", () => {
  sessionStorage.removeItem(KEY_ITEM);
  showLogin("Key forgotten. Enter the admin key to watch again.");
});

// --- prices (cost = metered quantity x price; all zero = show the quantities only) --------------------

const priceInputs = {tokens: $("price-tokens"), calls: $("price-calls"), memory: $("price-memory")};
try {
  const saved = JSON.parse(localStorage.getItem(PRICE_ITEM) || "{}");
  for (const [k, input] of Object.entries(priceInputs)) if (typeof saved[k] === "number") input.value = saved[k];
} catch (e) { /* a malformed entry: keep the defaults */ }
for (const input of Object.values(priceInputs)) {
  input.addEventListener("change", () => {
    const prices = Object.fromEntries(Object.entries(priceInputs).map(([k, i]) => [k, Number(i.value) || 0]));
    localStorage.setItem(PRICE_ITEM, JSON.stringify(prices));
    if (last) drawTenants(last.usage);
  });
}
const price = (k) => Number(priceInputs[k].value) || 0;

// --- polling -------------------------------------------------------------------------------------------

let last = null;
let timer = null;

async function poll() {
  clearTimeout(timer);
  const key = sessionStorage.getItem(KEY_ITEM);
  if (!key) { showLogin(); return; }
  const query = new URLSearchParams({window: $("window").value});
  if ($("since").value) query.set("since", $("since").value);
  try {
    const resp = await fetch("admin/dashboard.json?" + query, {
      headers: {"Authorization": "Bearer " + key}, cache: "no-store", credentials: "omit"});
    if (resp.status === 401 || resp.status === 403) {
      sessionStorage.removeItem(KEY_ITEM);
      showLogin(resp.status === 401 ? "That key was not accepted (401). Enter the admin key."
                                    : "That key is not an admin key (403). Enter the admin key.");
      setStatus("not signed in", true);
      return;
    }
    if (!resp.ok) throw new Error("HTTP " + resp.status);
    last = await resp.json();
    draw(last);
    setStatus((last.cluster_error ? "cluster unreachable: " + last.cluster_error + " · " : "live · ") +
              "updated " + new Date(last.time * 1000).toLocaleTimeString(), !!last.cluster_error);
  } catch (e) {
    setStatus("update failed: " + e.message, true);
  }
  timer = setTimeout(poll, POLL_MS);
}

$("window").addEventListener("change", poll);
$("since").addEventListener("change", poll);

function draw(d) {
  $("login").hidden = true;
  $("view").hidden = false;
  $("forget").hidden = false;
  drawCharts(d.series);
  drawModels(d.models, d.window_s);
  drawWorkers(d.workers, d.frontend);
  drawTenants(d.usage);
}

// --- charts (inline SVG) ---------------------------------------------------------------------------------

function lineChart(el, t, lines, unit) {
  const W = 600, H = 160, L = 44, R = 8, T = 8, B = 20;
  el.replaceChildren();
  const now = t.length ? t[t.length - 1] : Date.now() / 1000;
  const t0 = now - 300;
  let ymax = 0;
  for (const ln of lines) for (const v of ln.values) if (v !== null && v > ymax) ymax = v;
  ymax = ymax > 0 ? ymax * 1.15 : 1;
  const x = (tt) => L + (W - L - R) * Math.max(0, tt - t0) / 300;
  const y = (v) => T + (H - T - B) * (1 - v / ymax);
  el.append(svg("line", {x1: L, y1: H - B, x2: W - R, y2: H - B, class: "axis"}));
  el.append(svg("line", {x1: L, y1: T, x2: L, y2: H - B, class: "axis"}));
  for (const frac of [0, 0.5, 1]) {
    const label = svg("text", {x: L - 4, y: y(ymax * frac) + 3, "text-anchor": "end"});
    label.textContent = num(ymax * frac, ymax < 10 ? 2 : 0) + unit;
    el.append(label);
  }
  for (const [i, label] of [[0, "-5 min"], [150, "-2.5 min"], [300, "now"]]) {
    const text = svg("text", {x: L + (W - L - R) * i / 300, y: H - 6, "text-anchor": i ? (i === 300 ? "end" : "middle") : "start"});
    text.textContent = label;
    el.append(text);
  }
  for (const ln of lines) {
    let path = "", pen = false;
    ln.values.forEach((v, i) => {
      if (v === null) { pen = false; return; }
      path += (pen ? "L" : "M") + x(t[i]).toFixed(1) + "," + y(v).toFixed(1);
      pen = true;
    });
    if (path) el.append(svg("path", {d: path, class: ln.cls}));
    if (ln.dots) ln.values.forEach((v, i) => {
      if (v !== null) el.append(svg("circle", {cx: x(t[i]).toFixed(1), cy: y(v).toFixed(1), r: 2, class: ln.cls}));
    });
  }
}

function drawCharts(s) {
  lineChart($("chart-cold"), s.t, [{values: s.cold_starts, cls: "line-cold"}], "");
  lineChart($("chart-ttft"), s.t, [{values: s.ttft_max_s, cls: "line-ttft-max", dots: true},
                                   {values: s.ttft_avg_s, cls: "line-ttft", dots: true}], "s");
}

// --- models: the layer x expert heat map ------------------------------------------------------------------

function drawModels(models, windowS) {
  const box = $("models");
  box.replaceChildren();
  if (!models.length) box.append(h("p", {class: "empty", text: "no models"}));
  for (const m of models) {
    const section = h("section", {class: "model", "data-model": m.name, "data-resident-device": m.resident.device,
                                   "data-resident-host": m.resident.host, "data-resident-cold": m.resident.cold});
    const who = m.sharing === "private" ? "private to " + m.owner : "shared";
    section.append(h("h3", {}, m.name + " ", h("small", {text: `${m.family}, ${who}`})));
    section.append(h("div", {class: "facts", text:
      `${m.layers.length} MoE layers × ${m.num_experts} experts in blocks of ${m.block_size} · ` +
      `device ${m.resident.device}, host ${m.resident.host}, cold ${m.resident.cold} of ${m.functions} blocks · ` +
      `experts held ${bytes(m.resident_bytes)} of ${bytes(m.expert_bytes)} · trunk ${bytes(m.trunk_bytes)} · ` +
      `running ${m.running}, waiting ${m.waiting} · ${num(m.calls)} calls, ${num(m.cold_starts)} cold starts` +
      Object.entries(m.shared_with || {}).map(([other, n]) => ` · ${n} blocks shared with ${other}`).join("")}));
    const grid = h("div", {class: "heatmap"});
    grid.style.gridTemplateColumns = `max-content repeat(${m.num_experts}, minmax(4px, 1fr))`;
    let maxHits = 0;
    for (const row of m.layers) for (const n of row.hits) maxHits = Math.max(maxHits, n);
    for (const row of m.layers) {
      grid.append(h("div", {class: "label layer-label", "data-layer": row.layer, text: "layer " + row.layer}));
      row.tiers.forEach((tier, b) => {
        const [first, count] = m.blocks[b];
        const hits = row.hits[b];
        const experts = count > 1 ? `experts ${first}–${first + count - 1}` : `expert ${first}`;
        const cell = h("div", {class: "cell tier-" + tier, "data-layer": row.layer, "data-block": b, "data-tier": tier,
                               "data-hits": hits, title: `layer ${row.layer}, ${experts}: ${tier}, ${hits} calls in ${windowS} s`});
        cell.style.gridColumn = `span ${count}`;
        if (hits > 0) {
          const bar = h("i");
          bar.style.height = (8 + 32 * hits / maxHits) + "%";  // at most 40%: the tier stays visible
          cell.append(bar);
        }
        grid.append(cell);
      });
    }
    grid.append(h("div", {class: "label"}));
    for (let e = 0; e < m.num_experts; e++) {
      const step = Math.ceil(m.num_experts / 16);
      grid.append(h("div", {class: "axis-label", text: e % step === 0 ? String(e) : ""}));
    }
    section.append(grid);
    box.append(section);
  }
}

// --- workers ----------------------------------------------------------------------------------------------

function usedBar(used, budget) {
  const bar = h("span", {class: "bar"});
  const fill = h("span");
  fill.style.width = budget > 0 ? Math.min(100, 100 * used / budget) + "%" : "0";
  bar.append(fill);
  return bar;
}

function drawWorkers(workers, frontend) {
  const table = $("workers");
  table.replaceChildren(h("tr", {},
    ...["worker", "device", "node", "pid"].map((t) => h("th", {class: "text", text: t})),
    ...["device bytes / budget", "device blocks", "host cache / budget", "host blocks", "resident", "RSS"]
      .map((t) => h("th", {text: t}))));
  for (const w of workers) {
    table.append(h("tr", {"data-worker": w.id},
      h("td", {text: w.id}), h("td", {class: "text", text: w.device}), h("td", {class: "text", text: w.node || "–"}),
      h("td", {class: "text", text: w.pid}),
      h("td", {}, `${bytes(w.device_bytes)} / ${bytes(w.budget_bytes)}`, usedBar(w.device_bytes, w.budget_bytes)),
      h("td", {text: w.device_functions}),
      h("td", {text: `${bytes(w.host_cache_bytes)} / ${bytes(w.host_budget_bytes)}`}),
      h("td", {text: w.host_functions}),
      h("td", {text: bytes(w.resident_bytes)}), h("td", {text: bytes(w.rss_bytes)})));
  }
  table.append(h("tr", {"data-worker": "frontend"},
    h("td", {text: "frontend (trunks" + (workers.length ? ")" : ", in-process experts)")}), h("td", {class: "text", text: "–"}),
    h("td", {class: "text", text: "this machine"}), h("td", {class: "text", text: frontend.pid}),
    h("td", {text: "trunks " + bytes(frontend.trunk_bytes)}), h("td", {text: "–"}), h("td", {text: "–"}),
    h("td", {text: "–"}), h("td", {text: "–"}), h("td", {text: bytes(frontend.rss_bytes)})));
}

// --- tenants ----------------------------------------------------------------------------------------------

function drawTenants(usage) {
  const table = $("tenants");
  const head = ["tenant", "model"].map((t) => h("th", {class: "text", text: t}));
  const cols = ["requests", "prompt tokens", "completion tokens", "expert calls", "compute s", "cold starts",
                "held (bytes × s)", "cost"];
  table.replaceChildren(h("tr", {}, ...head, ...cols.map((t) => h("th", {text: t}))));
  if (!usage.ledger) {
    table.append(h("tr", {}, h("td", {class: "empty", colspan: 10, text: "this server keeps no usage ledger"})));
    return;
  }
  if (!usage.rows.length) table.append(h("tr", {}, h("td", {class: "empty", colspan: 10, text: "no usage yet"})));
  for (const r of usage.rows) {
    const gibHours = r.resident_byte_seconds / 2 ** 30 / 3600;
    const cost = (r.prompt_tokens + r.completion_tokens) / 1e6 * price("tokens") +
                 r.expert_invocations / 1e3 * price("calls") + gibHours * price("memory");
    table.append(h("tr", {"data-tenant": r.tenant},
      h("td", {text: r.tenant}), h("td", {class: "text", text: r.model}), h("td", {text: num(r.requests)}),
      h("td", {text: num(r.prompt_tokens)}), h("td", {text: num(r.completion_tokens)}),
      h("td", {text: num(r.expert_invocations)}), h("td", {text: num(r.expert_compute_s, 2)}),
      h("td", {text: num(r.cold_starts)}), h("td", {text: bytes(Math.round(r.resident_byte_seconds)) + "·s"}),
      h("td", {text: num(cost, 4)})));
  }
}

poll();
