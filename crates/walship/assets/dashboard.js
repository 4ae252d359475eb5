// walship dashboard: renders the status and run history the page carries inline, then
// refreshes them from the JSON API every 5 seconds. No external requests; all text goes
// through textContent.
"use strict";

(function () {
  const SVG = "http://www.w3.org/2000/svg";
  const REFRESH_MS = 5000;

  function el(tag, attrs, children) {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (k === "text") e.textContent = v;
      else e.setAttribute(k, v);
    }
    for (const c of children || []) if (c) e.appendChild(c);
    return e;
  }

  function svg(tag, attrs) {
    const e = document.createElementNS(SVG, tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (k === "text") e.textContent = v;
      else e.setAttribute(k, String(v));
    }
    return e;
  }

  function bytes(n) {
    if (n === null || n === undefined) return "–";
    const units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let i = 0;
    while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
    return (i === 0 ? n.toFixed(0) : n.toFixed(1)) + " " + units[i];
  }

  function age(seconds) {
    if (seconds === null || seconds === undefined) return "–";
    if (seconds < 1) return (seconds * 1000).toFixed(0) + " ms";
    if (seconds < 90) return seconds.toFixed(seconds < 10 ? 1 : 0) + " s";
    if (seconds < 5400) return (seconds / 60).toFixed(0) + " min";
    if (seconds < 172800) return (seconds / 3600).toFixed(1) + " h";
    return (seconds / 86400).toFixed(1) + " d";
  }

  function time(iso) {
    if (!iso) return "–";
    const d = new Date(iso);
    return isNaN(d) ? iso : d.toISOString().replace("T", " ").replace(/\.\d+Z$/, "Z");
  }

  function badge(status) {
    return el("span", { class: "badge " + status, text: status });
  }

  function stat(label, value, cls) {
    return el("div", { class: "stat" + (cls ? " " + cls : "") }, [
      el("div", { class: "label", text: label }),
      el("div", { class: "value", text: value }),
    ]);
  }

  function runKind(r) {
    return r.id && r.id.indexOf("failure-") === 0 ? "failure" : r.kind;
  }

  // Bars of backup runs over time: height = size (log scale), colour = kind, red = failed.
  function chart(runs) {
    const W = 900, H = 180, L = 58, R = 10, T = 10, B = 26;
    const s = svg("svg", { class: "chart", viewBox: `0 0 ${W} ${H}`, role: "img", "aria-label": "backup runs and sizes over time" });
    const now = Date.now();
    const ok = runs.filter((r) => r.start_ms);
    const t0 = ok.length ? Math.min(...ok.map((r) => r.start_ms)) : now - 3600e3;
    const span = Math.max(now - t0, 60e3);
    const maxB = Math.max(1, ...ok.map((r) => r.bytes || 0));
    const logMax = Math.log10(maxB + 1);
    const x = (t) => L + ((t - t0) / span) * (W - L - R);
    const y = (b) => H - B - (Math.log10((b || 0) + 1) / logMax) * (H - B - T);
    s.appendChild(svg("line", { x1: L, y1: H - B, x2: W - R, y2: H - B, stroke: "#c9ced6" }));
    s.appendChild(svg("line", { x1: L, y1: T, x2: L, y2: H - B, stroke: "#c9ced6" }));
    s.appendChild(svg("text", { x: L - 6, y: T + 10, "text-anchor": "end", text: bytes(maxB) }));
    s.appendChild(svg("text", { x: L - 6, y: H - B, "text-anchor": "end", text: "0" }));
    s.appendChild(svg("text", { x: L, y: H - 8, text: time(new Date(t0).toISOString()) }));
    s.appendChild(svg("text", { x: W - R, y: H - 8, "text-anchor": "end", text: "now" }));
    for (const r of ok) {
      const kind = runKind(r);
      const failed = r.result !== "ok";
      const x0 = x(r.start_ms);
      const x1 = Math.max(x(r.end_ms || r.start_ms), x0 + 3);
      const top = failed ? T : y(r.bytes);
      const rect = svg("rect", {
        class: "run run-" + kind + (failed ? " run-failed" : ""),
        x: x0.toFixed(1), y: top.toFixed(1),
        width: (x1 - x0).toFixed(1), height: Math.max(1, H - B - top).toFixed(1),
        fill: failed ? "#d0342c" : kind === "snapshot" ? "#3b6fd8" : "#1f9d55",
        "fill-opacity": failed ? 0.35 : 0.85,
      });
      rect.appendChild(svg("title", { text: `${kind} ${r.result} ${time(r.start)} ${bytes(r.bytes)}${r.error ? " — " + r.error : ""}` }));
      s.appendChild(rect);
    }
    if (!ok.length) {
      s.appendChild(svg("text", { x: W / 2, y: H / 2, "text-anchor": "middle", text: "no backup runs yet" }));
    }
    return s;
  }

  function runsTable(runs) {
    const head = el("tr", {}, ["Start", "Kind", "Result", "Duration", "Bytes", "Objects", "Error"].map((h, i) =>
      el("th", { class: i >= 3 && i <= 5 ? "num" : "", text: h })));
    const rows = runs.slice(0, 12).map((r) => el("tr", { class: "run-row" }, [
      el("td", { text: time(r.start) }),
      el("td", { text: runKind(r) + (r.trigger ? " (" + r.trigger + ")" : "") }),
      el("td", { class: "result-" + r.result, text: r.result }),
      el("td", { class: "num", text: r.end_ms ? age((r.end_ms - r.start_ms) / 1000) : "–" }),
      el("td", { class: "num", text: bytes(r.bytes) }),
      el("td", { class: "num", text: String(r.objects || 0) }),
      el("td", { class: "err", text: r.error || "" }),
    ]));
    return el("table", { class: "runs" }, [el("thead", {}, [head]), el("tbody", {}, rows)]);
  }

  function card(db, runs) {
    const h = db.health || {};
    const status = h.status || "unknown";
    const title = el("h2", {}, [el("span", { class: "db-name", text: db.name }), badge(status)]);
    const reasons = (h.reasons || []).length
      ? el("ul", { class: "reasons" }, h.reasons.map((r) => el("li", { text: r })))
      : null;
    const stats = el("div", { class: "stats" }, [
      stat("Replication lag", age(h.replication_lag_seconds), "lag"),
      stat("Newest restorable point", age(h.newest_restorable_age_seconds) + " ago"),
      stat("Backups (snapshots)", String(h.backups ?? 0), "backups"),
      stat("Latest backup", h.latest_backup_age_seconds == null ? "–" : age(h.latest_backup_age_seconds) + " ago"),
      stat("Newest snapshot", h.snapshot_age_seconds == null ? "–" : age(h.snapshot_age_seconds) + " ago"),
      stat("WAL size", bytes(db.wal_bytes)),
      stat("Uploaded", bytes(db.bytes_uploaded) + " / " + db.objects_uploaded + " obj"),
      stat("Errors in a row", String(db.consecutive_errors || 0)),
    ]);
    const legend = el("div", { class: "legend" }, [
      el("span", {}, [el("i", { style: "background:#3b6fd8" }), document.createTextNode("snapshot")]),
      el("span", {}, [el("i", { style: "background:#1f9d55" }), document.createTextNode("WAL sync")]),
      el("span", {}, [el("i", { style: "background:#d0342c" }), document.createTextNode("failed")]),
    ]);
    return el("section", { class: "card db", "data-db": db.name, "data-status": status }, [
      title,
      el("div", { class: "muted", text: db.path + " → " + db.replica + (db.generation ? " · generation " + db.generation : "") }),
      reasons,
      stats,
      el("h3", { text: "Backup history" }),
      legend,
      chart(runs || []),
      el("h3", { text: "Latest runs" }),
      runsTable(runs || []),
      db.last_error ? el("p", { class: "reasons", text: "Last error: " + db.last_error }) : null,
    ]);
  }

  function render(data) {
    const st = data.status || {};
    const overall = document.getElementById("overall");
    overall.className = "badge " + (st.status || "");
    overall.textContent = st.status || "unknown";
    document.getElementById("updated").textContent = "updated " + time(st.now) + " · walship " + (st.version || "");
    const main = document.getElementById("databases");
    main.replaceChildren(...(st.databases || []).map((db) => card(db, (data.history || {})[db.name])));
    document.body.dataset.rendered = "true";
  }

  async function refresh() {
    try {
      const st = await (await fetch("/api/v1/status", { cache: "no-store" })).json();
      const history = {};
      await Promise.all((st.databases || []).map(async (db) => {
        const r = await fetch("/api/v1/databases/" + encodeURIComponent(db.name) + "/history?limit=200", { cache: "no-store" });
        history[db.name] = (await r.json()).runs || [];
      }));
      render({ status: st, history });
    } catch (e) {
      document.getElementById("updated").textContent = "cannot refresh: " + e;
    }
  }

  try {
    render(JSON.parse(document.getElementById("initial-data").textContent));
  } catch (e) {
    document.getElementById("updated").textContent = "cannot render: " + e;
  }
  setInterval(refresh, REFRESH_MS);
})();
