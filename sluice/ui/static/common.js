// Helpers shared by the dashboard's pages. Every value from the API is put into the page as
// text (textContent, attribute values through setAttribute): never parsed as HTML.
"use strict";

const POLL_MS = 1000; // how often a page asks the API again

/** An element with attributes and children (strings become text nodes). */
function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs || {})) {
    if (value !== null && value !== undefined) node.setAttribute(name, String(value));
  }
  for (const child of children) {
    node.append(child instanceof Node ? child : document.createTextNode(child === null || child === undefined ? "" : String(child)));
  }
  return node;
}

/** Replace a table body's rows. */
function fillRows(tbody, rows) {
  tbody.replaceChildren(...rows);
}

/** GET or POST JSON; resolves to the body, rejects with the server's `error` message. */
async function api(path, body) {
  const init = body === undefined
    ? { headers: { Accept: "application/json" } }
    : { method: "POST", headers: { "Content-Type": "application/json", Accept: "application/json" }, body: JSON.stringify(body) };
  let response;
  try {
    response = await fetch(path, init);
  } catch (err) {
    throw new Error(`the dashboard server does not answer (${err.message})`);
  }
  let data = null;
  try {
    data = await response.json();
  } catch (err) {
    data = null;
  }
  if (!response.ok) {
    throw new Error((data && data.error) || `${response.status} ${response.statusText}`);
  }
  return data;
}

/** Show `message` in an error paragraph, or hide it when null. */
function showError(node, message) {
  node.textContent = message || "";
  node.hidden = !message;
}

function fmtTime(iso) {
  if (!iso) return "?";
  const d = new Date(iso);
  return isNaN(d) ? String(iso) : d.toLocaleString();
}

function fmtRate(value) {
  if (value === null || value === undefined) return "–";
  // One decimal while it is readable: a rate that moves shows it.
  return value >= 1000 ? value.toFixed(0) : value.toFixed(1);
}

function fmtCount(value) {
  if (value === null || value === undefined) return "–";
  return Math.round(value).toLocaleString();
}

function fmtSeconds(value) {
  if (value === null || value === undefined) return "–";
  return value < 10 ? `${value.toFixed(2)} s` : `${value.toFixed(1)} s`;
}

function fmtPercent(value) {
  if (value === null || value === undefined) return "–";
  return `${(value * 100).toFixed(0)} %`;
}

function fmtBytes(n) {
  const units = ["B", "KB", "MB", "GB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) {
    n /= 1024;
    i += 1;
  }
  return i === 0 ? `${n} B` : `${n.toFixed(1)} ${units[i]}`;
}

/** Run `tick` now and then every `ms`, never two at once. */
function every(ms, tick) {
  let running = false;
  const run = async () => {
    if (running) return;
    running = true;
    try {
      await tick();
    } finally {
      running = false;
    }
  };
  run();
  return setInterval(run, ms);
}
