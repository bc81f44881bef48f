// A job's page: polls the job's status, metrics and checkpoints, draws them, and sends the
// Stop / Rescale / Restart actions (the server applies them through JobClient).
"use strict";

const JOB_ID = document.body.dataset.jobId;
const JOB_API = `/api/jobs/${encodeURIComponent(JOB_ID)}`;
const CHECKPOINT_POLL_MS = POLL_MS * 3; // the store changes once per checkpoint interval at most

const view = { graph: null, metrics: {} };

function redrawGraph() {
  if (!view.graph) return;
  drawGraph(document.getElementById("graph"), view.graph, view.metrics);
  fillRows(document.querySelector("#operators tbody"), view.graph.operators.map((op) => {
    const m = view.metrics[op.id] || {};
    return el("tr", { "data-op": op.id },
      el("td", { class: "op-id" }, op.id),
      el("td", {}, op.type),
      el("td", { class: "parallelism" }, op.parallelism ?? "?"),
      el("td", { class: "records-in-per-s num" }, fmtRate(m.records_in_per_s)),
      el("td", { class: "records-out-per-s num" }, fmtRate(m.records_out_per_s)),
      el("td", { class: "records-in num" }, fmtCount(m.records_in)),
      el("td", { class: "records-out num" }, fmtCount(m.records_out)),
      el("td", { class: "backpressure num" }, fmtPercent(m.backpressure)),
      el("td", { class: "watermark-lag num" }, fmtSeconds(m.watermark_lag_s)));
  }));
}

function showFailure(status) {
  const failure = status.failure || status.last_error;
  const panel = document.getElementById("failure-panel");
  panel.hidden = !failure;
  if (!failure) return;
  document.getElementById("failure-title").textContent = status.failure ? "Failure" : "Last error (recovered from)";
  const where = failure.operator ? ` in operator ${failure.operator}` : "";
  document.getElementById("failure-message").textContent = `${failure.domain} error${where}: ${failure.message}`;
  const tb = document.getElementById("failure-traceback");
  tb.textContent = failure.traceback || "";
  tb.hidden = !failure.traceback;
}

function showUpgrade(status) {
  // The newest pipeline upgrade (docs/upgrades.md): its phase, and why it ended as it did.
  const up = status.upgrade;
  document.getElementById("upgrade-panel").hidden = !up;
  if (!up) return;
  const phase = up.phase.replace(/_/g, " ");
  const reason = up.reason ? `: ${up.reason}` : "";
  const held = up.phase === "health_window" ? ` (${up.deferred_epochs.length} checkpoints held back)` : "";
  document.getElementById("upgrade-line").textContent =
    `upgrade ${up.number} (${up.mode}, version ${up.from_version} → ${up.to_version}): ${phase}${held}${reason}`;
}

function showStatus(data) {
  const status = data.status;
  showUpgrade(status);
  const state = document.getElementById("state");
  state.textContent = status.state;
  state.className = `state state-${status.state}`;
  const waiting = status.waiting_for ? ` · waiting: ${status.waiting_for}` : "";
  document.getElementById("summary").textContent =
    `${status.pipeline_name} · generation ${status.generation} · epoch ${status.epoch} · restarts ${status.restarts}${waiting}`;
  const link = document.getElementById("web-ui");
  link.href = data.web_ui;
  link.hidden = false;

  const select = document.getElementById("stop-mode");
  if (select.options.length === 0) {
    select.replaceChildren(...data.stop_modes.map((mode) => el("option", { value: mode }, mode)));
  }
  const parallelism = document.getElementById("rescale-parallelism");
  if (!parallelism.value && document.activeElement !== parallelism) {
    const ops = data.graph.operators.map((op) => op.parallelism || 1);
    parallelism.value = status.config.parallelism || Math.max(1, ...ops);
  }

  fillRows(document.querySelector("#transitions tbody"), [...status.transitions].reverse().map((t) =>
    el("tr", { "data-to": t.to_state },
      el("td", { class: "nowrap" }, fmtTime(t.time)),
      el("td", {}, t.from_state),
      el("td", { class: "to-state" }, t.to_state),
      el("td", {}, t.reason))));
  fillRows(document.querySelector("#runners tbody"), status.runners.map((r) =>
    el("tr", { "data-runner": r.runner_id },
      el("td", {}, r.runner_id),
      el("td", {}, r.generation),
      el("td", {}, r.host_id || "(worker's own)"),
      el("td", {}, `${r.host}:${r.control_port}`),
      el("td", {}, r.pid ?? "?"),
      el("td", {}, r.slots))));
  fillRows(document.querySelector("#rejected tbody"), [...status.rejected_commands].reverse().map((c) =>
    el("tr", {},
      el("td", { class: "nowrap" }, fmtTime(c.time)),
      el("td", {}, c.command),
      el("td", {}, el("code", {}, c.payload === null || c.payload === undefined ? "" : typeof c.payload === "string" ? c.payload : JSON.stringify(c.payload))),
      el("td", { class: "reason" }, c.reason))));
  showFailure(status);
  view.graph = data.graph;
  redrawGraph();
}

