// The status page: polls api/status and renders it. The DOM is built with textContent only: proxy names
// and error details come from the proxies and istiod, and must never be interpreted as HTML.
"use strict";

const REFRESH_MS = 5000;
const view = { data: null, fetchedAt: 0, error: "" };

function $(id) { return document.getElementById(id); }

function el(tag, text, attrs) {
  const node = document.createElement(tag);
  if (text !== undefined && text !== null) node.textContent = String(text);
  for (const [key, value] of Object.entries(attrs || {})) node.setAttribute(key, value);
  return node;
}

function badge(state) { return el("span", state, { class: "state", "data-state": state }); }

function ago(seconds) {
  const s = Math.max(0, Math.round(seconds));
  if (s < 120) return s + "s";
  if (s < 7200) return Math.round(s / 60) + "m";
  if (s < 172800) return Math.round(s / 3600) + "h";
  return Math.round(s / 86400) + "d";
}

// Filters live in the URL fragment, so a reload or a shared link keeps them.
function filters() {
  return { namespace: $("namespace").value, state: $("state").value, search: $("search").value.trim() };
}
function saveFilters() {
  const f = filters();
  const params = new URLSearchParams();
  for (const [k, v] of Object.entries(f)) if (v) params.set(k, v);
  history.replaceState(null, "", params.toString() ? "#" + params.toString() : location.pathname);
}
function loadFilters() {
  const params = new URLSearchParams(location.hash.slice(1));
  return { namespace: params.get("namespace") || "", state: params.get("state") || "", search: params.get("search") || "" };
}

function setOptions(select, values, allLabel, keep) {
  select.replaceChildren(el("option", allLabel, { value: "" }));
  for (const v of values) select.appendChild(el("option", v, { value: v }));
  if (keep && !values.includes(keep)) select.appendChild(el("option", keep + " (none now)", { value: keep }));
  select.value = keep || "";
}

function renderHeader(d) {
  const r = $("readiness");
  r.textContent = d.ready ? "ready" : "not ready";
  r.dataset.ready = String(d.ready);
  $("reason").textContent = d.reason;
}

function renderReplicas(d) {
  const body = $("replicas").tBodies[0];
  body.replaceChildren();
  $("replica-count").textContent = "(" + d.replicas.length + ")";
  if (!d.replicas.length) {
    const tr = el("tr");
    tr.appendChild(el("td", "discovery has found no istiod replica", { colspan: "8", class: "muted" }));
    body.appendChild(tr);
  }
  for (const rep of d.replicas) {
    const tr = el("tr", null, { "data-address": rep.address });
    tr.appendChild(el("td", rep.istiod || rep.name || "?", { class: "id" }));
    tr.appendChild(el("td", rep.address, { class: "id" }));
    tr.appendChild(el("td", rep.source));
    tr.appendChild(el("td", rep.revision || "–"));
    tr.appendChild(el("td", rep.version || "–"));
    const health = el("td");
    health.appendChild(badge(rep.health));
    if (rep.error) health.appendChild(el("div", rep.error, { class: "error-text" }));
    tr.appendChild(health);
    tr.appendChild(el("td", rep.latency_ms === null ? "–" : rep.latency_ms.toFixed(1) + " ms", { class: "num" }));
    tr.appendChild(el("td", rep.proxies === null ? "–" : rep.proxies, { class: "num" }));
    body.appendChild(tr);
  }
}

function matches(p, f) {
  if (f.namespace && p.namespace !== f.namespace) return false;
  if (f.state && !Object.values(p.types).includes(f.state) && p.state !== f.state) return false;
  if (f.search && !p.id.toLowerCase().includes(f.search.toLowerCase())) return false;
  return true;
}

function renderSummary(d, f) {
  const inNamespace = d.proxies.filter((p) => !f.namespace || p.namespace === f.namespace);
  const chips = $("summary");
  chips.replaceChildren();
  for (const state of d.states) {
    const n = inNamespace.filter((p) => p.state === state).length;
    const b = el("button", state + " " + n, { type: "button", "data-state": state, "aria-pressed": String(f.state === state) });
    b.addEventListener("click", () => { $("state").value = f.state === state ? "" : state; onFilter(); });
    chips.appendChild(b);
  }
}

function renderProxies(d) {
  const f = filters();
  const head = $("proxy-head");
  head.replaceChildren();
  for (const h of ["Proxy", "Namespace", "istiod", "Version", ...d.types, "Updated"]) head.appendChild(el("th", h));
  const body = $("proxies").tBodies[0];
  body.replaceChildren();
  const shown = d.proxies.filter((p) => matches(p, f));
  const now = d.generated;
  for (const p of shown) {
    const tr = el("tr", null, { "data-namespace": p.namespace, "data-state": p.state });
    tr.appendChild(el("td", p.id, { class: "id" }));
    tr.appendChild(el("td", p.namespace));
    tr.appendChild(el("td", p.istiod, { class: "id" }));
    tr.appendChild(el("td", p.version || "–"));
    for (const t of d.types) {
      const td = el("td");
      if (p.types[t]) {
        const b = badge(p.types[t]);
        if (p.errors[t]) b.title = p.errors[t];
        td.appendChild(b);
      } else {
        td.textContent = "–";
        td.className = "muted";
      }
      tr.appendChild(td);
    }
    tr.appendChild(el("td", p.updated ? ago(now - p.updated) + " ago" : "–", { class: "num" }));
    body.appendChild(tr);
  }
  $("proxy-count").textContent = "(" + shown.length + " of " + d.proxies.length + ")";
  $("empty").hidden = shown.length > 0;
  renderSummary(d, f);
}

function render() {
  const banner = $("error");
  banner.hidden = !view.error;
  banner.textContent = view.error;
  if (!view.data) return;
  const keep = filters();
  setOptions($("namespace"), view.data.namespaces, "all namespaces", keep.namespace);
  setOptions($("state"), view.data.states, "all states", keep.state);
  renderHeader(view.data);
  renderReplicas(view.data);
  renderProxies(view.data);
  tick();
}

function tick() {
  if (view.fetchedAt) $("updated").textContent = "updated " + ago((Date.now() - view.fetchedAt) / 1000) + " ago";
}

async function refresh() {
  try {
    const response = await fetch("api/status", { cache: "no-store" });
    if (!response.ok) throw new Error("HTTP " + response.status + ": " + (await response.text()));
    view.data = await response.json();
    view.fetchedAt = Date.now();
    view.error = "";
  } catch (err) {
    view.error = "could not refresh: " + err.message + (view.data ? " (showing the last data)" : "");
  }
  render();
}

function onFilter() {
  saveFilters();
  if (view.data) renderProxies(view.data);
}

function init() {
  const f = loadFilters();
  // Options arrive with the data; until then keep the wanted values selectable.
  setOptions($("namespace"), [], "all namespaces", f.namespace);
  setOptions($("state"), [], "all states", f.state);
  $("search").value = f.search;
  for (const id of ["namespace", "state"]) $(id).addEventListener("change", onFilter);
  $("search").addEventListener("input", onFilter);
  refresh();
  setInterval(() => { if (!$("pause").checked && !document.hidden) refresh(); }, REFRESH_MS);
  setInterval(tick, 1000);
}

document.addEventListener("DOMContentLoaded", init);
