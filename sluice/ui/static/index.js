// The job list: every job of the namespace with its state, each linking to its page.
"use strict";

async function refreshJobs() {
  const tbody = document.querySelector("#jobs tbody");
  try {
    const data = await api("/api/jobs");
    fillRows(tbody, data.jobs.map((job) => el("tr", { "data-job": job.job_id },
      el("td", {}, el("a", { href: `/jobs/${encodeURIComponent(job.job_id)}` }, job.job_id)),
      el("td", {}, el("span", { class: `state state-${job.state}` }, job.state)),
      el("td", {}, job.pipeline_name))));
    document.getElementById("empty").hidden = data.jobs.length > 0;
    showError(document.getElementById("error"), null);
    document.getElementById("updated").textContent = `updated ${new Date().toLocaleTimeString()}`;
  } catch (err) {
    showError(document.getElementById("error"), err.message);
  }
}

every(POLL_MS * 3, refreshJobs);
