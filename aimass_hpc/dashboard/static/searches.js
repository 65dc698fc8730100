// The Searches pages: the viewer's searches, and one search's trials (paged, sorted and
// filtered on the server), best-so-far curve, parallel coordinates, parameter importance,
// and cancel / resume.
"use strict";
(function () {
  const P = window.aimass;
  const page = document.body.dataset.page;

  function searchesPage() {
    const tbody = document.querySelector("#searches tbody");
    P.listing("filters", async (q) => {
      const data = await P.api("api/searches?" + q);
      tbody.replaceChildren(...data.rows.map((s) => {
        const tr = P.el("tr", null, { "data-search": s.id });
        const link = P.el("td"); link.append(P.el("a", s.id, { href: P.BASE + "searches/" + encodeURIComponent(s.id) }));
        const best = s.best_value === null || s.best_value === undefined ? "-" : P.num(s.best_value) + " (trial " + s.best_trial + ")";
        tr.append(link, P.el("td", s.name), P.el("td", s.state, { class: "state-" + s.state, title: s.note || "" }),
          P.el("td", s.trials_done + "/" + (s.budget === null ? "?" : s.budget)), P.el("td", best),
          P.el("td", s.best_ref || "-"), P.el("td", P.when(s.created_at)));
        return tr;
      }));
      return data;
    });
  }

  function searchPage() {
    const sid = document.body.dataset.search;
    const path = "api/searches/" + encodeURIComponent(sid);
    const form = document.getElementById("filters");
    const thead = document.querySelector("#trials thead tr");
    const tbody = document.querySelector("#trials tbody");
    let detail = null, plotKey = "", bestId = null;

    function header(columns) {
      if (thead.children.length === columns.length) return;
      thead.replaceChildren(...columns.map((c) => {
        const th = P.el("th", c.replace(/^param:/, ""), { class: "sortable", "data-col": c });
        th.addEventListener("click", () => {
          const order = form.elements.sort.value === c && form.elements.order.value === "asc" ? "desc" : "asc";
          form.elements.sort.value = c; form.elements.order.value = order;
          form.requestSubmit();
        });
        return th;
      }));
    }
    function markSorted() {
      for (const th of thead.children) {
        th.classList.toggle("sorted-asc", th.dataset.col === form.elements.sort.value && form.elements.order.value === "asc");
        th.classList.toggle("sorted-desc", th.dataset.col === form.elements.sort.value && form.elements.order.value === "desc");
      }
    }
    function cell(t, c) {
      const td = P.el("td");
      if (c === "job_id") {
        if (t.job_id) td.append(P.el("a", t.job_id, { href: P.BASE + "jobs/" + encodeURIComponent(t.job_id) }));
        else td.textContent = "-";
      } else if (c === "state") { td.textContent = t.state; td.className = "state-" + t.state; if (t.reason) td.title = t.reason; }
      else if (c === "duration") td.textContent = P.elapsed(t.duration_s);
      else if (c.startsWith("param:")) td.textContent = P.num(t.params[c.slice(6)]);
      else td.textContent = P.num(t[c]);
      return td;
    }

    async function refreshDetail() {
      detail = await P.api(path);
      document.getElementById("sname").textContent = detail.name + " (" + sid + ")";
      const st = document.getElementById("sstate");
      st.textContent = detail.state; st.className = "state-" + detail.state;
      document.getElementById("ssettings").textContent = detail.sampler + ", " + detail.direction + " " + detail.metric + ", budget " + detail.budget + ", " + detail.parallel + " at once";
      document.getElementById("scounts").textContent = Object.entries(detail.counts).map(([k, v]) => v + " " + k).join(", ") || "none yet";
      document.getElementById("sdriver").textContent = detail.driver ? "pid " + detail.driver.pid + " on " + detail.driver.host : (detail.finished ? "finished" : "not running");
      bestId = detail.best ? detail.best.id : null;
      document.getElementById("sbest").textContent = detail.best ? "trial " + detail.best.id + " = " + P.num(detail.best.value) + "  " + Object.entries(detail.best.params).map(([k, v]) => k + "=" + P.num(v)).join(" ") : "-";
      document.getElementById("cancel").disabled = detail.finished;
      document.getElementById("resume").disabled = detail.finished || !!detail.driver;
      header(detail.columns);
      markSorted();
    }

    async function refreshPlots() {
      const key = (detail.counts.finished || 0) + "/" + detail.trials_done;
      if (key === plotKey) return;  // nothing new has finished: keep the charts as they are
      const d = await P.api(path + "/plots");
      plotKey = key;
      P.chart(document.getElementById("best-chart"), {
        type: "line",
        data: { datasets: [
          { label: "trial value", data: d.best_so_far.map((p) => ({ x: p.n, y: p.value })), showLine: false, pointRadius: 2, borderColor: "#1f77b4", backgroundColor: "#1f77b4" },
          { label: "best so far", data: d.best_so_far.map((p) => ({ x: p.n, y: p.best })), stepped: "before", pointRadius: 0, borderColor: "#d62728", backgroundColor: "#d62728" },
        ] },
        options: { parsing: false, scales: { x: { type: "linear", title: { display: true, text: "finished trials" } }, y: { title: { display: true, text: detail.metric } } } },
      });
      P.chart(document.getElementById("importance-chart"), {
        type: "bar",
        data: { labels: d.importance.map((i) => i.param), datasets: [{ label: "importance (eta²)", data: d.importance.map((i) => i.importance), backgroundColor: "#2ca02c" }] },
        options: { indexAxis: "y", scales: { x: { min: 0, max: 1 } } },
      });
      // Parallel coordinates: a line chart over the axes, each on [0, 1]; a line per trial,
      // coloured from best (dark) to worst (light); gaps for inactive parameters.
      const axes = d.parallel.axes, lines = d.parallel.lines;
      const vals = lines.map((l) => l.value), lo = Math.min(...vals), hi = Math.max(...vals);
      const goodness = (v) => { const t = hi > lo ? (v - lo) / (hi - lo) : 1; return d.direction === "minimize" ? 1 - t : t; };
      const labels = axes.map((a) => a.name + " [" + a.ticks.map((t) => t.label).join(a.ticks.length > 2 ? "|" : "..") + "]");
      const ordered = lines.slice().sort((a, b) => goodness(a.value) - goodness(b.value));  // best drawn last
      P.chart(document.getElementById("parallel-chart"), {
        type: "line",
        data: { labels, datasets: ordered.map((l) => {
          const g = goodness(l.value);
          const color = "hsla(" + Math.round(220 - 180 * g) + ",70%," + Math.round(75 - 40 * g) + "%,0.8)";
          return { label: "trial " + l.trial, data: l.pos, borderColor: color, backgroundColor: color, pointRadius: 0, borderWidth: 1, spanGaps: false };
        }) },
        options: { plugins: { legend: { display: false }, tooltip: { enabled: lines.length <= 300 } },
          scales: { y: { min: -0.02, max: 1.02, ticks: { display: false } } }, elements: { line: { tension: 0 } } },
      });
      document.getElementById("pc-of").textContent = "(" + lines.length + " of " + d.parallel.of + " finished trials)";
    }

    P.listing("filters", async (q) => {
      await refreshDetail();
      const data = await P.api(path + "/trials?" + q);
      tbody.replaceChildren(...data.rows.map((t) => {
        const tr = P.el("tr", null, { "data-trial": String(t.id), class: t.id === bestId ? "best" : "" });
        tr.append(...detail.columns.map((c) => cell(t, c)));
        return tr;
      }));
      refreshPlots().catch((e) => P.showError(e.message));
      return data;
    });

    async function act(what, fn) {
      try { P.say(await fn()); P.showError(""); } catch (e) { P.showError(what + ": " + e.message); }
    }
    document.getElementById("cancel").addEventListener("click", () => {
      if (!window.confirm("Cancel search " + sid + " and its running trials?")) return;
      P.say("cancelling…");
      act("cancel", async () => { const r = await P.api(path + "/cancel", { method: "POST" }); return r.finished ? "search cancelled" : "cancel requested; the driver stops the trials at its next poll"; });
    });
    document.getElementById("resume").addEventListener("click", () => {
      act("resume", async () => "driver job " + (await P.api(path + "/resume", { method: "POST" })).driver_job_id + " submitted");
    });
  }

  if (page === "searches") searchesPage();
  if (page === "search") searchPage();
})();
