// Ferry's dashboard: reads the agent's API (/v1/overview every 2 s, checkpoints every
// 10 s) and draws it; actions ask for confirmation, then call the same API as the CLI.
"use strict";

const REFRESH_MS = 2000;
const CHECKPOINTS_MS = 10000;
const checkpointCache = {};  // group -> {at, list}

function esc(s) {
  return String(s).replace(/[&<>"']/g, c => ({"&": "&amp;", "<": "&lt;", ">": "&gt;",
    '"': "&quot;", "'": "&#39;"}[c]));
}

function human(n) {
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (Math.abs(n) >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return i === 0 ? `${Math.round(n)} B` : `${n.toFixed(1)} ${units[i]}`;
}

function duration(s) {
  s = Math.round(s);
  if (s < 60) return `${s} s`;
  if (s < 3600) return `${Math.floor(s / 60)} min ${s % 60} s`;
  return `${Math.floor(s / 3600)} h ${Math.floor(s % 3600 / 60)} min`;
}

async function api(method, path, body) {
  const resp = await fetch(path, {
    method, credentials: "same-origin",
    headers: {"content-type": "application/json", "x-ferry": "1"},
    body: body === undefined ? undefined : JSON.stringify(body)});
  const data = await resp.json().catch(() => ({}));
  if (!resp.ok) throw new Error(data.error || `HTTP ${resp.status}`);
  return data;
}

function toast(text) {
  let t = document.getElementById("toast");
  if (!t) { t = document.createElement("div"); t.id = "toast"; document.body.append(t); }
  t.textContent = text;
  clearTimeout(toast.timer);
  toast.timer = setTimeout(() => t.remove(), 6000);
}

function confirmAction(text, askTag) {
  const dialog = document.getElementById("confirm");
  document.getElementById("confirm-text").textContent = text;
  document.getElementById("confirm-extra").innerHTML = askTag
    ? '<label>Tag <input id="confirm-tag" placeholder="before upgrade"></label>' : "";
  return new Promise(resolve => {
    dialog.addEventListener("close", () => {
      const tag = askTag ? document.getElementById("confirm-tag").value : null;
      resolve(dialog.returnValue === "ok" ? {tag} : null);
    }, {once: true});
    dialog.showModal();
  });
}

// RPO over the last hour: one polyline in an inline SVG.
function rpoChart(group, points) {
  const w = 600, h = 110, pad = 24, now = Date.now() / 1000;
  const max = Math.max(1, ...points.map(p => p[1]));
  const x = t => pad + (w - 2 * pad) * (1 - (now - t) / 3600);
  const y = v => h - pad + 6 - (h - pad) * v / max;
  const line = points.map(p => `${x(p[0]).toFixed(1)},${y(p[1]).toFixed(1)}`).join(" ");
  return `<svg data-chart="${esc(group)}" viewBox="0 0 ${w} ${h}" role="img"
      aria-label="RPO of ${esc(group)} over the last hour">
    <line class="axis" x1="${pad}" y1="${h - pad + 6}" x2="${w - pad}" y2="${h - pad + 6}"/>
    <text x="${pad}" y="${h - 4}">-60 min</text><text x="${w / 2 - 12}" y="${h - 4}">-30 min</text>
    <text x="${w - pad - 18}" y="${h - 4}">now</text>
    <text x="2" y="12">${max.toFixed(1)} s</text><text x="2" y="${h - pad + 6}">0</text>
    ${points.length ? `<polyline class="line" points="${line}"/>` : ""}
  </svg>`;
}

// The journal's history window and its checkpoints on a timeline.
function timeline(group, r, cps) {
  const w = 600, h = 46, pad = 10, now = Date.now() / 1000;
  // The window when it is full; while it fills, the part covered (at least a minute).
  const window_ = Math.max(r.history_s || 1, 1);
  const span = Math.min(window_, Math.max(60, 1.2 * (r.history_covered_s || 0)));
  const x = t => pad + (w - 2 * pad) * (1 - Math.min(span, Math.max(0, now - t)) / span);
  const covered = Math.min(span, r.history_covered_s || 0);
  const ticks = (cps || []).map(c => {
    const t = c.wall_ns / 1e9, user = c.kind !== "auto";
    return `<line class="cp${user ? " user" : ""}" x1="${x(t).toFixed(1)}" y1="8" x2="${x(t).toFixed(1)}"
      y2="${user ? 34 : 26}"><title>${esc(c.id)} ${esc(c.tag || c.kind)} ${new Date(t * 1000).toISOString()}</title></line>`;
  }).join("");
  return `<svg data-timeline="${esc(group)}" viewBox="0 0 ${w} ${h}" role="img"
      aria-label="checkpoints of ${esc(group)}">
    <rect class="window" x="${x(now - covered).toFixed(1)}" y="6" width="${(x(now) - x(now - covered)).toFixed(1)}" height="30"/>
    ${ticks}
    <text x="${pad}" y="${h - 2}">-${duration(span)}${span < window_ ? ` (window ${duration(window_)})` : ""}</text><text x="${w - pad - 18}" y="${h - 2}">now</text>
  </svg>`;
}

function groupCard(name, g, ov) {
  const rates = ov.rates[name] || {disks: {}};
  const link = g.state !== "paused" && !g.error ? "up" : "down";
  const disks = Object.entries(g.disks).map(([d, s]) => `<tr>
      <td>${esc(d)}</td><td><span class="state ${esc(s.state)}">${esc(s.state)}</span></td>
      <td>${human(s.bytes_written)}</td><td>${human(rates.disks[d] || 0)}/s</td>
      <td>${human(s.bytes_queued)}</td><td>${human(s.dirty_bytes)}</td>
      <td>${s.delivered_progress == null ? "" : `${(100 * s.delivered_progress).toFixed(1)}%` +
        (s.delivered_eta_seconds == null ? "" : `, ETA ${duration(s.delivered_eta_seconds)}`)}</td></tr>`).join("");
  return `<div class="card" data-group="${esc(name)}">
    <div>
      <h3>${esc(name)} → ${esc(g.target)} <span class="state ${esc(g.state)}" data-state="${esc(name)}">${esc(g.state)}</span></h3>
      <div>RPO <span class="rpo" data-rpo="${esc(name)}">${g.rpo_seconds.toFixed(1)} s</span></div>
      <div>link <span class="state ${link}">${link}</span>
        · sent ${human(rates.sent_bps || 0)}/s
        ${rates.compression_ratio == null ? "" : `· compressed to ${(100 * rates.compression_ratio).toFixed(0)}%`}
        ${g.error ? `<div class="muted">${esc(g.error)}</div>` : ""}</div>
      <table><tr><th>disk</th><th>state</th><th>written</th><th>shipped</th><th>queued</th><th>dirty</th><th>sync</th></tr>${disks}</table>
      <div class="actions">
        <button data-action="checkpoint" data-group="${esc(name)}">Checkpoint…</button>
        ${g.state === "paused"
          ? `<button data-action="resume" data-group="${esc(name)}">Resume</button>`
          : `<button data-action="pause" data-group="${esc(name)}">Pause</button>`}
      </div>
    </div>
    <div><div class="muted">RPO, last hour</div>${rpoChart(name, ov.rpo_history[name] || [])}</div>
  </div>`;
}

function replicaCard(name, r) {
  if (r.error) {
    return `<div class="card"><div><h3>${esc(name)} <span class="state error">error</span></h3>
      <div>${esc(r.error)}</div></div></div>`;
  }
  const part = r.history_s ? Math.min(1, r.history_covered_s / r.history_s) : 0;
  const test = r.test;
  return `<div class="card" data-replica="${esc(name)}">
    <div>
      <h3>${esc(name)} ← ${esc((r.source || {}).peer || "source not connected")}
        <span class="state ${r.connected ? "up" : "down"}">${r.connected ? "connected" : "not connected"}</span></h3>
      <div>journal ${human(r.journal_bytes)} of ${human(r.journal_max || 0)},
        ${r.checkpoints || 0} checkpoints</div>
      <div>history ${duration(r.history_covered_s || 0)} of ${duration(r.history_s || 0)}
        ${r.history_short ? '<span class="state error">short: journal limit</span>' : ""}</div>
      <div class="bar"><div style="width:${(100 * part).toFixed(1)}%"></div></div>
      <div data-test="${esc(name)}">${test ? `test failover <b>${esc(test.id)}</b> running` : "no test failover"}
        ${r.failover ? '<span class="state error">FAILED OVER LIVE</span>' : ""}</div>
      <div class="actions">
        ${test ? `<button data-action="test-stop" data-group="${esc(name)}">Stop test failover</button>`
               : `<button data-action="test-start" data-group="${esc(name)}">Start test failover</button>`}
      </div>
    </div>
    <div><div class="muted">history window and checkpoints (user checkpoints taller)</div>
      ${timeline(name, r, (checkpointCache[name] || {}).list)}</div>
  </div>`;
}

async function refreshCheckpoints(names) {
  const now = Date.now();
  for (const name of names) {
    const c = checkpointCache[name];
    if (c && now - c.at < CHECKPOINTS_MS) continue;
    try {
      const data = await api("GET", `/v1/checkpoints/${encodeURIComponent(name)}`);
      checkpointCache[name] = {at: now, list: data.target || []};
    } catch (e) { checkpointCache[name] = {at: now, list: []}; }
  }
}

async function refresh() {
  let ov;
  try { ov = await api("GET", "/v1/overview"); } catch (e) {
    document.getElementById("updated").textContent = `cannot reach the agent: ${e.message}`;
    return;
  }
  const st = ov.status;
  document.getElementById("site").textContent = st.site;
  document.getElementById("security").textContent = st.security.mode === "insecure"
    ? "replication: PLAIN TCP (--insecure)" : `replication: TLS, ${st.security.fingerprint.slice(0, 23)}…`;
  document.getElementById("updated").textContent =
    `updated ${new Date().toLocaleTimeString()} · up ${duration(st.uptime_seconds)}`;
  const groups = Object.keys(st.groups).sort();
  document.getElementById("groups").innerHTML = groups.length
    ? groups.map(n => groupCard(n, st.groups[n], ov)).join("") : '<p class="muted">none</p>';
  const replicas = Object.keys(st.replicas).sort();
  await refreshCheckpoints(replicas.filter(n => !st.replicas[n].error));
  document.getElementById("replicas").innerHTML = replicas.length
    ? replicas.map(n => replicaCard(n, st.replicas[n])).join("") : '<p class="muted">none</p>';
  document.getElementById("alerts").innerHTML = ov.alerts.length
    ? ov.alerts.map(a => `<li class="${esc(a.severity)}">${esc(a.severity)} ${esc(a.alert)}:
        ${esc(a.message)}</li>`).join("") : '<li class="muted">none</li>';
  const pairs = ov.pairs;
  document.getElementById("pairs").innerHTML = `<div>this site ${esc(st.site)}:
      <code>${esc(pairs.fingerprint)}</code>${pairs.insecure ? " (--insecure)" : ""}</div>
    <table><tr><th>site</th><th>address</th><th>certificate</th></tr>${pairs.peers.map(p =>
      `<tr><td>${esc(p.site)}</td><td>${esc(p.address)}</td><td><code>${esc(p.fingerprint)}</code></td></tr>`).join("")
      || '<tr><td class="muted" colspan="3">no paired sites (ferry pair-token on one site, ferry pair on the other)</td></tr>'}</table>`;
  document.getElementById("events").innerHTML = ov.events.slice().reverse().map(e =>
    `<li class="${esc(e.severity)}">${new Date(e.time * 1000).toLocaleTimeString()} ${esc(e.kind)}
      ${esc(e.group || "")} ${esc(e.change || "")} ${esc(e.new || e.alert || e.tag || "")}</li>`).join("");
}

const ACTIONS = {
  "checkpoint": {ask: g => `Cut a crash-consistent checkpoint of ${g} now?`, tag: true,
    run: (g, c) => api("POST", `/v1/groups/${encodeURIComponent(g)}/checkpoints`,
                       {tag: c.tag || null, timeout: 30}),
    done: r => `checkpoint ${r.id} cut${r.acked ? " and journaled" : ""}`},
  "pause": {ask: g => `Pause shipping ${g}? Writes go on; the RPO grows until you resume.`,
    run: g => api("POST", `/v1/groups/${encodeURIComponent(g)}/pause`), done: () => "paused"},
  "resume": {ask: g => `Resume shipping ${g}?`,
    run: g => api("POST", `/v1/groups/${encodeURIComponent(g)}/resume`), done: () => "resumed"},
  "test-start": {ask: g => `Start a test failover of ${g} at its newest consistent point? ` +
      "Replication goes on; the test's writes are discarded when it stops.",
    run: g => api("POST", `/v1/replicas/${encodeURIComponent(g)}/failover`, {mode: "test"}),
    done: r => `test failover ${r.id} running`},
  "test-stop": {ask: g => `Stop the test failover of ${g}? Its writes are discarded.`,
    run: g => api("POST", `/v1/replicas/${encodeURIComponent(g)}/failover`, {mode: "stop-test"}),
    done: () => "test failover stopped"},
};

document.addEventListener("click", async ev => {
  const button = ev.target.closest("button[data-action]");
  if (!button) return;
  const action = ACTIONS[button.dataset.action], group = button.dataset.group;
  const confirmed = await confirmAction(action.ask(group), action.tag);
  if (!confirmed) return;
  try { toast(`${group}: ${action.done(await action.run(group, confirmed))}`); }
  catch (e) { toast(`${group}: ${e.message}`); }
  checkpointCache[group] = undefined;
  refresh();
});

refresh();
setInterval(refresh, REFRESH_MS);
