/* budget-middleware dashboard (SPEC §16): plain JavaScript, no dependencies, no build step.
 *
 * The admin API is next to this page: the page at <mount>/ui calls <mount>/budgets, ...
 * The admin key is asked for once and kept in this tab's sessionStorage; it is sent as
 * `Authorization: Bearer <key>` with each call and forgotten on "Sign out" or a 401.
 * Every value from the API reaches the page as text (textContent), never as HTML.
 */
"use strict";

(function () {
  const KEY_STORAGE = "budget-middleware.admin-key";
  const API = new URL(".", window.location.href);
  const SVG_NS = "http://www.w3.org/2000/svg";
  const COLORS = ["#3056d3", "#2e9d66", "#d98a00", "#8e44ad", "#d1423b", "#16a2b8", "#7a8699",
                  "#c2185b"];
  const OTHER_COLOR = "#c5ccd6";
  const MAX_SERIES = 7;
  const REFRESH_MS = 30000;
  const USABLE_KEY = /^[\x21-\x7e]+$/;  // settings.bearer_token_usable: what a header carries
  const EDITABLE = {
    customer: (b) => "customers/" + enc(b.customer_id),
    team: (b) => "teams/" + enc(b.team_id),
    virtual_key: (b) => "virtual-keys/" + enc(b.virtual_key_id),
    provider: (b) => "providers/" + enc(b.provider),
    tag: (b) => "tags/" + enc(b.tag),
    model_config: (b) => "model-configs/" + enc(b.model_config_id),
  };
  const OWNER_ID = {
    customer: "customer_id", team: "team_id", virtual_key: "virtual_key_id",
    provider_config: "provider_config_id", provider: "provider", tag: "tag",
    model_config: "model_config_id",
  };
  const OWNER_LABEL = {
    customer: "customer", team: "team", virtual_key: "key", provider_config: "key × provider",
    provider: "provider", tag: "tag", model_config: "model",
  };
  const GROUP_NONE = {
    model: "(no model)", team: "(no team)", virtual_key: "(no key)", customer: "(no customer)",
    provider: "(no provider)", tag: "(no tag)",
  };

  // `skew`: the server's clock less this browser's, in ms (null until a `/budgets` answer
  // says); `clock`: the `/budgets` call in flight that will say it.
  const state = { budgets: [], timer: null, editing: null, resetting: null, loading: false,
                  skew: null, clock: null };
  const $ = (id) => document.getElementById(id);

  /* -- the server's clock ---------------------------------------------------------------- */

  // "Today", the chart's days and when a window ends are the server's (SPEC §9: windows and
  // `/usage` days are in UTC, by the server's clock), never this browser's: a browser whose
  // clock is wrong asked for days to come and said a window ended days ago.
  function learnServerTime(serverTime, sent) {
    const at = Date.parse(serverTime);
    if (Number.isFinite(at)) state.skew = at - (sent + Date.now()) / 2;
  }

  function serverNow() {
    return Date.now() + (state.skew || 0);
  }

  /** The server's time, known: waits for the `/budgets` call that will say it, or makes one. */
  async function serverClock() {
    if (state.skew !== null) return serverNow();
    try {
      await state.clock;
    } catch (exc) {
      // told by the call's own loader
    }
    if (state.skew === null) {
      const sent = Date.now();
      learnServerTime((await api("budgets?owner_type=tag")).server_time, sent);
    }
    return serverNow();
  }

  function enc(value) {
    return encodeURIComponent(String(value));
  }

  /* -- formatting -------------------------------------------------------------------- */

  const usdFormats = new Map();
  // Under a cent, as charged (to the nano-dollar): never a non-zero amount as $0.00, and not
  // $0.0049996 as $0.005, which read as a $0.005 budget used up.
  // Under a nano-dollar (no charge is; a chart's tick can be), 3 significant digits.
  // From a cent up, four decimals at most, as the CLI writes them (in cents, a $9.999 limit
  // read "$10.00": a limit nobody set).
  const tinyFormat = new Intl.NumberFormat("en-US", {
    style: "currency", currency: "USD", minimumFractionDigits: 2, maximumFractionDigits: 9,
  });
  const subNanoFormat = new Intl.NumberFormat("en-US", {
    style: "currency", currency: "USD", maximumSignificantDigits: 3,
  });
  function usd(value) {
    const v = Number(value) || 0;
    const abs = Math.abs(v);
    if (abs > 0 && abs < 0.01) return (abs < 1e-9 ? subNanoFormat : tinyFormat).format(v);
    const digits = abs === 0 ? 2 : 4;
    if (!usdFormats.has(digits)) {
      usdFormats.set(digits, new Intl.NumberFormat("en-US", {
        style: "currency", currency: "USD", minimumFractionDigits: 2,
        maximumFractionDigits: digits,
      }));
    }
    return usdFormats.get(digits).format(v);
  }
  /** Spend beside its limit: while under it, never the limit's own text ($9.996 of $10 read
   *  "$10.00 of $10.00", a budget that still admits shown as used up): the fewest decimals, up
   *  to the nano-dollar a charge is counted in, that tell the two apart. */
  function spentUsd(spent, limit) {
    const shown = usd(spent);
    if (!(spent < limit) || shown !== usd(limit) || Math.abs(spent) < 0.01) return shown;
    for (let digits = 3; digits <= 9; digits += 1) {
      const text = new Intl.NumberFormat("en-US", {
        style: "currency", currency: "USD", minimumFractionDigits: 2,
        maximumFractionDigits: digits,
      }).format(spent);
      if (text !== usd(limit)) return text;
    }
    return shown;
  }
  /** A share used, in whole percents: under 1 never "100%" (0.99996 read 100%). */
  function percent(ratio) {
    const whole = Math.round(ratio * 100);
    return ratio < 1 ? Math.min(whole, 99) : whole;
  }
  const intFormat = new Intl.NumberFormat("en-US");
  const compactFormat = new Intl.NumberFormat("en-US", { notation: "compact",
                                                         maximumFractionDigits: 1 });
  const count = (n) => intFormat.format(Number(n) || 0);
  const compact = (n) => compactFormat.format(Number(n) || 0);
  // Times as the API and the CLI write them: in UTC, and said so (a browser elsewhere wrote
  // its own zone's day, unlabelled: Dec 5, 03:19 AM in Kiritimati for Dec 4, 13:19 UTC).
  const dateTimeFormat = new Intl.DateTimeFormat("en-US", {
    month: "short", day: "numeric", hour: "2-digit", minute: "2-digit", hourCycle: "h23",
    timeZone: "UTC",
  });
  const dayFormat = new Intl.DateTimeFormat("en-US", { month: "short", day: "numeric",
                                                       timeZone: "UTC" });
  const clockFormat = new Intl.DateTimeFormat("en-US", {
    hour: "2-digit", minute: "2-digit", second: "2-digit", hourCycle: "h23", timeZone: "UTC",
  });

  function when(text) {
    const t = new Date(text);
    return Number.isNaN(t.getTime()) ? String(text || "") : dateTimeFormat.format(t) + " UTC";
  }

  function relative(text) {
    const ms = new Date(text).getTime() - serverNow();
    if (Number.isNaN(ms)) return "";
    const abs = Math.abs(ms);
    const units = [["d", 86400000], ["h", 3600000], ["min", 60000]];
    let phrase = "less than a minute";
    for (const [unit, size] of units) {
      if (abs >= size) {
        phrase = Math.floor(abs / size) + " " + unit;
        break;
      }
    }
    return ms >= 0 ? "in " + phrase : phrase + " ago";
  }

  /* -- DOM ----------------------------------------------------------------------------- */

  function h(tag, attrs, ...children) {
    const el = document.createElement(tag);
    for (const [name, value] of Object.entries(attrs || {})) {
      if (value === null || value === undefined || value === false) continue;
      if (name === "class") el.className = value;
      else if (name === "text") el.textContent = value;
      else if (name.startsWith("on")) el.addEventListener(name.slice(2), value);
      else el.setAttribute(name, value === true ? "" : String(value));
    }
    for (const child of children.flat()) {
      if (child === null || child === undefined || child === false) continue;
      el.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return el;
  }

  function svg(tag, attrs, ...children) {
    const el = document.createElementNS(SVG_NS, tag);
    for (const [name, value] of Object.entries(attrs || {})) {
      if (name === "class") el.setAttribute("class", value);
      else if (name === "text") el.textContent = value;
      else el.setAttribute(name, String(value));
    }
    for (const child of children) if (child) el.append(child);
    return el;
  }

  function showError(el, message) {
    el.textContent = message || "";
    el.hidden = !message;
  }

  /* -- the admin API ------------------------------------------------------------------- */

  class Unauthorized extends Error {}
  class ApiError extends Error {
    constructor(status, message, code) {
      super(message);
      this.status = status;
      this.code = code || null;
    }
  }

  async function api(path, options) {
    const key = sessionStorage.getItem(KEY_STORAGE);
    if (!key) throw new Unauthorized("sign in first");
    const init = Object.assign({ method: "GET" }, options || {});
    init.headers = { Accept: "application/json", Authorization: "Bearer " + key };
    init.cache = "no-store";
    if (init.json !== undefined) {
      init.headers["Content-Type"] = "application/json";
      init.body = JSON.stringify(init.json);
      delete init.json;
    }
    let response;
    try {
      response = await fetch(new URL(path, API), init);
    } catch (exc) {
      throw new ApiError(0, "the admin API cannot be reached");
    }
    let body = null;
    try {
      body = await response.json();
    } catch (exc) {
      body = null;
    }
    if (response.status === 401) {
      const message = body && body.error ? body.error.message : "the admin key was refused";
      throw new Unauthorized(message);
    }
    if (!response.ok) {
      const message = body && body.error && body.error.message ? body.error.message
        : "HTTP " + response.status;
      throw new ApiError(response.status, message, body && body.error && body.error.code);
    }
    return body;
  }

  /** An optional route (the lead adds GET /alerts and GET /refusals): null when absent. */
  async function optional(path) {
    try {
      return await api(path);
    } catch (exc) {
      if (exc instanceof ApiError && (exc.status === 404 || exc.status === 405)) return null;
      throw exc;
    }
  }

  /* -- sign in / out ----------------------------------------------------------------- */

  function signedIn() {
    return Boolean(sessionStorage.getItem(KEY_STORAGE));
  }

  function showLogin(message) {
    $("app").hidden = true;
    $("session").hidden = true;
    $("login").hidden = false;
    showError($("login-error"), message);
    $("admin-key").value = "";
    $("admin-key").focus();
    if (state.timer) clearInterval(state.timer);
    state.timer = null;
  }

  function signOut(message) {
    sessionStorage.removeItem(KEY_STORAGE);
    clearNewKey();
    showLogin(message);
  }

  async function signIn(event) {
    event.preventDefault();
    const key = $("admin-key").value.trim();
    if (!key) return;
    if (!USABLE_KEY.test(key)) {  // the browser could not even send it: say so, not "unreachable"
      showLogin("That is not an admin key: BUDGET_ADMIN_KEY is printable ASCII without spaces "
        + "(were quotes pasted with it?)");
      return;
    }
    sessionStorage.setItem(KEY_STORAGE, key);
    $("admin-key").value = "";
    await start();
  }

  async function start() {
    $("login").hidden = true;
    $("app").hidden = false;
    $("session").hidden = false;
    const loaded = await refreshAll();
    if (loaded && !state.timer) {
      state.timer = setInterval(() => {
        if (document.visibilityState === "visible" && !anyDialogOpen()) refreshAll();
      }, REFRESH_MS);
    }
  }

  function anyDialogOpen() {
    return $("edit-dialog").open || $("reset-dialog").open;
  }

  /* -- loading ------------------------------------------------------------------------- */

  async function refreshAll() {
    if (state.loading) return false;
    state.loading = true;
    showError($("app-error"), "");
    try {
      const budgets = (state.clock = loadBudgets());
      const results = await Promise.allSettled([
        budgets, loadChart(), loadTopKeys(), loadParents(), loadRefusals(), loadAlerts(),
      ]);
      const failed = results.filter((r) => r.status === "rejected").map((r) => r.reason);
      // No key opens an admin API whose BUDGET_ADMIN_KEY is unset (503 admin_api_disabled):
      // back to the sign-in, saying so, as for a key refused.
      const refused = failed.find((e) => e instanceof Unauthorized
        || (e instanceof ApiError && e.code === "admin_api_disabled"));
      if (refused) {
        signOut(refused.message);
        return false;
      }
      // One line per cause: the six calls fail alike when the store is down.
      if (failed.length) showError($("app-error"), "Some data could not be loaded: "
        + [...new Set(failed.map((e) => e.message))].join("; "));
      $("updated").textContent = "Updated " + clockFormat.format(new Date()) + " UTC";
      document.body.dataset.loaded = String(Date.now());
      return true;
    } finally {
      state.loading = false;
    }
  }

  /* -- budgets ------------------------------------------------------------------------- */

  async function loadBudgets() {
    const sent = Date.now();
    const answer = await api("budgets?from_memory=true");
    learnServerTime(answer.server_time, sent);
    state.budgets = answer.budgets || [];
    renderBudgets();
    const hot = state.budgets.filter((b) => Number(b.usage_ratio) >= 0.8).length;
    $("tile-hot").textContent = hot + " of " + state.budgets.length;
  }

  function renderBudgets() {
    const ownerType = $("budget-owner").value;
    const needle = $("budget-search").value.trim().toLowerCase();
    const shown = state.budgets
      .filter((b) => !ownerType || b.owner_type === ownerType)
      .filter((b) => !needle || budgetName(b).toLowerCase().includes(needle))
      .sort((a, b) => (Number(b.usage_ratio) - Number(a.usage_ratio))
        || budgetName(a).localeCompare(budgetName(b)));
    $("budget-count").textContent = "(" + shown.length + ")";
    const list = $("budgets");
    list.replaceChildren();
    if (!shown.length) {
      list.append(h("li", { class: "empty" }, state.budgets.length ? "No budget matches."
        : "No budgets yet: give a key, team or customer a budget."));
      return;
    }
    for (const b of shown) list.append(budgetItem(b));
  }

  /** Why a browser cannot write this budget's owner, or "": a tag or provider named with dots
   *  alone (`..`, `.`) is no path segment a browser can send (a URL reads `tags/..`, and
   *  `tags/%2E%2E` alike, as the admin app's root); the CLI sends it. */
  function unaddressable(b) {
    const command = { tag: "tags", provider: "providers" }[b.owner_type];
    const name = String(b[OWNER_ID[b.owner_type]] ?? "");
    if (!command || !/^\.+$/.test(name)) return "";
    return "A browser cannot send the name " + JSON.stringify(name) + " in a URL: change it with "
      + "budget-middleware " + command + " update " + name + " --budget ...";
  }

  function budgetName(b) {
    return b.user_path || "/" + b.owner_type + "/" + (b[OWNER_ID[b.owner_type]] || b.id);
  }

  function budgetItem(b) {
    const amount = Number(b.amount ?? b.max_limit) || 0;
    const spent = Number(b.spent ?? b.current_usage) || 0;
    const hasReserved = typeof b.reserved === "number";
    const reserved = hasReserved ? b.reserved : 0;
    const ratio = Number(b.usage_ratio) || 0;  // the API's: a $0 budget is used up (it refuses)
    const spentWidth = Math.min(ratio, 1);
    const reservedWidth = amount > 0 ? Math.min(reserved / amount, 1 - spentWidth) : 0;
    const spentBar = h("div", {
      class: "bar-spent" + (ratio >= 1 && !b.soft ? " bad" : ratio >= 0.8 ? " warn" : "")
        + (b.soft ? " bar-soft" : ""),
    });
    spentBar.style.width = (spentWidth * 100).toFixed(2) + "%";
    const reservedBar = h("div", { class: "bar-reserved" });
    reservedBar.style.width = (reservedWidth * 100).toFixed(2) + "%";
    const bar = h("div", {
      class: "bar", role: "progressbar", "aria-valuemin": 0, "aria-valuemax": amount,
      "aria-valuenow": spent, "aria-label": budgetName(b) + " spent",
      title: spentUsd(spent, amount) + " spent" + (hasReserved ? ", " + usd(reserved) + " reserved" : "")
        + " of " + usd(amount),
    }, spentBar, reservedBar);

    const dots = unaddressable(b);
    const editable = !dots && (Boolean(EDITABLE[b.owner_type]) || b.owner_type === "provider_config");
    const actions = h("div", { class: "budget-actions" },
      h("button", {
        type: "button", class: "btn btn-small", "data-action": "edit", disabled: !editable,
        title: editable ? "Change the limit" : dots ? dots
          : "This budget cannot be changed here",
        onclick: () => openEdit(b),
      }, "Edit"),
      h("button", {
        type: "button", class: "btn btn-small", "data-action": "reset",
        title: "Start a new window now", onclick: () => openReset(b),
      }, "Reset"));

    const period = b.period_end
      ? h("span", { class: "muted", title: "ends " + new Date(b.period_end).toISOString() },
        (b.period_label || "") + " · resets " + relative(b.period_end) + " (" + when(b.period_end)
        + ")")
      : h("span", { class: "muted" }, (b.period_label || "lifetime") + " · never resets");

    return h("li", { class: "budget", "data-id": b.id, "data-owner-type": b.owner_type },
      h("div", { class: "budget-top" },
        h("span", { class: "budget-name", title: budgetName(b) }, budgetName(b)),
        h("span", { class: "badge" }, OWNER_LABEL[b.owner_type] || b.owner_type),
        b.soft ? h("span", { class: "badge badge-soft", "data-field": "soft",
                             title: "alerts, never refuses" }, "soft")
          : null,
        ratio >= 1 ? h("span", { class: b.soft ? "badge badge-soft" : "badge badge-over",
                                 "data-field": "over" }, b.soft ? "over" : "exhausted")
          : null,
        actions),
      bar,
      h("div", { class: "budget-numbers" },
        h("span", null,
          h("span", { class: "spent", "data-field": "spent" }, spentUsd(spent, amount)),
          reserved > 0 ? h("span", { class: "reserved", "data-field": "reserved" },
            " + " + usd(reserved) + " reserved") : null,
          h("span", { class: "muted" }, " of "),
          h("span", { "data-field": "limit" }, usd(amount)),
          h("span", { class: "muted" }, " · " + percent(ratio) + "%")),
        period));
  }

  /* change a limit: written through the owner, with every budget of the owner (SPEC §9) */

  function openEdit(b) {
    state.editing = b;
    $("edit-owner").textContent = budgetName(b) + " · " + (b.period_label || "");
    $("edit-limit").value = String(Number(b.amount ?? b.max_limit));
    showError($("edit-error"), "");
    $("edit-dialog").showModal();
    $("edit-limit").select();
  }

  function budgetIn(b) {
    const out = { id: b.id, max_limit: Number(b.max_limit), reset_duration: b.reset_duration ?? null,
                  calendar_aligned: Boolean(b.calendar_aligned) };
    for (const field of ["soft", "alert_thresholds"]) {  // kept as they are, when the API has them
      if (field in b) out[field] = b[field];
    }
    return out;
  }

  async function saveEdit(event) {
    event.preventDefault();
    const b = state.editing;
    const limit = Number($("edit-limit").value);
    if (!b || !Number.isFinite(limit) || limit < 0) {
      showError($("edit-error"), "Enter an amount in USD, 0 or more.");
      return;
    }
    $("edit-save").disabled = true;
    try {
      const ownerId = b[OWNER_ID[b.owner_type]];
      const answer = await api("budgets?owner_type=" + enc(b.owner_type) + "&owner_id="
        + enc(ownerId));
      const siblings = (answer.budgets || []).map((other) => {
        const body = budgetIn(other);
        if (other.id === b.id) body.max_limit = limit;
        return body;
      });
      const [path, body] = await ownerUpdate(b, siblings);
      await api(path, { method: "PUT", json: body });
      $("edit-dialog").close();
      await loadBudgets();
    } catch (exc) {
      if (exc instanceof Unauthorized) {
        $("edit-dialog").close();
        signOut(exc.message);
      } else {
        showError($("edit-error"), exc.message);
      }
    } finally {
      $("edit-save").disabled = false;
    }
  }

  /** Where and what to PUT to give `b`'s owner these budgets: a key's provider config is
   *  written through its key, with every provider config of the key (others left as they are). */
  async function ownerUpdate(b, budgets) {
    if (b.owner_type !== "provider_config") return [EDITABLE[b.owner_type](b), { budgets }];
    const keys = (await api("virtual-keys")).virtual_keys || [];
    const key = keys.find((k) => (k.provider_configs || []).some((p) => p.id === b.provider_config_id));
    if (!key) throw new ApiError(404, "the key of this provider config is gone");
    const configs = key.provider_configs.map((p) => {
      const config = { id: p.id, provider: p.provider, allowed_models: p.allowed_models,
                       blocked_models: p.blocked_models };
      if (p.id === b.provider_config_id) config.budgets = budgets;
      return config;
    });
    return ["virtual-keys/" + enc(key.id), { provider_configs: configs }];
  }

  function openReset(b) {
    state.resetting = b;
    $("reset-text").textContent = "Start a new window for " + budgetName(b)
      + " now? Its spend (" + usd(b.spent) + ") starts again from $0.";
    showError($("reset-error"), "");
    $("reset-dialog").showModal();
  }

  async function confirmReset(event) {
    event.preventDefault();
    const b = state.resetting;
    if (!b) return;
    $("reset-confirm").disabled = true;
    try {
      await api("budgets/" + enc(b.id) + "/reset", { method: "POST" });
      $("reset-dialog").close();
      await loadBudgets();
    } catch (exc) {
      if (exc instanceof Unauthorized) {
        $("reset-dialog").close();
        signOut(exc.message);
      } else {
        showError($("reset-error"), exc.message);
      }
    } finally {
      $("reset-confirm").disabled = false;
    }
  }

  /* -- spend over time ------------------------------------------------------------------ */

  /** The n days up to the server's today (UTC), and the day after the last. */
  async function days(n) {
    const today = new Date(await serverClock());
    const base = Date.UTC(today.getUTCFullYear(), today.getUTCMonth(), today.getUTCDate());
    const out = [];
    for (let i = n - 1; i >= -1; i -= 1) out.push(new Date(base - i * 86400000));
    return out.map((d) => d.toISOString().slice(0, 10)); // n days and the day after the last
  }

  function groupLabel(group, row) {
    if (row.key === null || row.key === undefined) return GROUP_NONE[group] || "(none)";
    return row.name ? row.name + (row.deleted ? " (deleted)" : "") : row.key;
  }

  async function loadChart() {
    const group = $("chart-group").value;
    const n = Number($("chart-days").value) || 14;
    const edges = await days(n);
    // /usage groups by one field: one call for the range, and one a day for the series.
    const range = api("usage?group_by=" + enc(group) + "&start=" + edges[0] + "&end="
      + edges[n]);
    const perDay = edges.slice(0, n).map((day, i) => api("usage?group_by=" + enc(group)
      + "&start=" + day + "&end=" + edges[i + 1]));
    const ticket = (state.chartTicket = (state.chartTicket || 0) + 1);
    const [total, ...daily] = await Promise.all([range, ...perDay]);
    // Answers come in any order: those of a choice made since (by, over) are not drawn.
    if (ticket !== state.chartTicket) return;

    const label = n + " days";
    $("tile-spend-label").textContent = "Spend, last " + label;
    $("tile-spend").textContent = usd(total.total.cost);
    $("tile-requests").textContent = count(total.total.requests);
    $("tile-tokens").textContent = compact(total.total.input_tokens) + " / "
      + compact(total.total.output_tokens);

    const ranked = (total.usage || []).filter((r) => r.cost > 0)
      .sort((a, b) => b.cost - a.cost);
    // A group's key as one text: "no tag" (null) apart from a tag named "null"
    const keyOf = (r) => (r.key === null || r.key === undefined ? "\u0000none" : "=" + r.key);
    const top = ranked.slice(0, MAX_SERIES).map(keyOf);
    const series = top.map((key, i) => {
      const row = ranked[i];
      return { key, label: groupLabel(group, row), color: COLORS[i % COLORS.length],
               cost: row.cost };
    });
    const rest = ranked.slice(MAX_SERIES);
    if (rest.length) {
      series.push({ key: "\u0000other", label: rest.length + " more", color: OTHER_COLOR,
                    cost: rest.reduce((s, r) => s + r.cost, 0) });
    }
    const points = edges.slice(0, n).map((day, i) => {
      const costs = new Map();
      for (const row of daily[i].usage || []) {
        const key = top.includes(keyOf(row)) ? keyOf(row) : "\u0000other";
        costs.set(key, (costs.get(key) || 0) + row.cost);
      }
      return { day, costs, total: daily[i].total.cost };
    });
    state.chart = { group, series, points };
    drawChart();
  }

  function niceStep(max) {
    const raw = max / 4;
    const power = Math.pow(10, Math.floor(Math.log10(raw)));
    for (const m of [1, 2, 2.5, 5, 10]) if (m * power >= raw) return m * power;
    return 10 * power;
  }

  function drawChart() {
    const chart = state.chart;
    const box = $("chart");
    const legend = $("legend");
    box.replaceChildren();
    legend.replaceChildren();
    if (!chart) return;
    // The tallest stack: by tag, a request with two tags counts under each, so a day's bar
    // can be taller than its spend (scaled to the spend, the segments above were cut off).
    const stacked = (p) => [...p.costs.values()].reduce((sum, cost) => sum + cost, 0);
    const max = Math.max(0, ...chart.points.map((p) => Math.max(p.total, stacked(p))));
    if (max <= 0) {
      box.append(h("div", { class: "empty" }, "No spend in this period."));
      return;
    }
    const width = Math.max(box.clientWidth, 320);
    const height = 240;
    const pad = { left: 64, right: 8, top: 10, bottom: 26 };
    const plotW = width - pad.left - pad.right;
    const plotH = height - pad.top - pad.bottom;
    const step = niceStep(max);
    const top = Math.ceil(max / step) * step;
    const y = (v) => pad.top + plotH - (v / top) * plotH;
    const root = svg("svg", { viewBox: "0 0 " + width + " " + height, width, height,
                              "data-points": chart.points.length });
    for (let v = 0; v <= top + step / 2; v += step) {
      root.append(svg("line", { class: v === 0 ? "axis" : "grid", x1: pad.left, x2: width - pad.right,
                                y1: y(v), y2: y(v) }));
      root.append(svg("text", { x: pad.left - 8, y: y(v) + 4, "text-anchor": "end",
                                text: step >= 1 ? "$" + count(v) : usd(v) }));
    }
    const slot = plotW / chart.points.length;
    const barW = Math.max(Math.min(slot * 0.64, 44), 2);
    const labelEvery = Math.ceil(chart.points.length / Math.max(Math.floor(plotW / 64), 1));
    chart.points.forEach((point, i) => {
      const x = pad.left + i * slot + (slot - barW) / 2;
      let base = 0;
      for (const s of chart.series) {
        const cost = point.costs.get(s.key) || 0;
        if (cost <= 0) continue;
        const rect = svg("rect", {
          class: "seg", x: x.toFixed(1), y: y(base + cost).toFixed(1), width: barW.toFixed(1),
          height: Math.max(y(base) - y(base + cost), 0.5).toFixed(1), fill: s.color,
          "data-day": point.day, "data-group": s.label, "data-cost": cost,
        }, svg("title", { text: point.day + " · " + s.label + ": " + usd(cost) }));
        root.append(rect);
        base += cost;
      }
      if ((chart.points.length - 1 - i) % labelEvery === 0) { // counted back from today
        root.append(svg("text", { x: (x + barW / 2).toFixed(1), y: height - 8,
                                  "text-anchor": "middle",
                                  text: dayFormat.format(new Date(point.day + "T00:00:00Z")) }));
      }
    });
    box.append(root);
    for (const s of chart.series) {
      const dot = h("span", { class: "dot" });
      dot.style.background = s.color;
      legend.append(h("li", null, dot, h("span", { class: "name", title: s.label }, s.label),
        h("span", { class: "num" }, usd(s.cost))));
    }
  }

  /* -- top keys -------------------------------------------------------------------------- */

  async function loadTopKeys() {
    const n = Number($("chart-days").value) || 14;
    const edges = await days(n);
    const ticket = (state.keysTicket = (state.keysTicket || 0) + 1);
    const answer = await api("usage?group_by=virtual_key&start=" + edges[0] + "&end=" + edges[n]);
    if (ticket !== state.keysTicket) return;  // a period chosen since: its answer is drawn
    const rows = (answer.usage || []).filter((r) => r.key !== null).slice(0, 8);
    $("keys-range").textContent = "last " + n + " days";
    const body = $("top-keys").tBodies[0];
    body.replaceChildren();
    if (!rows.length) {
      body.append(h("tr", null, h("td", { colspan: 4, class: "empty" }, "No key has spent yet.")));
      return;
    }
    const most = Math.max(...rows.map((r) => r.cost), 1e-12);
    for (const r of rows) {
      const share = h("div");
      share.style.width = ((r.cost / most) * 100).toFixed(1) + "%";
      body.append(h("tr", { "data-key": r.key },
        h("td", null, h("div", null, groupLabel("virtual_key", r)),
          h("div", { class: "share" }, share)),
        h("td", { class: "num" }, count(r.requests)),
        h("td", { class: "num" }, compact(r.input_tokens + r.output_tokens)),
        h("td", { class: "num" }, usd(r.cost))));
    }
  }

  /* -- refusals and alerts ------------------------------------------------------------- */

  function notAvailable(box, route) {
    box.replaceChildren(h("p", { class: "empty", "data-state": "unavailable" },
      "Not available on this server (" + route + ")."));
  }

  function table(head, rows) {
    return h("table", { class: "table" },
      h("thead", null, h("tr", null, head.map(([text, cls]) => h("th", { class: cls }, text)))),
      h("tbody", null, rows));
  }

  /** Who refused: an owner `{type, id, name}` (or, from older servers, a bare type). */
  function scopeText(scope) {
    if (!scope) return "";
    if (typeof scope === "string") return OWNER_LABEL[scope] || scope;
    const label = OWNER_LABEL[scope.type] || scope.type || "";
    return [label, scope.name || scope.id].filter(Boolean).join(" ");
  }

  async function loadRefusals() {
    const box = $("refusals");
    const answer = await optional("refusals");
    if (answer === null) return notAvailable(box, "GET /refusals");
    const items = (answer.refusals || []).slice(0, 8);
    if (!items.length) {
      box.replaceChildren(h("p", { class: "empty" }, "No refusals recently."));
      return;
    }
    box.replaceChildren(table(
      [["When"], ["Key"], ["Model"], ["Refused by"], ["Status", "num"]],
      items.map((r) => h("tr", null,
        h("td", { class: "muted", title: r.at }, when(r.at)),
        h("td", null, r.key_name || r.virtual_key_id || "(no key)"),
        h("td", null, [r.provider, r.model].filter(Boolean).join("/") || "–"),
        h("td", null, h("span", { class: r.shadow ? "pill pill-warn" : "pill pill-bad",
                                   title: r.shadow ? "shadow mode: served, would have been refused"
                                     : null }, r.code || "refused"),
          scopeText(r.scope) ? h("span", { class: "muted" }, " " + scopeText(r.scope)) : null),
        h("td", { class: "num" }, r.shadow ? "shadow" : r.status ?? "")))));
  }

  async function loadAlerts() {
    const box = $("alerts");
    const answer = await optional("alerts");
    if (answer === null) return notAvailable(box, "GET /alerts");
    const items = (answer.alerts || []).slice(0, 8);
    if (!items.length) {
      box.replaceChildren(h("p", { class: "empty" }, "No alerts recently."));
      return;
    }
    const delivery = { delivered: "pill-ok", pending: "pill-warn", failed: "pill-bad" };
    box.replaceChildren(table(
      [["When"], ["Owner"], ["Alert"], ["Delivery"]],
      items.map((a) => {
        const owner = a.owner || {};
        const what = a.type === "budget.exhausted" ? "exhausted"
          // as set (12.5%, 0.5%), as the alert's text says it; float noise left out
          : typeof a.threshold === "number"
            ? Number((a.threshold * 100).toPrecision(6)) + "% reached"
          : a.type;
        return h("tr", null,
          h("td", { class: "muted", title: a.raised_at }, when(a.raised_at)),
          h("td", null, owner.name || owner.id || "–",
            owner.type ? h("span", { class: "muted" }, " " + (OWNER_LABEL[owner.type] || owner.type))
              : null),
          h("td", null, what),
          // Delivered in 0 attempts: there was no webhook URL to go to, nothing was sent.
          a.delivery === "delivered" && a.attempts === 0
            ? h("td", null, h("span", { class: "pill", title: "no BUDGET_ALERT_WEBHOOK_URLS" },
              "no webhook"))
            : h("td", null, h("span", { class: "pill " + (delivery[a.delivery] || "") },
              a.delivery || "–"),
              a.attempts ? h("span", { class: "muted" }, " ×" + a.attempts) : null));
      })));
  }

  /* -- create a key ---------------------------------------------------------------------- */

  async function loadParents() {
    const [teams, customers] = await Promise.all([api("teams"), api("customers")]);
    const select = $("create-parent");
    const chosen = select.value;
    const names = new Map((customers.customers || []).map((c) => [c.id, c.name]));
    select.replaceChildren(h("option", { value: "" }, "nobody"));
    const teamGroup = h("optgroup", { label: "Teams" });
    for (const t of teams.teams || []) {
      const parent = t.customer_id && names.get(t.customer_id);
      teamGroup.append(h("option", { value: "team:" + t.id },
        parent ? parent + " / " + t.name : t.name));
    }
    const customerGroup = h("optgroup", { label: "Customers" });
    for (const c of customers.customers || []) {
      customerGroup.append(h("option", { value: "customer:" + c.id }, c.name));
    }
    if (teamGroup.children.length) select.append(teamGroup);
    if (customerGroup.children.length) select.append(customerGroup);
    select.value = chosen;
    if (select.value !== chosen) select.value = "";
  }

  function clearNewKey() {
    $("new-key-value").textContent = "";
    $("new-key-name").textContent = "";
    $("new-key").hidden = true;
  }

  async function createKey(event) {
    event.preventDefault();
    const form = event.currentTarget;
    const button = form.querySelector("button[type=submit]");
    showError($("create-error"), "");
    clearNewKey();
    const body = { name: $("create-name").value.trim() };
    const [kind, id] = $("create-parent").value.split(":");
    if (kind === "team") body.team_id = id;
    if (kind === "customer") body.customer_id = id;
    const limit = $("create-limit").value.trim();
    if (limit !== "") {
      const amount = Number(limit);
      if (!Number.isFinite(amount) || amount < 0) {
        showError($("create-error"), "The budget is an amount in USD, 0 or more.");
        return;
      }
      body.budgets = [{ max_limit: amount, reset_duration: $("create-period").value || null }];
    }
    button.disabled = true;
    try {
      const answer = await api("virtual-keys", { method: "POST", json: body });
      const key = answer.virtual_key;
      $("new-key-name").textContent = key.name;
      $("new-key-value").textContent = key.value;
      $("new-key").hidden = false;
      form.reset();
      await loadBudgets();
    } catch (exc) {
      if (exc instanceof Unauthorized) signOut(exc.message);
      else showError($("create-error"), exc.message);
    } finally {
      button.disabled = false;
    }
  }

  async function copyNewKey() {
    const value = $("new-key-value").textContent;
    try {
      await navigator.clipboard.writeText(value);
      $("new-key-copy").textContent = "Copied";
    } catch (exc) {
      const range = document.createRange();
      range.selectNodeContents($("new-key-value"));
      window.getSelection().removeAllRanges();
      window.getSelection().addRange(range);
    }
    setTimeout(() => { $("new-key-copy").textContent = "Copy"; }, 1500);
  }

  /* -- wiring ---------------------------------------------------------------------------- */

  function wire() {
    $("login-form").addEventListener("submit", signIn);
    $("signout").addEventListener("click", () => signOut(""));
    $("refresh").addEventListener("click", () => refreshAll());
    $("budget-owner").addEventListener("change", renderBudgets);
    $("budget-search").addEventListener("input", renderBudgets);
    const reloadRange = () => Promise.allSettled([loadChart(), loadTopKeys()])
      .then((results) => results.filter((r) => r.status === "rejected")
        .forEach((r) => handle(r.reason)));
    $("chart-group").addEventListener("change", () => loadChart().catch(handle));
    $("chart-days").addEventListener("change", () => reloadRange());
    $("edit-form").addEventListener("submit", saveEdit);
    $("edit-cancel").addEventListener("click", () => $("edit-dialog").close());
    $("reset-form").addEventListener("submit", confirmReset);
    $("reset-cancel").addEventListener("click", () => $("reset-dialog").close());
    $("create-form").addEventListener("submit", createKey);
    $("new-key-copy").addEventListener("click", copyNewKey);
    $("new-key-done").addEventListener("click", clearNewKey);
    let resizing = null;
    window.addEventListener("resize", () => {
      clearTimeout(resizing);
      resizing = setTimeout(drawChart, 120);
    });
  }

  function handle(exc) {
    if (exc instanceof Unauthorized) signOut(exc.message);
    else showError($("app-error"), exc.message);
  }

  document.addEventListener("DOMContentLoaded", () => {
    wire();
    if (signedIn()) start();
    else showLogin("");
  });
})();
