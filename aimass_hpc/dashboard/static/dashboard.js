// aimass dashboard: the helpers every page script uses (window.aimass), and the Jobs, Job,
// Models and Model pages. Vanilla JS, no build step, no inline script, no eval: every value
// reaches the page through textContent, never as HTML. Loaded (deferred) before any page
// script, so those find window.aimass ready.
"use strict";
window.aimass = (function () {
  const body = document.body;
  const BASE = body.dataset.base || "/";
  const CSRF = body.dataset.csrf || "";
  const POLL_MS = 3000;
  const COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf", "#393b79", "#637939"];

  // An element with text (never parsed as HTML) and attributes.
  function el(tag, text, attrs) {
    const node = document.createElement(tag);
    if (text !== undefined && text !== null) node.textContent = String(text);
    for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
    return node;
  }
  function message(id, msg) {
    const p = document.getElementById(id);
    if (!p) return;
    p.hidden = !msg;
    p.textContent = msg || "";
  }
  // The page's error line (#error) and notice line (#notice); "" hides them.
  function showError(msg) { message("error", msg); }
  function say(msg) { message("notice", msg); }

  // JSON API call: CSRF header on anything but GET, opts.json as the body (or opts.body
  // as is), a 401 goes to the login page, an error's "detail" becomes the Error's message.
  async function api(path, opts) {
    opts = opts || {};
    const method = opts.method || "GET";
    const headers = Object.assign({ Accept: "application/json" }, opts.headers || {});
    let payload = opts.body;
    if (method !== "GET") headers["X-CSRF-Token"] = CSRF;
    if (opts.json !== undefined) { headers["Content-Type"] = "application/json"; payload = JSON.stringify(opts.json); }
    const resp = await fetch(BASE + path, { method, headers, body: payload, credentials: "same-origin" });
    if (resp.status === 401) { window.location.href = BASE + "login"; throw new Error("not logged in"); }
    const data = await resp.json().catch(() => ({}));
    if (!resp.ok) throw new Error(typeof data.detail === "string" ? data.detail : JSON.stringify(data.detail || resp.status));
    return data;
  }

  // Run fn now and again every ms (default POLL_MS) after it settles; its error is shown on
  // the page, its success clears it (opts.quiet: fn handles errors itself). Calling the
  // returned function runs fn at once and restarts the timer.
  function poll(fn, opts) {
    opts = opts || {};
    let timer = null;
    async function tick() {
      clearTimeout(timer);
      if (opts.quiet) await fn();
      else {
        try { await fn(); showError(""); } catch (e) { showError(e.message); }
      }
      timer = setTimeout(tick, opts.ms || POLL_MS);
    }
    tick();
    return tick;
  }

  function num(v) { return typeof v === "number" ? String(+v.toPrecision(4)) : (v === null || v === undefined ? "-" : String(v)); }
  function fixed(v, digits) { return v === null || v === undefined ? "-" : String(+Number(v).toFixed(digits === undefined ? 1 : digits)); }
  function elapsed(s) {
    if (s === null || s === undefined) return "-";
    s = Math.round(s);
    const h = Math.floor(s / 3600), m = Math.floor((s % 3600) / 60), sec = s % 60;
    return (h ? h + ":" : "") + String(m).padStart(2, "0") + ":" + String(sec).padStart(2, "0");
  }
  // Epoch seconds / an ISO time -> "YYYY-MM-DD HH:MM:SS".
  function when(t) { return t ? new Date(t * 1000).toISOString().slice(0, 19).replace("T", " ") : "-"; }
  function whenIso(iso) { return (iso || "").slice(0, 19).replace("T", " "); }
  function count(n, unit) {
    if (n === null || n === undefined) return "-";
    for (const [u, f] of [["T", 1e12], ["G", 1e9], ["M", 1e6], ["k", 1e3]]) if (Math.abs(n) >= f) return (n / f).toPrecision(3) + u + unit;
    return String(n) + unit;
  }
  function bytes(n) {
    if (n === null || n === undefined) return "-";
    for (const u of ["B", "KiB", "MiB", "GiB"]) { if (Math.abs(n) < 1024) return (u === "B" ? n : n.toFixed(1)) + " " + u; n /= 1024; }
    return n.toFixed(1) + " TiB";
  }
  function kv(obj) { return Object.entries(obj || {}).map(([k, v]) => k + "=" + (typeof v === "number" ? +v.toPrecision(4) : v)).join(" "); }
  // A form's named fields as JSON values (checkbox: boolean, number: Number, "" left out).
  function formValues(form) {
    const out = {};
    for (const input of form.elements) {
      if (!input.name) continue;
      if (input.type === "checkbox") out[input.name] = input.checked;
      else if (input.value !== "") out[input.name] = input.type === "number" ? Number(input.value) : input.value;
    }
    return out;
  }

  // A paged listing, polled: load(query) fills the table and returns {total, page_size}.
  // The form's fields and the page number live in the URL (linkable), with opts.extra()'s
  // parameters; opts.skip(name, value) leaves a field's default out of the query.
  function listing(formId, load, opts) {
    opts = opts || {};
    const form = document.getElementById(formId);
    const params = new URLSearchParams(window.location.search);
    for (const input of form.elements) if (input.name && params.has(input.name)) input.value = params.get(input.name);
    let page = Math.max(1, parseInt(params.get("page") || "1", 10) || 1);
    let total = 0, size = 50;
    function query() {
      const q = new URLSearchParams();
      for (const input of form.elements) if (input.name && input.value && !(opts.skip && opts.skip(input.name, input.value))) q.set(input.name, input.value);
      if (page > 1) q.set("page", String(page));
      return q;
    }
    const refresh = poll(async () => {
      const q = query();
      const url = new URLSearchParams(q);
      for (const [k, v] of Object.entries(opts.extra ? opts.extra() : {})) if (v) url.set(k, v);
      history.replaceState(null, "", window.location.pathname + (url.toString() ? "?" + url : ""));
      const data = await load(q);
      total = data.total; size = data.page_size;
      document.getElementById("total").textContent = total;
      document.getElementById("pageno").textContent = page + " of " + Math.max(1, Math.ceil(total / size));
    });
    form.addEventListener("submit", (ev) => { ev.preventDefault(); page = 1; refresh(); });
    document.getElementById("prev").addEventListener("click", () => { if (page > 1) { page--; refresh(); } });
    document.getElementById("next").addEventListener("click", () => { if (page * size < total) { page++; refresh(); } });
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

  return Object.freeze({ BASE, CSRF, POLL_MS, COLORS, el, showError, say, api, poll, num, fixed, elapsed, when, whenIso,
    count, bytes, kv, formValues, listing, chart });
})();

// ---------------------------------------------------------------- Jobs, Job, Models, Model
(function (A) {
  const body = document.body;
  const { BASE, el, api, showError, say, poll, listing, elapsed, whenIso, count, bytes, kv } = A;
  function progress(p) {
    if (!p) return "-";
    let text = "step " + p.step + (p.total_steps ? "/" + p.total_steps : "");
    if (typeof p.loss === "number") text += " loss " + (+p.loss.toPrecision(3));
    return text;
  }

  function jobsPage() {
    const tbody = document.querySelector("#jobs tbody");
    listing("filters", async (q) => {
      const data = await api("api/jobs?" + q);
      const rows = data.rows.map((r) => {
        const tr = el("tr", null, { "data-job": r.job_id });
        const link = el("a", r.job_id, { href: BASE + "jobs/" + encodeURIComponent(r.job_id) });
        const id = el("td"); id.append(link); tr.append(id);
        tr.append(el("td", r.name), el("td", r.state, { class: "state-" + r.state }), el("td", r.reason || ""),
          el("td", elapsed(r.elapsed)), el("td", r.nodes || "-"),
          el("td", r.gpus ? (r.gpus.nodes || 1) + "×" + (r.gpus.gpus_per_node || 0) : "-"),
          el("td", progress(r.progress)));
        return tr;
      });
      tbody.replaceChildren(...rows);
      return data;
    });
  }

  function chart(records) {
    // One small SVG per numeric series of the step records (loss, samples/s, ...).
    const steps = records.filter((r) => r.kind === "step" || r.kind === "epoch");
    const keys = new Set();
    for (const r of steps) for (const [k, v] of Object.entries(r)) if (typeof v === "number" && !["step", "time", "epoch"].includes(k)) keys.add(k);
    const out = [];
    for (const key of keys) {
      const pts = steps.filter((r) => typeof r[key] === "number").map((r) => [r.step || 0, r[key]]);
      if (pts.length < 1) continue;
      const W = 320, H = 120, xs = pts.map((p) => p[0]), ys = pts.map((p) => p[1]);
      const x0 = Math.min(...xs), x1 = Math.max(...xs) || 1, y0 = Math.min(...ys), y1 = Math.max(...ys);
      const sx = (x) => 30 + ((x - x0) / (x1 - x0 || 1)) * (W - 40), sy = (y) => H - 15 - ((y - y0) / (y1 - y0 || 1)) * (H - 30);
      const ns = "http://www.w3.org/2000/svg";
      const svg = document.createElementNS(ns, "svg");
      svg.setAttribute("width", W); svg.setAttribute("height", H); svg.setAttribute("class", "chart");
      const line = document.createElementNS(ns, "polyline");
      line.setAttribute("fill", "none"); line.setAttribute("stroke", "#07a"); line.setAttribute("stroke-width", "1.5");
      line.setAttribute("points", pts.map((p) => sx(p[0]).toFixed(1) + "," + sy(p[1]).toFixed(1)).join(" "));
      const label = document.createElementNS(ns, "text");
      label.setAttribute("x", 32); label.setAttribute("y", 12); label.setAttribute("font-size", "11");
      label.textContent = key + " (last " + (+ys[ys.length - 1].toPrecision(4)) + ")";
      svg.append(line, label); out.push(svg);
    }
    return out;
  }

  function jobPage() {
    const job = body.dataset.job;
    const logPre = document.getElementById("log");
    const opts = document.getElementById("logopts");
    let offset = 0, shownKey = "";
    async function showDetail() {
      const d = await api("api/jobs/" + job);
      document.getElementById("jobname").textContent = d.name;
      const st = document.getElementById("state");
      st.textContent = d.status.state; st.className = "state-" + d.status.state;
      document.getElementById("reason").textContent = d.status.reason || "";
      document.getElementById("elapsed").textContent = elapsed(d.status.elapsed);
      document.getElementById("nodes").textContent = d.status.nodes || "-";
      document.getElementById("spec").textContent = JSON.stringify(d.spec, null, 2);
      document.getElementById("script").textContent = d.script || "";
      const sel = opts.elements.restart;
      const want = ["", ...d.logs.map((l) => String(l.restart))];
      if (sel.options.length !== want.length) {
        const cur = sel.value;
        sel.replaceChildren(...want.map((v) => el("option", v === "" ? "latest" : v, { value: v })));
        sel.value = cur;
      }
      document.getElementById("cancel").disabled = !!d.status.state && ["COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "PREEMPTED", "BOOT_FAIL", "DEADLINE"].includes(d.status.state);
      const m = await api("api/jobs/" + job + "/metrics");
      const charts = chart(m.records);
      if (charts.length) document.getElementById("metrics").replaceChildren(...charts);
    }
    async function showLog() {
      const restart = opts.elements.restart.value, rank = opts.elements.rank.value;
      const key = restart + "/" + rank;
      if (key !== shownKey) { offset = 0; logPre.textContent = ""; shownKey = key; }
      const q = new URLSearchParams();
      if (restart) q.set("restart", restart);
      if (rank) q.set("rank", rank); else q.set("offset", String(offset));
      try {
        const d = await api("api/jobs/" + job + "/log?" + q);
        if (rank) logPre.textContent = d.text; else { logPre.textContent += d.text; offset = d.offset; }
      } catch (e) { if (!/no log/.test(e.message)) showError(e.message); }
    }
    const detail = poll(showDetail), log = poll(showLog, { quiet: true });
    opts.addEventListener("change", log);
    opts.addEventListener("submit", (ev) => { ev.preventDefault(); log(); });
    document.getElementById("cancel").addEventListener("click", async () => {
      if (!window.confirm("Cancel job " + job + "?")) return;
      try { await api("api/jobs/" + job + "/cancel", { method: "POST" }); detail(); } catch (e) { showError(e.message); }
    });
  }

  function modelsPage() {
    const tbody = document.querySelector("#models tbody");
    listing("filters", async (q) => {
      const data = await api("api/models?" + q);
      tbody.replaceChildren(...data.rows.map((r) => {
        const tr = el("tr", null, { "data-ref": r.ref });
        const name = el("td"); name.append(el("a", r.name, { href: BASE + "models/" + encodeURIComponent(r.name) }));
        tr.append(name, el("td", r.version), el("td", r.model_type || "-"), el("td", count(r.flops_per_sample, "FLOP")),
          el("td", bytes(r.peak_memory_bytes)), el("td", kv(r.metrics)), el("td", (r.tags || []).join(", ")),
          el("td", (r.aliases || []).join(", ")), el("td", whenIso(r.created)));
        return tr;
      }));
      return data;
    });
  }

  function modelPage() {
    const name = body.dataset.model;
    async function act(fn) { try { say(await fn()); showError(""); refresh(); } catch (e) { showError(e.message); } }
    function button(text, cls, onclick) { const b = el("button", text, { type: "button", class: cls || "" }); b.addEventListener("click", onclick); return b; }
    async function show() {
      const d = await api("api/models/" + encodeURIComponent(name));
      document.querySelector("#aliases tbody").replaceChildren(...d.aliases.map((a) => {
        const tr = el("tr", null, { "data-alias": a.alias });
        const hist = a.history.map((h) => h.action + " " + h.version + (h.previous ? " (was " + h.previous + ")" : "")).join("; ");
        const td = el("td");
        td.append(button("roll back", "", () => act(async () => { const r = await api("api/models/" + encodeURIComponent(name) + "/rollback", { method: "POST", json: { alias: a.alias } }); return r.alias + " -> " + r.ref; })));
        tr.append(el("td", a.alias), el("td", a.version), el("td", hist), td);
        return tr;
      }));
      document.querySelector("#versions tbody").replaceChildren(...d.versions.map((v) => {
        const tr = el("tr", null, { "data-ref": v.ref });
        const actions = el("td");
        actions.append(
          button("promote", "promote", () => {
            const alias = window.prompt("Point which alias at " + v.ref + "?", "prod");
            if (alias) act(async () => { const r = await api("api/models/" + encodeURIComponent(name) + "/promote", { method: "POST", json: { version: v.version, alias } }); return r.alias + " -> " + r.ref; });
          }),
          button("verify", "verify", () => act(async () => (await api("api/models/" + encodeURIComponent(name) + "/verify", { method: "POST", json: { version: v.version } })).message)),
          button("delete", "danger delete", () => confirmDelete(v.ref, v.version)));
        tr.append(el("td", v.version), el("td", v.kind), el("td", v.model_type || "-"), el("td", kv(v.metrics)),
          el("td", v.parent || "-"), el("td", (v.aliases || []).join(", ")), el("td", whenIso(v.created)), actions);
        return tr;
      }));
    }
    function confirmDelete(ref, version) {
      const dlg = document.getElementById("confirm-delete");
      document.getElementById("delete-ref").textContent = ref;
      const typed = document.getElementById("delete-typed");
      typed.value = "";
      dlg.onclose = () => {
        if (dlg.returnValue !== "ok") return;
        const q = new URLSearchParams({ confirm: typed.value });
        act(async () => "deleted " + (await api("api/models/" + encodeURIComponent(name) + "/versions/" + version + "?" + q, { method: "DELETE" })).deleted);
      };
      dlg.showModal();
    }
    const refresh = poll(show);
  }

  const pages = { jobs: jobsPage, job: jobPage, models: modelsPage, model: modelPage };
  if (pages[body.dataset.page]) pages[body.dataset.page]();
})(window.aimass);
