// The Fieldsync fleet dashboard: no framework, no build step, nothing fetched
// from elsewhere. The operator token lives in sessionStorage (this tab only);
// every value from the API reaches the page as text (textContent and
// createElement), never as markup.
"use strict";

(() => {
  const TOKEN_KEY = "fieldsync.operator-token";
  const REFRESH_MS = 5000;
  const SKEW_FLAG_MS = 5000;
  const EXPIRY_FLAG_DAYS = 30;
  const DAY_MS = 86400000;
  const STATES = ["syncing", "idle", "stalled", "offline"];

  const $ = (id) => document.getElementById(id);
  let timer = null;
  let pendingLookup = false;

  /** An element with attributes and children (strings become text nodes). */
  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [name, value] of Object.entries(attrs || {})) {
      if (value === undefined || value === null || value === false) continue;
      if (name === "class") node.className = value;
      else node.setAttribute(name, String(value));
    }
    for (const child of children) {
      if (child === undefined || child === null) continue;
      node.append(child instanceof Node ? child : String(child));
    }
    return node;
  }

  const dash = () => el("span", { class: "muted", title: "not reported" }, "—");

  class Unauthorized extends Error {}

  /** GET `path` on the operator API with the token; `{status, body}`. */
  async function api(path) {
    const token = sessionStorage.getItem(TOKEN_KEY);
    if (!token) throw new Unauthorized("Paste the operator token to continue.");
    const response = await fetch(path, {
      headers: { Authorization: "Bearer " + token, Accept: "application/json" },
      cache: "no-store",
      credentials: "omit",
    });
    if (response.status === 401) {
      throw new Unauthorized(
        "The hub refused the token (401 unauthorized): it is missing or wrong. Paste the operator token again.",
      );
    }
    let body = null;
    try {
      body = await response.json();
    } catch (_) {
      body = null;
    }
    return { status: response.status, body };
  }

  /** The API's `{"error": {"code", "message"}}` as one line. */
  function errorText(status, body) {
    const error = body && body.error;
    if (error && typeof error.message === "string") {
      return `${error.message} (${error.code || "error"}, HTTP ${status})`;
    }
    return `The hub answered HTTP ${status}.`;
  }

  // ---- formatting -------------------------------------------------------

  function bytes(n) {
    if (typeof n !== "number") return "?";
    const units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let value = n;
    let unit = 0;
    while (value >= 1024 && unit < units.length - 1) {
      value /= 1024;
      unit += 1;
    }
    return unit === 0 ? `${value} B` : `${value.toFixed(1)} ${units[unit]}`;
  }

  function duration(ms) {
    const abs = Math.abs(ms);
    if (abs < 1000) return `${Math.round(abs)} ms`;
    if (abs < 60000) return `${(abs / 1000).toFixed(1)} s`;
    if (abs < 3600000) return `${Math.round(abs / 60000)} min`;
    if (abs < 2 * DAY_MS) return `${(abs / 3600000).toFixed(1)} h`;
    return `${Math.round(abs / DAY_MS)} d`;
  }

  function ago(ms) {
    if (ms < 1000) return "just now";
    const s = Math.round(ms / 1000);
    if (s < 60) return `${s} s ago`;
    const m = Math.round(s / 60);
    if (m < 60) return `${m} min ago`;
    const h = Math.round(m / 60);
    if (h < 48) return `${h} h ago`;
    return `${Math.round(h / 24)} d ago`;
  }

  /** An RFC 3339 time as `<time>`: `text` shown, the absolute time as title. */
  function timeCell(iso, text, cls) {
    const when = new Date(iso);
    const title = isNaN(when) ? iso : `${iso} (${when.toLocaleString()})`;
    return el("time", { datetime: iso, title, class: cls }, text);
  }

  // ---- agents -----------------------------------------------------------

  function stateCell(row) {
    const state = STATES.includes(row.state) ? row.state : "unknown";
    return el(
      "span",
      {
        class: `badge state-${state}`,
        title: row.connected ? "connected to the hub" : "not connected",
      },
      String(row.state ?? "unknown"),
    );
  }

  function backlogCell(row) {
    if (typeof row.outbox_pending !== "number") {
      return el("span", { class: "muted", title: "no health report yet" }, "—");
    }
    const notes = [];
    if (typeof row.oldest_pending_ms === "number") {
      notes.push(`oldest pending ${duration(row.oldest_pending_ms)}`);
    }
    if (typeof row.drain_per_s === "number") notes.push(`drains ${row.drain_per_s}/s`);
    if (row.health_reported) notes.push(`reported ${row.health_reported}`);
    return el(
      "span",
      { title: notes.join(", ") || null },
      `${row.outbox_pending} pending · ${bytes(row.outbox_bytes)}`,
    );
  }

  /** The later of the agent's last hello or upstream batch and its last health report. */
  function lastSeenCell(row, now) {
    const times = [row.last_seen, row.health_reported].filter((t) => t && !isNaN(Date.parse(t)));
    if (times.length === 0) return el("span", { class: "muted" }, row.last_seen ? String(row.last_seen) : "never");
    const latest = times.reduce((a, b) => (Date.parse(b) > Date.parse(a) ? b : a));
    return timeCell(latest, ago(Math.max(0, now - Date.parse(latest))));
  }

  function skewCell(row) {
    const skew = row.clock_skew_ms;
    if (typeof skew !== "number") return dash();
    const sign = skew > 0 ? "+" : skew < 0 ? "−" : "";
    const text = `${sign}${duration(skew)}`;
    if (Math.abs(skew) > SKEW_FLAG_MS) {
      return el(
        "span",
        {
          class: "flag",
          title: `the device clock ${skew > 0 ? "ahead of" : "behind"} the hub's by more than ${SKEW_FLAG_MS / 1000} s`,
        },
        `⚠ ${text}`,
      );
    }
    return el("span", { title: "device clock minus the hub's, at its last hello" }, text);
  }

  function expiryCell(row, now) {
    if (!row.not_after) return dash();
    const at = Date.parse(row.not_after);
    const serial = row.serial ? `serial ${row.serial}` : null;
    if (isNaN(at)) return el("span", { title: serial }, String(row.not_after));
    const left = at - now;
    const day = String(row.not_after).slice(0, 10);
    let text;
    let cls = null;
    if (left <= 0) {
      text = `⚠ expired ${Math.ceil(-left / DAY_MS)} d ago`;
      cls = "flag bad";
    } else if (left < EXPIRY_FLAG_DAYS * DAY_MS) {
      text = `⚠ ${day} (in ${Math.floor(left / DAY_MS)} d)`;
      cls = "flag";
    } else {
      text = `${day} (in ${Math.floor(left / DAY_MS)} d)`;
    }
    const cell = el("span", {}, timeCell(row.not_after, text, cls));
    if (serial) cell.append(el("span", { class: "serial muted" }, serial));
    return cell;
  }

  function labelsCell(row) {
    const labels = row.labels;
    if (!labels || typeof labels !== "object" || Object.keys(labels).length === 0) return dash();
    const list = el("ul", { class: "labels" });
    for (const name of Object.keys(labels).sort()) {
      list.append(el("li", { class: "label" }, `${name}=${labels[name]}`));
    }
    return list;
  }

  function renderAgents(agents) {
    const now = Date.now();
    const rows = agents.slice().sort((a, b) => String(a.id).localeCompare(String(b.id)));
    const body = $("agent-rows");
    body.replaceChildren();
    for (const row of rows) {
      const tr = el("tr", { "data-agent": row.id, "data-state": row.state });
      tr.append(
        el("th", { scope: "row", title: row.incarnation ? `incarnation ${row.incarnation}` : null }, row.id),
        el("td", {}, stateCell(row)),
        el("td", {}, backlogCell(row)),
        el("td", { class: "num" }, String(row.queue_pending ?? "—")),
        el("td", {}, lastSeenCell(row, now)),
        el("td", {}, skewCell(row)),
        el("td", {}, expiryCell(row, now)),
        el("td", { class: "wrap" }, labelsCell(row)),
      );
      body.append(tr);
    }
    if (rows.length === 0) {
      body.append(el("tr", {}, el("td", { colspan: 8, class: "muted" }, "The hub knows no agents yet.")));
    }
    const connected = rows.filter((r) => r.connected).length;
    const stalled = rows.filter((r) => r.state === "stalled").length;
    const summary = $("summary");
    summary.replaceChildren(
      el("strong", {}, `${rows.length} ${rows.length === 1 ? "agent" : "agents"}`),
      " · ",
      `${connected} connected`,
      " · ",
      `${rows.length - connected} offline`,
      " · ",
      el("span", { class: stalled > 0 ? "flag" : null }, `${stalled} stalled`),
    );
    const ids = $("agent-ids");
    ids.replaceChildren(...rows.map((r) => el("option", { value: r.id })));
  }

  async function refresh() {
    timer = null;
    try {
      const { status, body } = await api("/v1/agents");
      if (status !== 200 || !body || !Array.isArray(body.agents)) {
        throw new Error(errorText(status, body));
      }
      renderAgents(body.agents);
      $("banner").hidden = true;
      $("updated").textContent = `Updated ${new Date().toLocaleTimeString()} · every ${REFRESH_MS / 1000} s`;
    } catch (e) {
      if (e instanceof Unauthorized) {
        showLogin(e.message);
        return;
      }
      const banner = $("banner");
      banner.textContent = `Cannot read the fleet from the hub: ${e.message}. Retrying every ${REFRESH_MS / 1000} s.`;
      banner.hidden = false;
    }
    if (!$("dashboard").hidden) timer = setTimeout(refresh, REFRESH_MS);
  }

  // ---- record browser ---------------------------------------------------

  function valueText(value) {
    return typeof value === "string" ? value : JSON.stringify(value);
  }

  async function lookup() {
    const agent = $("rec-agent").value.trim();
    const collection = $("rec-collection").value.trim();
    const key = $("rec-key").value.trim();
    const out = $("record-result");
    if (!agent || !collection || !key) {
      out.replaceChildren(el("p", { class: "message" }, "Give an agent, a collection and a key."));
      return;
    }
    out.replaceChildren(el("p", { class: "muted" }, "Loading…"));
    const path = ["/v1/agents", agent, "records", collection, key]
      .map((part, i) => (i === 0 ? part : encodeURIComponent(part)))
      .join("/");
    try {
      const { status, body } = await api(path);
      if (status !== 200 || !body || typeof body.fields !== "object" || body.fields === null) {
        out.replaceChildren(el("p", { class: "message", role: "alert", id: "record-error" }, errorText(status, body)));
        return;
      }
      const names = Object.keys(body.fields).sort();
      const title = el("h3", {}, `${body.agent} / ${body.collection} / ${body.key}`);
      if (names.length === 0) {
        out.replaceChildren(title, el("p", { class: "muted" }, "The hub holds no permitted field of this record."));
        return;
      }
      const rows = names.map((name) =>
        el(
          "tr",
          { "data-field": name },
          el("th", { scope: "row" }, name),
          el("td", { class: typeof body.fields[name] === "string" ? null : "json" }, valueText(body.fields[name])),
        ),
      );
      out.replaceChildren(
        title,
        el(
          "table",
          { id: "record-fields" },
          el("thead", {}, el("tr", {}, el("th", { scope: "col" }, "Field"), el("th", { scope: "col" }, "Value"))),
          el("tbody", {}, ...rows),
        ),
      );
    } catch (e) {
      if (e instanceof Unauthorized) {
        showLogin(e.message);
        return;
      }
      out.replaceChildren(el("p", { class: "message", role: "alert" }, `Cannot read the record: ${e.message}`));
    }
  }

  // ---- session ----------------------------------------------------------

  function stopRefresh() {
    if (timer !== null) clearTimeout(timer);
    timer = null;
  }

  function showLogin(message) {
    stopRefresh();
    sessionStorage.removeItem(TOKEN_KEY);
    // Nothing read with the old token stays in the page.
    $("agent-rows").replaceChildren();
    $("agent-ids").replaceChildren();
    $("record-result").replaceChildren();
    $("summary").textContent = "Loading…";
    $("updated").textContent = "";
    $("dashboard").hidden = true;
    $("session").hidden = true;
    $("login").hidden = false;
    const note = $("login-message");
    note.textContent = message || "";
    note.hidden = !message;
    $("token").value = "";
    $("token").focus();
  }

  function showDashboard() {
    $("login").hidden = true;
    $("login-message").hidden = true;
    $("dashboard").hidden = false;
    $("session").hidden = false;
    stopRefresh();
    refresh();
    if (pendingLookup) {
      pendingLookup = false;
      lookup();
    }
  }

  /**
   * Takes `#token=...&agent=...&collection=...&key=...` from the address: the
   * token goes to sessionStorage, the rest pre-fills the record browser, and
   * the fragment is removed from the address bar and history at once.
   */
  function readFragment() {
    if (location.hash.length < 2) return;
    const params = new URLSearchParams(location.hash.slice(1));
    history.replaceState(null, "", location.pathname + location.search);
    const token = params.get("token");
    if (token) sessionStorage.setItem(TOKEN_KEY, token);
    const fields = { agent: "rec-agent", collection: "rec-collection", key: "rec-key" };
    let given = 0;
    for (const [name, id] of Object.entries(fields)) {
      const value = params.get(name);
      if (value) {
        $(id).value = value;
        given += 1;
      }
    }
    pendingLookup = given === 3;
  }

  function start() {
    readFragment();
    $("login-form").addEventListener("submit", (event) => {
      event.preventDefault();
      const token = $("token").value.trim();
      if (!token) return;
      sessionStorage.setItem(TOKEN_KEY, token);
      $("token").value = "";
      showDashboard();
    });
    $("logout").addEventListener("click", () => {
      sessionStorage.clear();
      showLogin("Logged out: the token was removed from this tab.");
    });
    $("record-form").addEventListener("submit", (event) => {
      event.preventDefault();
      lookup();
    });
    if (sessionStorage.getItem(TOKEN_KEY)) showDashboard();
    else showLogin("");
  }

  start();
})();
