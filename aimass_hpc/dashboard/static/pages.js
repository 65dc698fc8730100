// Helpers shared by the Training and Searches pages (training.js, searches.js): the same
// rules as dashboard.js -- every value reaches the page through textContent, never as HTML.
"use strict";
window.AimassPages = (function () {
  const body = document.body;
  const BASE = body.dataset.base || "/";
  const CSRF = body.dataset.csrf || "";
  const POLL_MS = 3000;
  const COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf", "#393b79", "#637939"];

  function el(tag, text, attrs) {
    const node = document.createElement(tag);
    if (text !== undefined && text !== null) node.textContent = String(text);
    for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
    return node;
  }
  function showError(msg) {
    const p = document.getElementById("error");
    if (!p) return;
    p.hidden = !msg;
    p.textContent = msg || "";
  }
  async function api(path, opts) {
    opts = opts || {};
    const headers = { Accept: "application/json" };
    if (opts.method && opts.method !== "GET") headers["X-CSRF-Token"] = CSRF;
    const resp = await fetch(BASE + path, { method: opts.method || "GET", headers, credentials: "same-origin" });
    if (resp.status === 401) { window.location.href = BASE + "login"; throw new Error("not logged in"); }
    const data = await resp.json().catch(() => ({}));
    if (!resp.ok) throw new Error(typeof data.detail === "string" ? data.detail : JSON.stringify(data.detail || resp.status));
    return data;
  }
  function num(v) { return typeof v === "number" ? String(+v.toPrecision(4)) : (v === null || v === undefined ? "-" : String(v)); }
  function elapsed(s) {
    if (s === null || s === undefined) return "-";
    s = Math.round(s);
    const h = Math.floor(s / 3600), m = Math.floor((s % 3600) / 60), sec = s % 60;
    return (h ? h + ":" : "") + String(m).padStart(2, "0") + ":" + String(sec).padStart(2, "0");
  }
  function when(t) { return t ? new Date(t * 1000).toISOString().slice(0, 19).replace("T", " ") : "-"; }

  // A paged listing whose form fields, page number and extra() parameters live in the URL.
  function listing(formId, load, extra) {
    const form = document.getElementById(formId);
    const params = new URLSearchParams(window.location.search);
    for (const input of form.elements) if (input.name && params.has(input.name)) input.value = params.get(input.name);
    let page = Math.max(1, parseInt(params.get("page") || "1", 10) || 1);
    let total = 0, size = 50, timer = null;
    function query() {
      const q = new URLSearchParams();
      for (const input of form.elements) if (input.name && input.value) q.set(input.name, input.value);
      if (page > 1) q.set("page", String(page));
      return q;
    }
    async function refresh() {
      clearTimeout(timer);
      const q = query();
      const url = new URLSearchParams(q);
      for (const [k, v] of Object.entries(extra ? extra() : {})) if (v) url.set(k, v);
      history.replaceState(null, "", window.location.pathname + (url.toString() ? "?" + url : ""));
      try {
        const data = await load(q);
        total = data.total; size = data.page_size;
        document.getElementById("total").textContent = total;
        document.getElementById("pageno").textContent = page + " of " + Math.max(1, Math.ceil(total / size));
        showError("");
      } catch (e) { showError(e.message); }
      timer = setTimeout(refresh, POLL_MS);
    }
    form.addEventListener("submit", (ev) => { ev.preventDefault(); page = 1; refresh(); });
    document.getElementById("prev").addEventListener("click", () => { if (page > 1) { page--; refresh(); } });
    document.getElementById("next").addEventListener("click", () => { if (page * size < total) { page++; refresh(); } });
    refresh();
    return { refresh, params };
  }

  // A Chart.js chart on canvas, made once and then updated in place (no animation: polling).
  function chart(canvas, config) {
    const existing = window.Chart.getChart(canvas);
    if (existing) {
      existing.data = config.data;
      existing.options = config.options || existing.options;
      existing.update("none");
      return existing;
    }
    config.options = Object.assign({ animation: false, responsive: false }, config.options || {});
    return new window.Chart(canvas, config);
  }

  return { BASE, CSRF, POLL_MS, COLORS, el, showError, api, num, elapsed, when, listing, chart };
})();