async function refreshJob() {
  try {
    showStatus(await api(JOB_API));
    showError(document.getElementById("error"), null);
    document.getElementById("updated").textContent = `updated ${new Date().toLocaleTimeString()}`;
  } catch (err) {
    showError(document.getElementById("error"), err.message);
  }
}

async function refreshMetrics() {
  try {
    const data = await api(`${JOB_API}/metrics`);
    view.metrics = data.operators;
    const missing = data.unreachable || [];
    showError(document.getElementById("metrics-error"), missing.length === 0 ? null
      : `metrics: no answer from host ${missing.join(", ")} (no metrics endpoint, or not reachable); its runners are not counted`);
  } catch (err) {
    view.metrics = {};
    showError(document.getElementById("metrics-error"), `metrics: ${err.message}`);
  }
  redrawGraph();
}

async function refreshCheckpoints() {
  try {
    const data = await api(`${JOB_API}/checkpoints`);
    document.getElementById("checkpoint-url").textContent = `store: ${data.checkpoint_url}`;
    fillRows(document.querySelector("#checkpoints tbody"), data.checkpoints.map((c) =>
      el("tr", { "data-epoch": c.epoch },
        el("td", { class: "num" }, c.epoch),
        el("td", { class: "nowrap" }, fmtTime(c.created_at)),
        el("td", { class: "num" }, fmtSeconds(c.duration_s)),
        el("td", { class: "num" }, fmtBytes(c.size)),
        el("td", { class: c.verified ? "ok" : "error" },
          c.verified ? (c.then_stop ? "ok (final)" : "ok") : `CORRUPT: ${c.problems.map((p) => p.message || JSON.stringify(p)).join("; ")}`))));
    showError(document.getElementById("checkpoints-error"), null);
  } catch (err) {
    showError(document.getElementById("checkpoints-error"), err.message);
  }
}

/** Send an action; show the server's answer (or the client's refusal) under the buttons. */
async function act(button, path, body) {
  const out = document.getElementById("action-message");
  button.disabled = true;
  out.className = "pending";
  out.textContent = `${button.textContent}…`;
  try {
    const data = await api(`${JOB_API}/${path}`, body);
    out.className = "ok";
    out.textContent = data.message;
  } catch (err) {
    out.className = "error";
    out.textContent = err.message;
  } finally {
    button.disabled = false;
  }
  refreshJob();
}

document.getElementById("stop-form").addEventListener("submit", (event) => {
  event.preventDefault();
  act(document.getElementById("stop"), "stop", { mode: document.getElementById("stop-mode").value });
});
document.getElementById("rescale-form").addEventListener("submit", (event) => {
  event.preventDefault();
  act(document.getElementById("rescale"), "rescale", { parallelism: Number(document.getElementById("rescale-parallelism").value) });
});
document.getElementById("restart-form").addEventListener("submit", (event) => {
  event.preventDefault();
  act(document.getElementById("restart"), "restart", {
    force: document.getElementById("restart-force").checked,
    ignore_state: document.getElementById("restart-ignore-state").checked,
  });
});

every(POLL_MS, refreshJob);
every(POLL_MS, refreshMetrics);
every(CHECKPOINT_POLL_MS, refreshCheckpoints);
