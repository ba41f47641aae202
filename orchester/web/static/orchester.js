// Orchester's pages: plain JavaScript, no build step. Every value from the bus is shown as text
// (textContent), never parsed as HTML. Figures are bokeh's (BokehJS served by this server).
"use strict";

const Orchester = (() => {
  const $ = (sel) => document.querySelector(sel);
  const xsrf = () => document.body.dataset.xsrf;

  function el(tag, text, cls) {
    const e = document.createElement(tag);
    if (text !== undefined && text !== null) e.textContent = String(text);
    if (cls) e.className = cls;
    return e;
  }

  function link(href, text) {
    const a = el("a", text);
    a.href = href;
    return a;
  }

  function row(cells) {
    const tr = document.createElement("tr");
    for (const c of cells) {
      const td = document.createElement("td");
      if (c instanceof Node) td.appendChild(c); else td.textContent = c === null || c === undefined ? "" : String(c);
      tr.appendChild(td);
    }
    return tr;
  }

  function downloads(ul, base, names) {  // one download link per file
    for (const name of names) {
      const a = link(base + encodeURIComponent(name), name);
      a.setAttribute("download", name);
      const li = el("li");
      li.appendChild(a);
      ul.appendChild(li);
    }
  }

  // A table refreshed every second keeps the rows and cells that did not change: the link under the
  // pointer stays the same element, so a click (a press, then a release) is never lost to a refresh.
  function fill(tbody, rows) {
    rows.forEach((tr, i) => {
      const cur = tbody.rows[i];
      if (!cur || cur.cells.length !== tr.cells.length || cur.className !== tr.className) {
        if (cur) cur.replaceWith(tr); else tbody.appendChild(tr);
        return;
      }
      [...tr.cells].forEach((td, j) => { if (!cur.cells[j].isEqualNode(td)) cur.cells[j].replaceWith(td); });
    });
    while (tbody.rows.length > rows.length) tbody.deleteRow(-1);
  }

  function clock(t) {
    if (typeof t !== "number") return "";
    const d = new Date(t * 1000);
    return d.toLocaleString(undefined, {hour12: false});
  }

  function num(v, digits) {
    return typeof v === "number" && isFinite(v) ? Number(v.toPrecision(digits || 4)).toString() : "";
  }

  function showError(id, message) {
    const e = $(id);
    if (!e) return;
    e.textContent = message || "";
    e.hidden = !message;
  }

  async function api(path, options) {
    const r = await fetch(path, Object.assign({credentials: "same-origin"}, options || {}));
    let body = null;
    try { body = await r.json(); } catch (_) { body = null; }
    if (!r.ok) throw new Error((body && body.error) || `${r.status} ${r.statusText}`);
    return body;
  }

  // ---------------------------------------------------------------- figures
  async function embed(item, target) {
    const views = await Bokeh.embed.embed_item(item, target);
    return views;
  }

  function source(name) {
    for (const doc of Bokeh.documents) {
      const m = doc.get_model_by_name(name);
      if (m) return m;
    }
    return null;
  }

  // ---------------------------------------------------------------- live socket
  function live(topics, onBatch) {
    const badge = $("#live");
    let delay = 500;
    function connect() {
      const proto = location.protocol === "https:" ? "wss:" : "ws:";
      const ws = new WebSocket(`${proto}//${location.host}/ws?topics=${encodeURIComponent(topics.join(","))}`);
      ws.onopen = () => { delay = 500; if (badge) { badge.textContent = "● live"; badge.className = "live on"; } };
      ws.onmessage = (m) => { try { onBatch(JSON.parse(m.data)); } catch (e) { console.error(e); } };
      ws.onclose = () => {
        if (badge) { badge.textContent = "○ reconnecting"; badge.className = "live off"; }
        setTimeout(connect, delay);
        delay = Math.min(delay * 2, 10000);
      };
    }
    connect();
  }

  function every(seconds, fn) {
    let busy = false;
    const tick = async () => {
      if (busy || document.hidden) return;
      busy = true;
      try { await fn(); } finally { busy = false; }
    };
    tick();
    return setInterval(tick, seconds * 1000);
  }

  // ---------------------------------------------------------------- overview
  async function overview() {
    await embed(await api("/api/figures/overview"), "fig-overview");
    const events = $("#events tbody");
    live(["sat:", "ha:", "control:"], (batch) => {
      const rows = [];
      for (const ev of batch.events.slice(-50)) {
        const d = ev.data || {};
        const what = ["state", "reason", "sat", "attempt"].filter((k) => d[k] !== undefined && d[k] !== null)
          .map((k) => `${k}=${d[k]}`).join("  ");
        rows.push(row([clock(ev.t), ev.topic, what]));
      }
      if (batch.dropped) rows.push(row(["", `(${batch.dropped} more events not shown)`, ""]));
      for (const r of rows.reverse()) events.prepend(r);
      while (events.rows.length > 100) events.deleteRow(-1);
    });
    every(1, async () => {
      let o;
      try { o = await api("/api/status"); } catch (e) { showError("#status-error", e.message); return; }
      showError("#status-error", o.status_error ? `orchestrator: ${o.status_error}` : "");
      const st = o.status || {};
      const ha = st.ha && st.ha.state ? `${st.ha.state}` : "single";
      $("#c-ha").textContent = ha;
      $("#c-epoch").textContent = `epoch ${st.epoch || "?"} · up ${Math.round(st.uptime || 0)} s`;
      const sats = (st.satellites || []);
      const fleet = st.fleet || {};
      $("#c-sats").textContent = String(fleet.satellites ?? sats.length);
      const lightBusy = fleet.light_inflight || 0;
      $("#c-slots").textContent = `${(fleet.inflight ?? 0) - lightBusy} of ${fleet.workers ?? 0} slots busy`
        + (lightBusy ? ` · ${lightBusy} light` : "");
      fleetSummary(fleet, sats.length);
      const tasks = st.tasks || {};
      $("#c-tasks").textContent = String(Object.values(tasks).reduce((a, b) => a + b, 0));
      $("#c-states").textContent = Object.entries(tasks).map(([k, v]) => `${k} ${v}`).join(" · ");
      const series = o.series || [];
      $("#c-rate").textContent = series.length ? num(series[series.length - 1].done_per_s, 3) : "…";
      const t = series.map((p) => p.t * 1000);
      const tp = source("throughput");
      if (tp) tp.data = {t, done_per_s: series.map((p) => p.done_per_s)};
      const lat = source("latency");
      const ms = (v) => (v === null || v === undefined ? NaN : v * 1000);
      if (lat) lat.data = {t, p50: series.map((p) => ms(p.latency_p50)), p95: series.map((p) => ms(p.latency_p95))};
      const fl = source("fleet");
      if (fl) fl.data = {t, satellites: series.map((p) => p.satellites), slots: series.map((p) => p.slots),
                         busy: series.map((p) => p.busy), queued: series.map((p) => p.queued)};
      const mk = source("marks");
      if (mk) mk.data = {t: o.marks.map((m) => m.t * 1000), what: o.marks.map((m) => m.what)};
      fill($("#queues tbody"), Object.entries(st.queued || {}).map(([k, v]) => row([k, v])));
      fill($("#satellites tbody"), sats.map((s) => {
        const r = s.reported || {};
        const now = Array.isArray(s.running) && s.running.length
          ? el("span") : (s.inflight || 0);
        if (now instanceof Node) for (const tid of s.running) { now.append(link(`/tasks/${encodeURIComponent(tid)}`, tid.slice(0, 8)), " "); }
        const light = s.light_inflight || 0;
        return row([s.id, s.state, s.host, `${(s.inflight || 0) - light}/${s.workers || 0}` + (light ? ` +${light}` : ""), now,
                    `${num(s.heartbeat_age, 2)} s`, num(r.cpu_percent, 3), num(r.rss_mb, 4),
                    s.walltime_left === null || s.walltime_left === undefined ? "" : `${Math.round(s.walltime_left)} s`,
                    s.done, s.failed, s.job || "", (s.kinds || []).join(" ")]);
      }));
      batchJobs(st.jobs || []);
    });
  }

  // past the satellites listed one by one (a status lists 100): the whole fleet, summed up
  function fleetSummary(fleet, listed) {
    const total = fleet.satellites || 0;
    $("#fleet").hidden = total <= listed;
    if (total <= listed) return;
    $("#fleet-listed").textContent = `${listed} of ${total} satellites are listed below, by id; ` +
      `the fleet as a whole: ${fleet.hosts || 0} hosts, ${fleet.jobs || 0} batch jobs, ` +
      `cores ${fleet.cores_used || 0} of ${fleet.cores || 0} used.`;
    fill($("#fleet-states tbody"), Object.entries(fleet.states || {}).sort((a, b) => b[1] - a[1])
      .map(([k, v]) => row([el("span", k, `state ${k}`), v])));
    fill($("#fleet-hosts tbody"), Object.entries(fleet.busiest_hosts || {}).sort((a, b) => b[1] - a[1])
      .map(([k, v]) => row([k || "?", v])));
    fill($("#fleet-kinds tbody"), Object.entries(fleet.kinds || {}).sort((a, b) => b[1] - a[1])
      .map(([k, v]) => row([k, v, ((fleet.versions || {})[k] || []).join(" ")])));
  }

  // the autoscalers' batch jobs (orchester autoscale reports them): shown only when one reports
  function batchJobs(reports) {
    $("#batch").hidden = reports.length === 0;
    if (!reports.length) return;
    const count = (r, state) => (r.jobs || []).filter((j) => j.state === state).length;
    $("#batch-summary").textContent = reports.map((r) =>
      `${r.tag} (${r.scheduler}, ${r.min} to ${r.max} jobs): ${count(r, "pending")} pending · ` +
      `${count(r, "running")} running · ${count(r, "ending")} ending`).join("  —  ");
    const errors = reports.filter((r) => r.error).map((r) => `${r.tag}: ${r.error}`);
    showError("#batch-error", errors.join("; "));
    const rows = [];
    for (const r of reports) {
      for (const j of (r.jobs || []).slice(0, 500)) {
        rows.push(row([r.tag, j.id, el("span", j.state, `state job-${j.state}`), `${Math.round(j.age || 0)} s ago`,
                       (j.satellites || []).join(" ")]));
      }
    }
    fill($("#jobs tbody"), rows);
  }

  // ---------------------------------------------------------------- tasks
  function tasks() {
    const form = $("#filters");
    const stack = [];  // the "until" of each page shown before this one
    let until = null;
    let nextUntil = null;
    function query(extra) {
      const p = new URLSearchParams();
      for (const [k, v] of new FormData(form)) {
        if (!v) continue;
        p.set(k, (k === "since" || k === "until") ? String(new Date(v).getTime() / 1000) : v);
      }
      if (until !== null) p.set("until", String(until));
      for (const [k, v] of Object.entries(extra || {})) p.set(k, v);
      return p;
    }
    async function load() {
      const p = query();
      $("#csv").href = `/api/tasks?${query({format: "csv"})}`;
      let body;
      try { body = await api(`/api/tasks?${p}`); } catch (e) { showError("#tasks-error", e.message); return; }
      showError("#tasks-error", "");
      fill($("#tasks tbody"), body.rows.map((r) => row([
        clock(r.submitted), link(`/tasks/${encodeURIComponent(r.id)}`, r.id.slice(0, 12)), r.kind,
        el("span", r.state, `state ${r.state}`), r.attempts, r.satellite, r.owner, clock(r.finished), r.error])));
      nextUntil = body.next_until;
      $("#older").disabled = nextUntil === null;
      $("#newer").disabled = stack.length === 0;
      $("#page-info").textContent = `page ${stack.length + 1} · ${body.rows.length} rows`;
    }
    form.addEventListener("submit", (e) => { e.preventDefault(); stack.length = 0; until = null; load(); });
    $("#older").addEventListener("click", () => { stack.push(until); until = nextUntil; load(); });
    $("#newer").addEventListener("click", () => { until = stack.pop(); if (until === undefined) until = null; load(); });
    load();
  }

  async function task(id) {
    let t;
    try { t = await api(`/api/tasks/${encodeURIComponent(id)}`); } catch (e) { showError("#task-error", e.message); return; }
    const facts = $("#facts");
    for (const k of ["kind", "state", "attempt", "crashes", "satellite", "priority", "tags", "cores", "owner", "result_retained"]) {
      facts.append(el("dt", k), el("dd", Array.isArray(t[k]) ? t[k].join(", ") : t[k]));
    }
    fill($("#timeline tbody"), (t.history || []).map((h) => row([clock(h.t), el("span", h.state, `state ${h.state}`),
                                                             h.attempt, h.sat, h.reason])));
    if (t.source === "history") {  // no longer in the orchestrator's memory: from the journal
      facts.append(el("dt", "submitted"), el("dd", clock(t.submitted)), el("dt", "finished"), el("dd", clock(t.finished)),
                   el("dt", "error"), el("dd", t.error_type), el("dt", "from"), el("dd", "the journal"));
      if (!(t.history || []).length) {
        $("#timeline tbody").append(row(["", "", "", "", "the journal holds no transitions of this task"]));
      }
    }
    if (t.error) {
      $("#failure").hidden = false;
      const e = t.error;
      $("#traceback").textContent = typeof e === "object" ? `${e.type || ""}: ${e.msg || ""}\n\n${e.tb || ""}` : String(e);
    }
    if (t.state === "done" && t.result_retained) {
      $("#result").hidden = false;
      $("#result-link").href = `/api/tasks/${encodeURIComponent(id)}/result`;
    }
    neighbourhood(t);
  }

  // a task's neighbourhood: what it waits for (left), itself, the tasks that wait for it (right)
  const SHOWN = 12;
  function neighbourhood(t) {
    const after = Array.isArray(t.after) ? t.after : [], deps = Array.isArray(t.dependents) ? t.dependents : [];
    if (!after.length && !deps.length) return;
    $("#neighbourhood").hidden = false;
    const near = t.neighbours || {};
    const left = after.slice(0, SHOWN), right = deps.slice(0, SHOWN);
    const rows = Math.max(left.length + (after.length > SHOWN), right.length + (deps.length > SHOWN), 1);
    const W = 760, bw = 200, bh = 30, gap = 38, H = rows * gap + 20;
    const ns = "http://www.w3.org/2000/svg";
    const svg = document.createElementNS(ns, "svg");
    svg.setAttribute("viewBox", `0 0 ${W} ${H}`);
    svg.setAttribute("width", String(W));
    svg.setAttribute("role", "img");
    svg.setAttribute("aria-label", `task ${t.id}: ${after.length} dependencies, ${deps.length} dependents`);
    const mid = H / 2;
    const ys = (n) => Array.from({length: n}, (_, i) => H / 2 + (i - (n - 1) / 2) * gap);
    function node(x, y, tid, kind, state, current) {
      const g = document.createElementNS(ns, "a");
      if (!current) g.setAttribute("href", `/tasks/${encodeURIComponent(tid)}`);
      const r = document.createElementNS(ns, "rect");
      for (const [k, v] of [["x", x], ["y", y - bh / 2], ["width", bw], ["height", bh], ["rx", 6]]) r.setAttribute(k, String(v));
      r.setAttribute("class", `node ${current ? "current" : ""} s-${state || "unknown"}`);
      const label = document.createElementNS(ns, "text");
      label.setAttribute("x", String(x + 8));
      label.setAttribute("y", String(y + 5));
      label.textContent = `${tid.slice(0, 8)} ${kind || ""} · ${state || "?"}`;
      const title = document.createElementNS(ns, "title");
      title.textContent = `${tid} (${kind || "?"}): ${state || "?"}`;
      g.append(r, label, title);
      return g;
    }
    function edge(x1, y1, x2, y2) {
      const p = document.createElementNS(ns, "path");
      const cx = (x1 + x2) / 2;
      p.setAttribute("d", `M${x1},${y1} C${cx},${y1} ${cx},${y2} ${x2},${y2}`);
      p.setAttribute("class", "edge");
      return p;
    }
    function more(x, y, n) {
      const m = document.createElementNS(ns, "text");
      m.setAttribute("x", String(x + 8));
      m.setAttribute("y", String(y + 5));
      m.setAttribute("class", "more");
      m.textContent = `+ ${n} more (show --json lists them all)`;
      return m;
    }
    const lx = 10, cx = (W - bw) / 2, rx = W - bw - 10;
    const ly = ys(left.length + (after.length > SHOWN)), ry = ys(right.length + (deps.length > SHOWN));
    left.forEach((tid, i) => svg.append(edge(lx + bw, ly[i], cx, mid)));
    right.forEach((tid, i) => svg.append(edge(cx + bw, mid, rx, ry[i])));
    left.forEach((tid, i) => { const [k, s] = near[tid] || ["", ""]; svg.append(node(lx, ly[i], tid, k, s, false)); });
    right.forEach((tid, i) => { const [k, s] = near[tid] || ["", ""]; svg.append(node(rx, ry[i], tid, k, s, false)); });
    if (after.length > SHOWN) svg.append(more(lx, ly[ly.length - 1], after.length - SHOWN));
    if (deps.length > SHOWN) svg.append(more(rx, ry[ry.length - 1], deps.length - SHOWN));
    svg.append(node(cx, mid, t.id || "", t.kind, t.state, true));
    $("#graph").replaceChildren(svg);
    $("#neighbourhood-note").textContent = `waits for ${after.length} task(s)` +
      (t.on_failure === "run" ? " (runs even if one fails)" : "") + ` · ${deps.length} task(s) wait for it`;
  }

  // ---------------------------------------------------------------- fits
  function fitRow(f) {
    const gens = f.generations ? `${f.generation} / ${f.generations}` : f.generation;
    return row([link(`/fits/${f.id}`, f.name), el("span", f.state, `state ${f.state}`), gens, num(f.fom, 5),
                clock(f.submitted), f.error || ""]);
  }

  function fits() {
    const form = $("#fit-form");
    const input = $("#model");
    const drop = $("#drop");
    let chosen = [];
    async function show() {
      $("#chosen").textContent = chosen.length ? chosen.map((f) => f.name).join(", ") : "no model chosen";
      const defaults = $("#defaults");
      defaults.textContent = "";
      for (const input of form.querySelectorAll("fieldset input, fieldset select")) {
        if (input.name !== "seed") input.placeholder = "from file";
      }
      if (!chosen.length) return;
      const data = new FormData();
      data.append("model", chosen[0], chosen[0].name);
      try {  // the settings stored in the (first) model: shown as the defaults
        const m = await api("/api/models", {method: "POST", body: data, headers: {"X-XSRFToken": xsrf()}});
        for (const [k, v] of Object.entries(m.defaults || {})) {
          const input = form.querySelector(`[name=${k}]`);
          if (input && input.tagName === "INPUT") input.placeholder = String(v);
        }
        const genxDefault = new Set(m.fallbacks || []);  // not stored in the file: GenX's default profile
        const listed = (own) => Object.entries(m.defaults || {}).filter(([k]) => genxDefault.has(k) !== own)
          .map(([k, v]) => `${k}=${v}`).join(" ");
        defaults.textContent = `${chosen[0].name}: ${m.dataset_count} data set(s), ${m.fit_parameter_count} fitted ` +
          `parameter(s)` + (listed(true) ? `; stored settings ${listed(true)}` : "") +
          (listed(false) ? `; GenX defaults ${listed(false)}` : "");
        showError("#fit-error", "");
      } catch (err) {
        showError("#fit-error", err.message);
      }
    }
    input.addEventListener("change", () => { chosen = Array.from(input.files); show(); });
    const dataInput = $("#data");
    dataInput.addEventListener("change", () => {
      const n = dataInput.files.length;
      $("#data-chosen").textContent = n ? `${n} data file(s): one fit each` : "";
    });
    for (const ev of ["dragenter", "dragover"]) drop.addEventListener(ev, (e) => { e.preventDefault(); drop.classList.add("over"); });
    for (const ev of ["dragleave", "drop"]) drop.addEventListener(ev, () => drop.classList.remove("over"));
    drop.addEventListener("drop", (e) => { e.preventDefault(); chosen = Array.from(e.dataTransfer.files); show(); });
    form.addEventListener("submit", async (e) => {
      e.preventDefault();
      if (!chosen.length) { showError("#fit-error", "choose or drop one or more .hgx model files first"); return; }
      const series = dataInput.files.length > 0;
      if (series && chosen.length !== 1) { showError("#fit-error", "a series fits one model: choose one .hgx file"); return; }
      const data = new FormData();
      for (const f of chosen) data.append("model", f, f.name);
      for (const f of series ? dataInput.files : []) data.append("data", f, f.name);
      for (const [k, v] of new FormData(form)) if (k !== "model" && k !== "data" && v !== "") data.append(k, v);
      $("#fit-button").disabled = true;
      $("#fit-message").textContent = "uploading and checking…";
      if (series) {
        try {
          const body = await api("/api/series", {method: "POST", body: data, headers: {"X-XSRFToken": xsrf()}});
          location.href = `/series/${body.id}`;
        } catch (err) {
          showError("#fit-error", err.message);
          $("#fit-message").textContent = "";
        } finally {
          $("#fit-button").disabled = false;
        }
        return;
      }
      try {
        const body = await api("/api/fits", {method: "POST", body: data, headers: {"X-XSRFToken": xsrf()}});
        showError("#fit-error", body.fits.filter((f) => f.error).map((f) => `${f.file}: ${f.error}`).join("; "));
        $("#fit-message").textContent = `${body.fits.filter((f) => f.id).length} fit(s) submitted`;
        chosen = []; input.value = ""; show();
        refresh();
      } catch (err) {
        showError("#fit-error", err.message);
        $("#fit-message").textContent = "";
      } finally {
        $("#fit-button").disabled = false;
      }
    });
    async function refresh() {
      const body = await api("/api/fits");
      fill($("#fits tbody"), body.fits.map(fitRow));
      const list = await api("/api/series");
      fill($("#series-list tbody"), list.series.map((s) => row([link(`/series/${s.id}`, s.name),
        el("span", s.state, `state ${s.state}`), s.datasets, s.counts.done, s.counts.failed, s.chain ? "yes" : "no",
        clock(s.submitted)])));
    }
    every(1, refresh);
  }

  async function series(id) {
    let shownFiles = false, head = "";
    try { await embed(await api(`/api/series/${id}/figure`), "fig-series"); } catch (e) { showError("#series-error", e.message); }
    const timer = every(1, async () => {
      let s;
      try { s = await api(`/api/series/${id}`); } catch (e) { showError("#series-error", e.message); return; }
      showError("#series-error", "");
      $("#series-name").textContent = s.name;
      const st = $("#series-state");
      st.textContent = s.state;
      st.className = `state ${s.state}`;
      const c = s.counts;
      const facts = $("#facts");
      facts.replaceChildren();
      const pairs = [["model", s.file], ["data sets", s.rows.length],
        ["progress", `${c.done} done, ${c.failed} failed, ${c.running} running, ${c.queued + c.waiting} waiting`],
        ["chained", s.chain ? (s.adjust_bounds ? "yes, bounds centred on the previous values" : "yes") : "no: all at once"],
        ["settings", Object.entries(s.settings || {}).map(([k, v]) => `${k}=${v}`).join("  ") || "the model file's"]];
      for (const [k, v] of pairs) facts.append(el("dt", k), el("dd", v));
      const columns = ["sequence", "data file", "state", s.fom_name || "figure of merit", "satellite", ...s.parameters, "error"];
      if (head !== columns.join("\n")) {  // the sequence, the file, the fit, then each fitted parameter
        head = columns.join("\n");
        $("#rows thead tr").replaceChildren(...columns.map((h) => el("th", h)));
      }
      const err = (p) => !p.error ? "" : (p.error[0] === 0 && p.error[1] === 0) ? " (±0)"
        : ` (−${num(Math.abs(p.error[0]), 2)} / +${num(p.error[1], 2)})`;
      fill($("#rows tbody"), s.rows.map((r) => {
        const byName = Object.fromEntries(r.parameters.map((p) => [p.name, p]));
        const state = r.fit ? link(`/fits/${r.fit}`, r.state) : el("span", r.state);
        state.className = `state ${r.state}`;
        return row([num(r.sequence, 6), r.file, state, num(r.fom, 5), r.satellite,
          ...s.parameters.map((n) => byName[n] ? `${num(byName[n].value, 5)}${err(byName[n])}` : ""), r.error]);
      }));
      s.parameters.forEach((n, k) => {  // the figure's panel k: the fits done so far
        const src = source(`series-${k}`);
        if (!src) return;
        const pts = s.rows.flatMap((r) => r.parameters.filter((p) => p.name === n).map((p) => [r.sequence, p]));
        src.data = {sequence: pts.map(([x]) => x), value: pts.map(([, p]) => p.value),
          lower: pts.map(([, p]) => p.value - (p.error ? Math.abs(Math.min(p.error[0], 0)) : 0)),
          upper: pts.map(([, p]) => p.value + (p.error ? Math.abs(Math.max(p.error[1], 0)) : 0))};
      });
      if (s.state === "done" && !shownFiles) {
        shownFiles = true;
        $("#downloads").hidden = false;
        downloads($("#files"), `/api/series/${id}/files/`, s.files);
        clearInterval(timer);
      }
    });
  }

  async function fit(id) {
    const fomFig = await api("/api/figures/fom");
    await embed(fomFig, "fig-fom");
    let shown = false;
    live([`progress:${id}`], (batch) => {  // each generation as it comes; the page's poll brings the rest
      const src = source("fom");
      if (!src || shown) return;
      const g = src.data.generation.slice(), f = src.data.fom.slice();
      for (const ev of batch.events) {
        const d = ev.data || {};
        if (typeof d.generation === "number" && typeof d.fom === "number" && isFinite(d.fom)) { g.push(d.generation); f.push(d.fom); }
      }
      src.data = {generation: g, fom: f};
    });
    const timer = every(1, async () => {
      let f;
      try { f = await api(`/api/fits/${id}`); } catch (e) { showError("#fit-error", e.message); return; }
      $("#fit-name").textContent = f.name;
      const st = $("#fit-state");
      st.textContent = f.state;
      st.className = `state ${f.state}`;
      const facts = $("#facts");
      facts.replaceChildren();
      const s = f.settings || {};
      const pairs = [["file", f.file], ["generation", f.generations ? `${f.generation} / ${f.generations}` : f.generation],
        [f.fom_name || "figure of merit", num(f.fom, 6)], ["satellite", f.satellite], ["seconds", num(f.seconds, 4)],
        ["settings", Object.entries(s).map(([k, v]) => `${k}=${v}`).join("  ")]];
      for (const [k, v] of pairs) facts.append(el("dt", k), el("dd", v));
      showError("#fit-error", f.error);
      const src = source("fom");
      if (src) src.data = {generation: f.fom_history.map((p) => p[0]), fom: f.fom_history.map((p) => p[1])};
      if (f.state === "done" && !shown) {
        shown = true;
        $("#result").hidden = false;
        await embed(await api(`/api/fits/${id}/figure`), "fig-result");
        fill($("#parameters tbody"), f.parameters.map((p) => row([p.name, num(p.value, 6), num(p.min, 4), num(p.max, 4),
          p.error ? num(p.error[0], 3) : "", p.error ? num(p.error[1], 3) : ""])));
        downloads($("#files"), `/api/fits/${id}/files/`, f.files);
      }
      if (f.state === "done" || f.state === "failed") clearInterval(timer);
    });
  }

  // ---------------------------------------------------------------- history
  async function history() {
    const form = $("#range");
    form.addEventListener("submit", (e) => { e.preventDefault(); load(); });  // before anything is awaited
    function query(extra) {
      const p = new URLSearchParams();
      for (const [k, v] of new FormData(form)) {
        if (!v) continue;
        p.set(k, (k === "since" || k === "until") ? String(new Date(v).getTime() / 1000) : v);
      }
      for (const [k, v] of Object.entries(extra || {})) p.set(k, v);
      return p;
    }
    async function load() {
      $("#csv").href = `/api/history?${query({format: "csv"})}`;
      let h;
      try { h = await api(`/api/history?${query()}`); } catch (e) { showError("#history-error", e.message); return; }
      showError("#history-error", "");
      const b = h.buckets;
      const total = b.reduce((a, x) => a + x.done + x.failed, 0);
      $("#history-info").textContent = `${clock(h.since)} to ${clock(h.until)} · one point per ${h.step / 60} min · ` +
        `${total} tasks ended`;
      const src = source("history");
      if (src) src.data = {t: b.map((x) => (x.t + h.step / 2) * 1000), w: b.map(() => h.step * 1000 * 0.85), done: b.map((x) => x.done), failed: b.map((x) => x.failed),
        utilisation: b.map((x) => x.utilisation === null ? NaN : 100 * x.utilisation),
        available: b.map((x) => x.satellites_available === null ? NaN : x.satellites_available),
        active: b.map((x) => x.satellites)};
    }
    await embed(await api("/api/figures/history"), "fig-history");
    load();
  }

  return {overview, tasks, task, fits, fit, series, history};
})();
