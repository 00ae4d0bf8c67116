// GREAM Serve demo page: plain JavaScript, no build step, no external resources.
// Streams POST /v1/recommendations/stream with fetch() and a streamed response body (an EventSource
// cannot POST or send the Authorization header), parsing the server-sent events by hand.
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  const els = {
    form: $("request-form"), apiKey: $("api-key"), userId: $("user-id"),
    search: $("item-search"), searchButton: $("search-button"), searchStatus: $("search-status"),
    results: $("search-results"), history: $("history-list"), historyCount: $("history-count"),
    clearHistory: $("clear-history"), k: $("k"), budget: $("reasoning-budget"), excludeSeen: $("exclude-seen"),
    recommend: $("recommend-button"), stop: $("stop-button"), error: $("error"), stats: $("stats"),
    status: $("status"), ttft: $("ttft"), latency: $("latency"), tokens: $("reasoning-tokens"),
    reasoning: $("reasoning"), items: $("items"), model: $("model-info"),
    finishReason: $("finish-reason"), citations: $("citations"),
  };
  // Relative URLs, so the page also works behind a path prefix (it is served at <prefix>/demo).
  const API = { items: "v1/items", stream: "v1/recommendations/stream", ready: "readyz" };
  const history = []; // [{item_id, title}], oldest first
  let controller = null;

  // ------------------------------------------------------------------ helpers
  function headers(extra) {
    const h = Object.assign({}, extra || {});
    const key = els.apiKey.value.trim();
    if (key) h["Authorization"] = "Bearer " + key;
    return h;
  }

  async function errorMessage(resp) {
    let text = "";
    try {
      text = await resp.text();
      const body = JSON.parse(text);
      let msg = body.message || JSON.stringify(body);
      if (body.code) msg = body.code + ": " + msg;
      if (resp.status === 401) msg += " (type the API key into the API key field)";
      return "HTTP " + resp.status + " — " + msg;
    } catch (_) {
      return "HTTP " + resp.status + (text ? " — " + text.slice(0, 300) : "");
    }
  }

  function showError(message) {
    els.error.textContent = message;
    els.error.hidden = false;
  }

  function clearError() {
    els.error.textContent = "";
    els.error.hidden = true;
  }

  function ms(value) {
    return value < 1000 ? Math.round(value) + " ms" : (value / 1000).toFixed(2) + " s";
  }

  function el(tag, className, text) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined) node.textContent = text;
    return node;
  }

  // ------------------------------------------------------------------ model info
  fetch(API.ready).then((r) => r.json()).then((body) => {
    els.model.textContent = body.model_version
      ? "Model " + body.model_version + " · engine " + body.engine + " · " + body.status
      : "Server status: " + body.status;
  }).catch(() => { els.model.textContent = "Server status unknown"; });

  // ------------------------------------------------------------------ search and history
  let searchTimer = null;
  let searchSeq = 0;

  async function runSearch() {
    const q = els.search.value.trim();
    const seq = ++searchSeq;
    if (!q) {
      els.results.replaceChildren();
      els.searchStatus.textContent = "";
      return;
    }
    els.searchStatus.textContent = "Searching…";
    try {
      const resp = await fetch(API.items + "?" + new URLSearchParams({ q, limit: "8" }), { headers: headers() });
      if (seq !== searchSeq) return; // a newer search is under way
      if (!resp.ok) {
        els.results.replaceChildren();
        els.searchStatus.textContent = "";
        showError("Search failed: " + (await errorMessage(resp)));
        return;
      }
      const body = await resp.json();
      if (seq !== searchSeq) return;
      renderResults(body.items);
      els.searchStatus.textContent = body.total === 0 ? "No item matches every word."
        : body.total > body.items.length ? `Showing ${body.items.length} of ${body.total} matches.`
        : `${body.total} match${body.total === 1 ? "" : "es"}.`;
    } catch (err) {
      if (seq === searchSeq) showError("Search failed: " + err.message);
    }
  }

  function renderResults(items) {
    els.results.replaceChildren(...items.map((item) => {
      const li = el("li");
      const text = el("span", "item-text", item.title);
      text.title = item.title + " (" + item.item_id + ")";
      text.append(el("span", "item-id", item.item_id));
      const add = el("button", "secondary small", "Add");
      add.type = "button";
      add.setAttribute("aria-label", "Add " + item.title + " to the history");
      add.addEventListener("click", () => addToHistory(item));
      li.append(text, add);
      return li;
    }));
  }

  function addToHistory(item) {
    history.push({ item_id: item.item_id, title: item.title });
    renderHistory();
  }

  function renderHistory() {
    els.history.replaceChildren(...history.map((item, i) => {
      const li = el("li");
      li.id = "chip-" + item.item_id; // the reasoning's citations link here
      li.tabIndex = -1;
      const text = el("span", "item-text", item.title);
      text.append(el("span", "item-id", item.item_id));
      const remove = el("button", "link small", "Remove");
      remove.type = "button";
      remove.setAttribute("aria-label", "Remove " + item.title + " from the history");
      remove.addEventListener("click", () => { history.splice(i, 1); renderHistory(); });
      li.append(text, remove);
      return li;
    }));
    els.historyCount.textContent = String(history.length);
    els.clearHistory.hidden = history.length === 0;
  }

  els.search.addEventListener("input", () => {
    clearTimeout(searchTimer);
    searchTimer = setTimeout(runSearch, 250);
  });
  els.search.addEventListener("keydown", (ev) => {
    if (ev.key === "Enter") { ev.preventDefault(); clearTimeout(searchTimer); runSearch(); }
  });
  els.searchButton.addEventListener("click", () => { clearTimeout(searchTimer); runSearch(); });
  els.clearHistory.addEventListener("click", () => { history.length = 0; renderHistory(); });

  // ------------------------------------------------------------------ server-sent events
  // Yields {event, data} from a fetch Response whose body is text/event-stream.
  async function* sseEvents(resp) {
    const reader = resp.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    try {
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer += decoder.decode(value, { stream: true }).replace(/\r\n?/g, "\n");
        let cut;
        while ((cut = buffer.indexOf("\n\n")) >= 0) {
          const block = buffer.slice(0, cut);
          buffer = buffer.slice(cut + 2);
          const parsed = parseBlock(block);
          if (parsed) yield parsed;
        }
      }
      const last = parseBlock(buffer + decoder.decode());
      if (last) yield last;
    } finally {
      reader.releaseLock();
    }
  }

  function parseBlock(block) {
    let event = "message";
    const data = [];
    for (const line of block.split("\n")) {
      if (!line || line.startsWith(":")) continue;
      const colon = line.indexOf(":");
      const field = colon < 0 ? line : line.slice(0, colon);
      let value = colon < 0 ? "" : line.slice(colon + 1);
      if (value.startsWith(" ")) value = value.slice(1);
      if (field === "event") event = value;
      else if (field === "data") data.push(value);
    }
    if (!data.length) return null;
    return { event, data: data.join("\n") };
  }

  // ------------------------------------------------------------------ recommending
  function requestBody() {
    const k = Number.parseInt(els.k.value, 10);
    if (!Number.isInteger(k) || k < 1) throw new Error("k must be a whole number of at least 1");
    const body = { k, exclude_seen: els.excludeSeen.checked };
    const budget = els.budget.value.trim();
    if (budget) {
      const n = Number.parseInt(budget, 10);
      if (!Number.isInteger(n) || n < 1) throw new Error("the reasoning budget must be a whole number of at least 1");
      body.max_reasoning_tokens = n;
    }
    const userId = els.userId.value.trim();
    if (userId) body.user_id = userId;
    if (history.length) body.history = history.map((item) => item.item_id);
    return body;
  }

  function resetOutput() {
    clearError();
    els.reasoning.replaceChildren();
    els.citations.replaceChildren();
    els.citations.hidden = true;
    els.finishReason.textContent = "–";
    els.items.replaceChildren();
    els.ttft.textContent = els.latency.textContent = els.tokens.textContent = "–";
    delete els.stats.dataset.ttftMs;
    delete els.stats.dataset.latencyMs;
  }

  function renderItems(items) {
    els.items.replaceChildren(...items.map((item, i) => {
      const li = el("li", "card");
      li.append(el("span", "rank", "#" + (i + 1) + " · " + item.item_id));
      li.append(el("p", "title", item.title));
      const sid = el("code", "semantic-id", item.semantic_id);
      sid.title = "semantic ID";
      li.append(sid);
      const meta = el("div", "meta");
      if (item.fallback) {
        meta.append(el("span", "badge", "popular fallback"));
        meta.append(el("span", "score", "no score"));
      } else {
        meta.append(el("span", "", "log-prob score"));
        const score = el("span", "score", Number(item.score).toFixed(3));
        score.title = String(item.score);
        meta.append(score);
      }
      li.append(meta);
      return li;
    }));
  }

  function setBusy(busy) {
    els.recommend.disabled = busy;
    els.stop.disabled = !busy;
    els.reasoning.setAttribute("aria-busy", busy ? "true" : "false");
    if (!busy) els.reasoning.classList.remove("streaming");
  }

  async function recommend() {
    let body;
    try {
      body = requestBody();
    } catch (err) {
      showError(err.message);
      return;
    }
    resetOutput();
    setBusy(true);
    els.status.textContent = "waiting for the first token…";
    controller = new AbortController();
    const started = performance.now();
    let firstToken = null;
    let finished = false;
    let failed = false;
    let textNode = null;
    try {
      const resp = await fetch(API.stream, {
        method: "POST", signal: controller.signal,
        headers: headers({ "Content-Type": "application/json", "Accept": "text/event-stream" }),
        body: JSON.stringify(body),
      });
      if (!resp.ok) {
        failed = true;
        showError(await errorMessage(resp));
        return;
      }
      for await (const { event, data } of sseEvents(resp)) {
        let payload;
        try { payload = JSON.parse(data); } catch (_) { payload = { message: data }; }
        if (event === "reasoning") {
          if (firstToken === null) {
            firstToken = performance.now() - started;
            els.ttft.textContent = ms(firstToken);
            els.stats.dataset.ttftMs = firstToken.toFixed(1);
            els.status.textContent = "reasoning…";
            els.reasoning.classList.add("streaming");
            textNode = document.createTextNode("");
            els.reasoning.append(textNode);
          }
          textNode.appendData(payload.delta || "");
          els.reasoning.scrollTop = els.reasoning.scrollHeight;
        } else if (event === "items") {
          els.reasoning.classList.remove("streaming");
          if (firstToken === null) {
            els.reasoning.append(el("span", "placeholder",
              payload.items.length && payload.items[0].fallback
                ? "No history: popular items instead (no reasoning)." : "No reasoning text."));
          }
          renderItems(payload.items);
          els.status.textContent = "items received";
        } else if (event === "done") {
          finished = true;
          const total = performance.now() - started;
          els.latency.textContent = ms(total);
          els.latency.title = "server: " + ms(payload.latency_ms) + " · request " + payload.request_id;
          els.stats.dataset.latencyMs = total.toFixed(1);
          els.tokens.textContent = String(payload.reasoning_tokens);
          els.finishReason.textContent = payload.finish_reason === "end_of_thinking" ? "its own end"
            : payload.finish_reason === "length" ? "the budget" : "–";
          renderCitations(payload.citations || []);
          els.status.textContent = "done";
        } else if (event === "error") {
          failed = true;
          showError("The stream failed: " + (payload.code ? payload.code + ": " : "") + (payload.message || data));
          els.status.textContent = "failed";
        }
      }
      if (!finished && !failed) {
        failed = true;
        showError("The stream ended before the answer was complete.");
      }
    } catch (err) {
      failed = true;
      if (err.name === "AbortError") {
        els.status.textContent = "stopped";
      } else {
        showError("Request failed: " + err.message);
      }
    } finally {
      if (failed && els.status.textContent !== "stopped") els.status.textContent = "failed";
      if (els.latency.textContent === "–") els.latency.textContent = ms(performance.now() - started);
      controller = null;
      setBusy(false);
    }
  }

  // "Because you bought X": each section's cited history items, linked to their chips.
  const SECTION_NAMES = { evidence: "Evidence", preference: "Preference", intent: "Intent",
    recommendation: "Recommendation", rewrite: "Denoised history" };

  function renderCitations(citations) {
    const cited = citations.filter((c) => c.item_ids.length);
    els.citations.replaceChildren(...cited.map((c) => {
      const li = el("li", null, SECTION_NAMES[c.section] + " cites ");
      c.item_ids.forEach((id, n) => {
        const chip = history.find((item) => item.item_id === id);
        const link = el("a", "citation", chip ? chip.title : id);
        link.href = "#chip-" + id;
        link.title = id;
        if (n) li.append(", ");
        li.append(link);
      });
      return li;
    }));
    els.citations.hidden = cited.length === 0;
  }

  els.form.addEventListener("submit", (ev) => { ev.preventDefault(); recommend(); });
  els.stop.addEventListener("click", () => { if (controller) controller.abort(); });
})();
