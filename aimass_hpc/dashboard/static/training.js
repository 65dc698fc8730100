// The Training page: the viewer's training runs, and the curves of the ticked ones overlaid.
// The selection lives in the URL (?runs=123,124), so a comparison is a link.
"use strict";
(function () {
  const P = window.aimass;
  if (document.body.dataset.page !== "training") return;
  const MAX = parseInt(document.body.dataset.maxRuns || "12", 10);
  const start = new URLSearchParams(window.location.search).get("runs") || "";
  let selected = start.split(",").map((s) => s.trim()).filter((s) => /^[0-9]+(_[0-9]+)?$/.test(s)).slice(0, MAX);
  const tbody = document.querySelector("#runs tbody");
  const box = document.getElementById("curves");
  const LABELS = { loss: "loss", samples_per_s: "throughput (samples/s)", lr: "learning rate" };

  function showSelected() { document.getElementById("selected").textContent = selected.length ? selected.join(", ") : "none"; }

  const list = P.listing("filters", async (q) => {
    const data = await P.api("api/training?" + q);
    tbody.replaceChildren(...data.rows.map((r) => {
      const tr = P.el("tr", null, { "data-job": r.job_id });
      const tick = P.el("input", null, { type: "checkbox", class: "pick", "aria-label": "show " + r.job_id });
      tick.checked = selected.includes(r.job_id);
      tick.addEventListener("change", () => {
        selected = selected.filter((id) => id !== r.job_id);
        if (tick.checked) selected.push(r.job_id);
        if (selected.length > MAX) selected.shift();
        changed();
      });
      const pick = P.el("td"); pick.append(tick);
      const job = P.el("td"); job.append(P.el("a", r.job_id, { href: P.BASE + "jobs/" + encodeURIComponent(r.job_id) }));
      const step = r.step === null || r.step === undefined ? "-" : r.step + (r.total_steps ? "/" + r.total_steps : "");
      const metrics = Object.entries(r.metrics || {}).filter(([, v]) => typeof v === "number").map(([k, v]) => k + "=" + P.num(v)).join(" ");
      tr.append(pick, job, P.el("td", r.name), P.el("td", r.state, { class: "state-" + r.state }), P.el("td", P.elapsed(r.elapsed)),
        P.el("td", step), P.el("td", P.num(r.loss)), P.el("td", P.num(r.samples_per_s)), P.el("td", metrics));
      return tr;
    }));
    drawCurves().catch((e) => P.showError(e.message));  // after the listing cleared errors
    return data;
  }, { extra: () => ({ runs: selected.join(",") }) });

  function changed() { showSelected(); list.refresh(); }

  async function drawCurves() {
    showSelected();
    document.getElementById("nocurves").hidden = selected.length > 0;
    if (!selected.length) { box.replaceChildren(); return; }
    const data = await P.api("api/training/curves?runs=" + encodeURIComponent(selected.join(",")));
    // One chart per series (step loss, step throughput, epoch metrics...), a line per run.
    const charts = new Map();
    data.runs.forEach((run, i) => {
      for (const kind of ["step", "epoch"]) {
        for (const [key, points] of Object.entries(run[kind] || {})) {
          const id = kind + "-" + key;
          if (!charts.has(id)) charts.set(id, { title: (kind === "epoch" ? "epoch " : "") + (LABELS[key] || key), datasets: [] });
          charts.get(id).datasets.push({
            label: run.job_id + " " + run.name, data: points.map((p) => ({ x: p[0], y: p[1] })),
            borderColor: P.COLORS[i % P.COLORS.length], backgroundColor: P.COLORS[i % P.COLORS.length],
            pointRadius: kind === "epoch" ? 3 : 0, borderWidth: 1.5,
          });
        }
      }
    });
    const keep = new Set();
    for (const [id, c] of charts) {
      keep.add(id);
      let div = box.querySelector('div[data-series="' + CSS.escape(id) + '"]');
      if (!div) {
        div = P.el("div", null, { class: "chartbox", "data-series": id });
        div.append(P.el("h3", c.title), P.el("canvas", null, { width: "520", height: "260" }));
        box.append(div);
      }
      P.chart(div.querySelector("canvas"), {
        type: "line",
        data: { datasets: c.datasets },
        options: { parsing: false, scales: { x: { type: "linear", title: { display: true, text: "step" } } },
          plugins: { legend: { display: true, position: "bottom" } } },
      });
    }
    for (const div of [...box.children]) {
      if (!keep.has(div.dataset.series)) { const ch = window.Chart.getChart(div.querySelector("canvas")); if (ch) ch.destroy(); div.remove(); }
    }
  }

  document.getElementById("clear").addEventListener("click", () => { selected = []; tbody.querySelectorAll("input.pick").forEach((c) => { c.checked = false; }); changed(); });
})();
