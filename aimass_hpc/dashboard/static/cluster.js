// aimass dashboard: the Cluster page (partitions, nodes with GPU allocation, reservations,
// fair share). Values via textContent only; polls every 5 s.
"use strict";
(function () {
  const body = document.body;
  if (body.dataset.page !== "cluster") return;
  const { el, api, poll } = window.aimass;
  function row(cells, attrs) { const tr = el("tr", null, attrs); for (const c of cells) tr.append(c instanceof Node ? c : el("td", c)); return tr; }
  function usage(used, total) {
    const td = el("td");
    const bg = el("span", null, { class: "bar-bg" });
    const bar = el("span", null, { class: "bar" });
    bar.style.width = (total ? Math.round((60 * used) / total) : 0) + "px";
    bg.append(bar); td.append(bg, document.createTextNode(used + "/" + total));
    return td;
  }
  function n(v) { return v === null || v === undefined ? "-" : String(+Number(v).toPrecision(4)); }
  poll(async () => {
    const d = await api("api/cluster");
    const t = d.totals;
    document.getElementById("totals").textContent = t.nodes + " nodes · CPUs " + t.cpus_alloc + "/" + t.cpus_total + " allocated · GPUs " + t.gpus_alloc + "/" + t.gpus_total + " allocated";
    document.querySelector("#partitions tbody").replaceChildren(...d.partitions.map((p) => row([
      p.partition + (p.default ? " (default)" : ""), p.avail, p.time_limit, p.nodes,
      Object.entries(p.states).map(([k, v]) => k + " " + v).join(", "), usage(p.cpus_alloc, p.cpus_total), p.gres.join(", ") || "-",
    ], { "data-partition": p.partition })));
    document.querySelector("#nodes tbody").replaceChildren(...d.nodes.map((x) => row([
      x.node, x.state, x.partitions.join(", "), usage(x.cpus_alloc, x.cpus_total), usage(x.gpus_alloc, x.gpus_total),
      (x.mem_alloc_mb || 0) + "/" + (x.mem_mb === null ? "?" : x.mem_mb) + " MB", x.cpu_load || "-",
    ], { "data-node": x.node })));
    document.querySelector("#reservations tbody").replaceChildren(...d.reservations.map((r) => row([
      r.ReservationName, r.State || "-", r.Nodes || "-", r.StartTime || "-", r.EndTime || "-", r.Users || "-", r.Flags || "-",
    ], { "data-reservation": r.ReservationName })));
    document.getElementById("fairshare-none").hidden = d.fairshare !== null;
    document.querySelector("#fairshare tbody").replaceChildren(...(d.fairshare || []).map((f) => row([
      f.account, n(f.rawshares), n(f.normshares), n(f.rawusage), n(f.effectvusage), n(f.fairshare),
    ], { "data-account": f.account || "" })));
  }, { ms: 5000 });
})();
