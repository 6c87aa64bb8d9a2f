// Live dashboard of a federation: reads GET /api/v1/status every few seconds and draws it with Chart.js
// (shipped in static/vendor, no network access needed). The monitor token comes from the URL fragment
// (#token=...), from this tab's sessionStorage, or from the form shown after a 401.
"use strict";

const REFRESH_MS = 2000;
const MAX_BACKOFF_MS = 30000;
const STATUS_URL = "api/v1/status";
let token = null;
let failures = 0;
let unreachableSince = null;
const timeline = { labels: [], online: [], training: [], offline: [] };
const started = Date.now();

function readToken() {
  const match = /(?:^|[#&])token=([^&]+)/.exec(window.location.hash);
  if (match) {
    sessionStorage.setItem("fl-token", decodeURIComponent(match[1]));
    history.replaceState(null, "", window.location.pathname + window.location.search);  // keep it out of history
  }
  return sessionStorage.getItem("fl-token");
}

function makeChart(id, config) {
  return new Chart(document.getElementById(id), {
    ...config,
    options: { animation: false, responsive: true, maintainAspectRatio: false,
               interaction: { mode: "index", intersect: false }, ...config.options },
  });
}

const charts = {
  accuracy: makeChart("chart-accuracy", {
    type: "line",
    data: { labels: [], datasets: [] },  // one line per metric the task reports (setMetrics)
    options: { scales: { y: { position: "left", title: { display: true, text: "accuracy" } },
                         y1: { position: "right", grid: { drawOnChartArea: false }, title: { display: true, text: "loss" } } } },
  }),
  duration: makeChart("chart-duration", {
    type: "bar",
    data: { labels: [], datasets: [
      { label: "training (slowest worker)", data: [], backgroundColor: "#43a047" },
      { label: "communication, waiting, aggregation (the last round: evaluation)", data: [], backgroundColor: "#9e9e9e" }] },
    options: { scales: { x: { stacked: true }, y: { stacked: true, title: { display: true, text: "seconds" } } } },
  }),
  updates: makeChart("chart-updates", {
    type: "bar",
    data: { labels: [], datasets: [
      { label: "updates", data: [], backgroundColor: "#7e57c2", yAxisID: "y" },
      { label: "samples", data: [], type: "line", borderColor: "#fb8c00", yAxisID: "y1" }] },
    options: { scales: { y: { position: "left", beginAtZero: true, title: { display: true, text: "updates" } },
                         y1: { position: "right", beginAtZero: true, grid: { drawOnChartArea: false },
                               title: { display: true, text: "samples" } } } },
  }),
  nodes: makeChart("chart-nodes", {
    type: "line",
    data: { labels: timeline.labels, datasets: [
      { label: "online", data: timeline.online, borderColor: "#2e7d32", backgroundColor: "#2e7d3255", fill: true, stepped: true },
      { label: "training", data: timeline.training, borderColor: "#0277bd", backgroundColor: "#0277bd55", fill: true, stepped: true },
      { label: "offline", data: timeline.offline, borderColor: "#c62828", backgroundColor: "#c6282855", fill: true, stepped: true }] },
    options: { scales: { y: { stacked: true, beginAtZero: true, ticks: { precision: 0 } },
                         x: { title: { display: true, text: "seconds" } } } },
  }),
};

function text(id, value) { document.getElementById(id).textContent = value; }
function fmt(value, digits) { return value === null || value === undefined ? "-" : Number(value).toFixed(digits); }
function ago(seconds) {
  if (seconds < 60) return `${Math.round(seconds)}s ago`;
  if (seconds < 3600) return `${Math.round(seconds / 60)}m ago`;
  return `${(seconds / 3600).toFixed(1)}h ago`;
}

// The metrics of one round, by name: the coordinator's evaluation, then the workers' as "federated <name>"
// (records of earlier versions have only test_accuracy and test_loss).
function roundMetrics(r) {
  const metrics = { ...(r.test_metrics || {}) };
  if (!("accuracy" in metrics) && r.test_accuracy !== null && r.test_accuracy !== undefined) metrics.accuracy = r.test_accuracy;
  if (!("loss" in metrics) && r.test_loss !== null && r.test_loss !== undefined) metrics.loss = r.test_loss;
  for (const [name, value] of Object.entries(r.federated_metrics || {})) metrics[`federated ${name}`] = value;
  return metrics;
}

function metricNames(history) {
  const names = [];
  for (const r of history) for (const name of Object.keys(roundMetrics(r))) if (!names.includes(name)) names.push(name);
  const first = ["accuracy", "loss"].filter((n) => names.includes(n));
  return first.concat(names.filter((n) => !first.includes(n)));
}

const isLoss = (name) => ["loss", "mae", "mse", "error"].some((word) => name.toLowerCase().includes(word));
const PALETTE = ["#1565c0", "#c62828", "#2e7d32", "#6a1b9a", "#ef6c00", "#4e342e", "#ad1457", "#827717", "#00838f"];

function setMetrics(chart, rounds, history) {
  const names = metricNames(history);
  chart.data.labels = rounds;
  chart.data.datasets = names.map((name, i) => ({
    label: name, borderColor: PALETTE[i % PALETTE.length], yAxisID: isLoss(name) ? "y1" : "y",
    borderDash: name.startsWith("federated ") ? [5, 4] : [],
    data: history.map((r) => { const v = roundMetrics(r)[name]; return v === undefined ? null : v; }) }));
  chart.options.scales.y.title.text = names.filter((n) => !isLoss(n)).join(", ").slice(0, 60) || "metric";
  chart.options.scales.y1.title.text = names.filter(isLoss).join(", ").slice(0, 60) || "loss";
  chart.update();
}

function setSeries(chart, labels, series) {
  chart.data.labels = labels;
  series.forEach((values, i) => { chart.data.datasets[i].data = values; });
  chart.update();
}

// Nodes by status: the coordinator's counts (it lists only the featured nodes when there are many).
function nodeCounts(status) {
  if (status.node_counts) return status.node_counts;
  const count = (key) => status.nodes.filter((n) => n.status === key).length;
  return {total: status.nodes.length, online: count("online"), training: count("training"),
          offline: count("offline"), banned: count("banned")};
}

function render(status) {
  const history = status.history;
  const rounds = history.map((r) => r.round);
  const counts = nodeCounts(status);
  const up = counts.total - counts.offline - counts.banned;
  text("run-id", status.run_id);
  text("state", status.state);
  text("round", `${status.round} / ${status.total_rounds}`);
  text("nodes-up", `${up} of ${counts.total}`);
  const last = history.length ? roundMetrics(history[history.length - 1]) : {};
  const headline = "accuracy" in last ? "accuracy" : (Object.keys(last)[0] || "accuracy");
  text("last-metric-name", `last ${headline}`);
  text("last-accuracy", headline in last ? fmt(last[headline], 4) : "-");
  const privacy = status.privacy;  // DP-FedAvg: epsilon spent at delta (null: no differential privacy)
  document.getElementById("privacy-box").hidden = !privacy;
  if (privacy) {
    text("privacy", `ε ${fmt(privacy.epsilon, 2)} at δ ${privacy.delta}`
         + (privacy.epsilon_budget ? ` (budget ${privacy.epsilon_budget}, ${privacy.rounds_allowed} rounds)` : ""));
  }
  document.getElementById("rounds-bar").style.width = `${(100 * history.length) / status.total_rounds}%`;
  const current = status.current_round;
  const answers = status.state === "evaluating" ? "evaluations of the new model" : "updates";
  const expected = current ? (current.num_participants ?? current.participants.length) : 0;
  text("current-round", current ? `round ${current.round}: ${current.updates_received} of ${expected} ${answers}, `
       + `${Math.round(current.elapsed_s)} s of a ${Math.round(current.timeout_s)} s deadline`
       + (current.aggregation_error ? `; aggregation failed (${current.aggregation_error}), again in `
          + `${Math.round(current.aggregation_retry_in_s)} s` : "") : "");

  setMetrics(charts.accuracy, rounds, history);
  const training = history.map((r) => r.max_train_seconds || 0);
  setSeries(charts.duration, rounds, [training, history.map((r, i) => Math.max(0, r.duration_s - training[i]))]);
  setSeries(charts.updates, rounds, [history.map((r) => r.num_updates), history.map((r) => r.num_samples)]);

  timeline.labels.push(Math.round((Date.now() - started) / 1000));
  for (const key of ["online", "training", "offline"]) {
    timeline[key].push(counts[key]);
  }
  if (timeline.labels.length > 600) {
    for (const key of Object.keys(timeline)) timeline[key].shift();
  }
  charts.nodes.update();

  const featured = status.nodes_listed === "featured";
  document.getElementById("nodes-note").hidden = !featured;
  text("nodes-note", featured ? `${status.nodes.length} of ${counts.total} nodes: those the open round waits for, `
       + "then its others, then the latest lost (every node: GET /api/v1/nodes?offset=0&limit=500)" : "");
  const body = document.querySelector("#nodes tbody");
  body.replaceChildren(...status.nodes.map((n) => {
    const row = document.createElement("tr");
    const cells = [n.name, n.device, n.status, ago(n.last_seen_s_ago), String(n.rounds_contributed.length),
                   fmt(n.last_train_accuracy, 3), String(n.num_samples)];
    cells.forEach((value, i) => {
      const cell = document.createElement("td");
      cell.textContent = value;  // text only: names come from workers
      if (i === 2) cell.className = `status-${n.status}`;
      row.appendChild(cell);
    });
    return row;
  }));
}

function showBanner(message) {
  const banner = document.getElementById("banner");
  banner.textContent = message;
  banner.hidden = message === null;
}

async function refresh() {
  let delay = REFRESH_MS;
  try {
    const controller = new AbortController();
    const timer = setTimeout(() => controller.abort(), 10000);
    const headers = token ? { Authorization: `Bearer ${token}` } : {};
    const response = await fetch(STATUS_URL, { headers, signal: controller.signal, cache: "no-store" });
    clearTimeout(timer);
    if (response.status === 401) {
      document.getElementById("token-form").hidden = false;
      showBanner(token ? "The coordinator refused this token." : "Enter the coordinator's monitor token (the file TEMP_DIR/monitor_token).");
      return;  // wait for the form
    }
    if (!response.ok) throw new Error(`HTTP ${response.status}`);
    render(await response.json());
    failures = 0;
    unreachableSince = null;
    showBanner(null);
  } catch (error) {
    failures += 1;
    unreachableSince = unreachableSince || new Date();
    showBanner(`Coordinator unreachable since ${unreachableSince.toLocaleTimeString()} (${error.message}); retrying.`);
    delay = Math.min(MAX_BACKOFF_MS, REFRESH_MS * 2 ** Math.min(failures, 4));
  }
  setTimeout(refresh, delay);
}

document.getElementById("token-form").addEventListener("submit", (event) => {
  event.preventDefault();
  token = document.getElementById("token").value.trim();
  sessionStorage.setItem("fl-token", token);
  document.getElementById("token-form").hidden = true;
  showBanner(null);
  refresh();
});

token = readToken();
refresh();
