// aimass dashboard: the Services list and one service's page (vanilla JS, no build step).
// Every value reaches the page through textContent, never as HTML.
"use strict";
(function () {
  const A = window.aimass;
  const body = document.body;
  const { BASE, el, api, showError, say, poll, fixed: num, whenIso: when, formValues } = A;
  function opText(op) {
    if (!op) return "-";
    let text = op.action + ": " + op.state;
    if (op.error) text += " (" + op.error + ")";
    else if (op.result && op.result.new_version) text += " -> version " + op.result.new_version;
    else if (op.result && op.result.cancelled) text += " (jobs " + (op.result.cancelled.join(", ") || "-") + ")";
    return text;
  }

  // ------------------------------------------------------------------ the list
  function servicesPage() {
    const tbody = document.querySelector("#services tbody");
    const list = A.listing("filters", async (q) => {
      const data = await api("api/services?" + q);
      tbody.replaceChildren(...data.rows.map((r) => {
        const tr = el("tr", null, { "data-service": r.name });
        const name = el("td"); name.append(el("a", r.name, { href: BASE + "services/" + encodeURIComponent(r.name) }));
        tr.append(name, el("td", r.model), el("td", r.versions.join(", ") || "-"),
          el("td", r.ready_replicas + "/" + (r.desired_replicas === null || r.desired_replicas === undefined ? "?" : r.desired_replicas)),
          el("td", Object.entries(r.states).map(([k, v]) => k + " " + v).join(", ")),
          el("td", r.nodes.join(", ") || "-"), el("td", r.supervised ? "yes" : "no"),
          el("td", opText(r.operation)), el("td", when(r.started)));
        return tr;
      }));
      return data;
    }, { skip: (name, value) => name === "show" && value === "live" });  // the default: not in the URL
    document.getElementById("start").addEventListener("submit", async (ev) => {
      ev.preventDefault();
      try {
        const r = await api("api/services", { method: "POST", json: formValues(ev.target) });
        say("started " + r.name + " (job " + r.job_id + ", " + r.replicas + " replica(s))");
        showError(""); list.refresh();
      } catch (e) { showError(e.message); }
    });
  }

  // ------------------------------------------------------------------ one service
  function servicePage() {
    const name = body.dataset.service;
    const path = "api/services/" + encodeURIComponent(name);
    let chart = null;
    function drawChart(series) {
      if (typeof Chart === "undefined" || !series.length) return;
      const labels = series.map((p) => new Date(p.t * 1000).toLocaleTimeString());
      const rps = series.map((p) => p.requests_per_s), p95 = series.map((p) => p.p95_ms);
      if (!chart) {
        chart = new Chart(document.getElementById("perf-chart"), {
          type: "line",
          data: { labels, datasets: [
            { label: "requests/s", data: rps, borderColor: "#07a", yAxisID: "y", pointRadius: 0 },
            { label: "p95 latency (ms)", data: p95, borderColor: "#a70", yAxisID: "y1", pointRadius: 0 }] },
          options: { animation: false, responsive: true, scales: { y: { beginAtZero: true, position: "left" }, y1: { beginAtZero: true, position: "right", grid: { drawOnChartArea: false } } } },
        });
      } else {
        chart.data.labels = labels; chart.data.datasets[0].data = rps; chart.data.datasets[1].data = p95; chart.update();
      }
    }
    async function show() {
      const d = await api(path);
      document.getElementById("model").textContent = d.model + (d.alias ? "" : " (fixed version)");
      document.getElementById("versions").textContent = d.versions.join(", ") || "-";
      const st = d.status;
      document.getElementById("replica-count").textContent = "desired " + (st.desired_replicas === null ? "?" : st.desired_replicas) + " (" + st.desired_state + (st.stopping ? ", stopping" : "") + "), " + st.ready_replicas + " READY, " + st.coming_replicas + " coming";
      const sup = st.supervisor;
      document.getElementById("supervisor").textContent = sup ? "job " + sup.job_id + " " + (sup.state || "?") + ", heartbeat " + when(sup.heartbeat) + ", replaced " + (sup.replaced || 0) : "none";
      document.getElementById("operation").textContent = opText(d.operation);
      const live = d.live;
      for (const id of ["upgrade-submit", "rollback", "stop", "bench-submit"]) document.getElementById(id).disabled = !live || (d.operation && d.operation.state === "running");
      document.getElementById("rollback").disabled = document.getElementById("rollback").disabled || !d.alias;
      document.querySelector("#replicas tbody").replaceChildren(...d.replicas.map((r) => {
        const tr = el("tr", null, { "data-replica": r.replica, "data-job": r.job_id });
        const hist = (r.history || []).slice(-4).map((h) => h.state).join(" > ");
        const last = (r.history || []).length ? r.history[r.history.length - 1].why : "";
        tr.append(el("td", r.replica), el("td", r.state, { class: "state-" + r.state }),
          el("td", r.health, { class: "health-" + r.health }), el("td", r.version || "-"), el("td", r.node || "-"),
          el("td", r.job_id), el("td", num(r.requests_per_s)), el("td", num(r.p50_ms, 2)), el("td", num(r.p95_ms, 2)),
          el("td", num(r.p99_ms, 2)), el("td", r.requests === undefined ? "-" : r.requests),
          el("td", hist + (last ? " (" + last + ")" : "")));
        return tr;
      }));
      document.querySelector("#decisions tbody").replaceChildren(...(st.decisions || []).slice().reverse().map((x) =>
        (() => { const tr = el("tr"); tr.append(el("td", when(x.at)), el("td", x.action), el("td", x.replica === undefined ? "-" : x.replica), el("td", x.new_job_id || x.job_id || "-"), el("td", x.why)); return tr; })()));
      drawChart(d.series);
    }
    const refresh = poll(show);
    async function act(sub, json, done) {
      try { const r = await api(path + "/" + sub, { method: "POST", json }); say(done(r)); showError(""); refresh(); }
      catch (e) { showError(e.message); }
    }
    document.getElementById("upgrade").addEventListener("submit", (ev) => {
      ev.preventDefault();
      const v = formValues(ev.target);
      act("upgrade", { version: v.version === undefined ? null : v.version }, () => "upgrade started" + (v.version ? " to version " + v.version : ""));
    });
    document.getElementById("rollback").addEventListener("click", () => {
      if (window.confirm("Roll " + name + " back to the alias's previous version?")) act("rollback", {}, () => "rollback started");
    });
    document.getElementById("stop").addEventListener("click", () => {
      if (window.confirm("Stop service " + name + "?")) act("stop", {}, () => "stopping " + name);
    });
    document.getElementById("bench").addEventListener("submit", async (ev) => {
      ev.preventDefault();
      const btn = document.getElementById("bench-submit"), table = document.getElementById("bench-result");
      btn.disabled = true; say("performance test running…");
      try {
        const r = await api(path + "/bench", { method: "POST", json: formValues(ev.target) });
        const rows = [["requests/s", r.requests_per_s], ["samples/s", r.samples_per_s], ["p50 ms", r.p50_ms], ["p95 ms", r.p95_ms],
          ["p99 ms", r.p99_ms], ["ok", r.requests_ok], ["failed", r.requests_failed], ["input shape", r.input_shape.join("×")],
          ["output shape", r.output_shape.join("×")], ["replicas", r.replicas], ["concurrency", r.concurrency], ["seconds", r.seconds],
          ["model", r.model + ":" + r.version]];
        table.tBodies[0].replaceChildren(...rows.map(([k, v]) => { const tr = el("tr", null, { "data-key": k }); tr.append(el("th", k), el("td", v === null ? "-" : v)); return tr; }));
        table.hidden = false; say("performance test done"); showError("");
      } catch (e) { say(""); showError(e.message); }
      btn.disabled = false;
    });
  }

  if (body.dataset.page === "services") servicesPage();
  if (body.dataset.page === "service") servicePage();
})();
