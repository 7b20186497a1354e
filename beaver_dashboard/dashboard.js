// The beaver dashboard: one page, a hash router (#/kind/name), no dependencies, no build step.
//
// Every name, key and value comes from the database and may be hostile: all of them reach the
// page as text nodes (el() appends strings with textContent semantics), never as HTML.
// The bearer token (when the server has one) is kept in sessionStorage and sent in the
// Authorization header, streams included: they are read with fetch(), so it never goes in a URL.
"use strict";

const TOKEN = "beaver.token";
const EDITING = "beaver.editing";
const PAGE = 50;
const KINDS = ["dict", "list", "queue", "blob", "log", "channel", "collection", "lock"];
const ROUTE_OF = {dict: "dicts", list: "lists", queue: "queues", blob: "blobs", log: "logs",
                  channel: "channels", collection: "collections"};
const OPERATORS = "$eq $ne $gt $gte $lt $lte $in $nin $exists $contains $and $or $not";

const main = document.getElementById("main");
let cleanups = [];        // closes the streams of the page shown
let shown = 0;            // the navigation a page load belongs to

// ---- the page's building blocks -------------------------------------------------------------

function el(tag, props, ...children) {
  const node = document.createElement(tag);
  setProps(node, props);
  return add(node, children);
}

function svg(tag, props, ...children) {
  const node = document.createElementNS("http://www.w3.org/2000/svg", tag);
  setProps(node, props);
  return add(node, children);
}

function setProps(node, props) {
  for (const [key, value] of Object.entries(props || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key === "className" ? "class" : key, value === true ? "" : value);
  }
}

function add(node, children) {
  for (const child of children.flat(Infinity)) {
    if (child !== null && child !== undefined && child !== false) {
      const text = typeof child === "object" ? JSON.stringify(child) : String(child);
      node.append(child instanceof Node ? child : text);   // a string becomes a text node
    }
  }
  return node;
}

// JSON.parse keeping integers beyond 2**53 exact: shown, and sent back, as they were written
function parse(text) {
  return JSON.parse(text, JSON.rawJSON ? exactIntegers : undefined);
}

function exactIntegers(key, value, context) {
  return typeof value === "number" && !Number.isSafeInteger(value) && context &&
    /^-?\d+$/.test(context.source) ? JSON.rawJSON(context.source) : value;
}

function hash(...parts) {
  return "#/" + parts.map(encodeURIComponent).join("/");
}

function compact(value) {
  const text = value === undefined ? "" : JSON.stringify(value);
  return text.length > 240 ? text.slice(0, 240) + "…" : text;
}

function valueCell(value) {
  const full = JSON.stringify(value, null, 2) || "";
  return el("td", {className: "value", title: full.length > 4000 ? full.slice(0, 4000) + "…" : full},
            compact(value));
}

function pretty(value) {
  return el("pre", {className: "json"}, JSON.stringify(value, null, 2));
}

function size(bytes) {
  const units = ["B", "KB", "MB", "GB", "TB"];
  let i = 0;
  while (bytes >= 1024 && i < units.length - 1) { bytes /= 1024; i++; }
  return (i ? bytes.toFixed(1) : String(bytes)) + " " + units[i];
}

function seconds(value) {
  if (value === null || value === undefined) return "never";
  if (value < 60) return value.toFixed(value < 10 ? 1 : 0) + " s";
  if (value < 3600) return Math.round(value / 60) + " min";
  if (value < 86400) return (value / 3600).toFixed(1) + " h";
  return (value / 86400).toFixed(1) + " days";
}

function when(epoch) {
  const d = new Date(epoch * 1000);
  const two = (n) => String(n).padStart(2, "0");
  return `${d.getFullYear()}-${two(d.getMonth() + 1)}-${two(d.getDate())} ` +
    `${two(d.getHours())}:${two(d.getMinutes())}:${two(d.getSeconds())}.` +
    String(d.getMilliseconds()).padStart(3, "0");
}

function table(columns, rows, className) {
  return el("table", {className},
    el("thead", {}, el("tr", {}, columns.map((c) => el("th", {}, c)))),
    el("tbody", {}, rows.length ? rows : emptyRow(columns.length)));
}

function emptyRow(span) {
  return el("tr", {}, el("td", {colspan: span, className: "muted"}, "nothing here"));
}

function section(title, ...children) {
  return el("section", {}, el("h2", {}, title), children);
}

function notice(error) {
  const name = error instanceof ApiError ? error.name + ": " : "";
  return el("div", {className: "error"}, name + error.message);
}

function banner(message) {
  const node = document.getElementById("banner");
  node.textContent = message;
  node.hidden = !message;
}

// ---- talking to the server ------------------------------------------------------------------

class ApiError extends Error {
  constructor(status, name, message) {
    super(message);
    this.status = status;
    this.name = name;
  }
}

function authorization() {
  const token = sessionStorage.getItem(TOKEN);
  return token ? {Authorization: "Bearer " + token} : {};
}

function target(segments, query) {
  const params = new URLSearchParams();
  for (const [key, value] of Object.entries(query || {})) {
    if (value !== null && value !== undefined) params.set(key, String(value));
  }
  const text = params.toString();
  return "/" + segments.map(encodeURIComponent).join("/") + (text ? "?" + text : "");
}

function base64(text) {
  let binary = "";
  for (const byte of new TextEncoder().encode(text)) binary += String.fromCharCode(byte);
  return btoa(binary);
}

// fetch() of one route; a name "." or ".." (which a browser resolves away in a URL path)
// travels inside POST /call instead.
async function request(method, segments, {query, body, signal} = {}) {
  const headers = authorization();
  let url = target(segments, query);
  let init = {method, headers, signal};
  if (body !== undefined) {
    headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  if (segments.some((s) => s === "." || s === "..")) {
    const inner = {method, target: url};
    if (init.body !== undefined) inner.body64 = base64(init.body);
    init = {method: "POST", signal, body: JSON.stringify(inner),
            headers: {...authorization(), "Content-Type": "application/json"}};
    url = "/call";
  }
  const response = await fetch(url, init);
  if (response.ok) return response;
  let error = {error: "HTTP " + response.status, message: response.statusText};
  try { error = await response.json(); } catch (ignored) { /* not JSON: keep the status */ }
  if (response.status === 401) login();
  throw new ApiError(response.status, error.error, error.message);
}

async function api(method, segments, options) {
  const response = await request(method, segments, options);
  const text = await response.text();
  return text ? parse(text) : null;
}

function page(kind, name, where) {     // the dashboard's own read routes
  return (offset, limit) => api("GET", ["ui", "api", "page", kind, name],
    {query: {offset, limit, where: where() === null ? null : JSON.stringify(where())}});
}

// Server-sent events read with fetch(): each data line's JSON goes to onData until the page
// changes (the stream is aborted then).
function stream(segments, query, onData, onState) {
  const controller = new AbortController();
  cleanups.push(() => controller.abort());
  (async () => {
    const response = await request("GET", segments, {query, signal: controller.signal});
    onState("live");
    const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    for (;;) {
      const {value, done} = await reader.read();
      if (done) break;
      buffer += value;
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const data = buffer.slice(0, end).split("\n").filter((line) => line.startsWith("data:"))
          .map((line) => line.slice(5).trimStart()).join("\n");
        buffer = buffer.slice(end + 2);
        if (data) onData(parse(data));
      }
    }
    onState("ended");
  })().catch((error) => {
    if (error.name !== "AbortError") onState("stopped: " + error.message);
  });
}

// ---- controls -------------------------------------------------------------------------------

// A write button: shown only with "Allow changes" ticked, and confirmed before it acts.
function writeButton(label, question, action) {
  return el("button", {type: "button", className: "write danger", onclick: async () => {
    if (question && !window.confirm(question)) return;
    try {
      await action();
    } catch (error) {
      banner(error.message);
    }
  }}, label);
}

function clearButton(kind, name, done) {
  return writeButton("Clear", `Remove every item of ${kind} "${name}"?`, async () => {
    await api("DELETE", [ROUTE_OF[kind], name]);
    done();
  });
}

// A table with Previous / Next: load(offset, limit) gives {items, more}.
function pager(columns, load, row) {
  let offset = 0;
  let latest = 0;         // a slow answer to an older click must not overwrite a newer one
  const body = el("tbody");
  const range = el("span", {className: "muted"});
  const problem = el("div");
  const previous = el("button", {type: "button", onclick: () => go(offset - PAGE)}, "‹ Previous");
  const next = el("button", {type: "button", onclick: () => go(offset + PAGE)}, "Next ›");
  async function go(to) {
    offset = Math.max(0, to);
    const mine = ++latest;
    try {
      const found = await load(offset, PAGE);
      if (mine !== latest) return;
      body.replaceChildren(...(found.items.length ? found.items.map((item, i) => row(item, offset + i))
                                                  : [emptyRow(columns.length)]));
      range.textContent = found.items.length ? `${offset + 1}–${offset + found.items.length}` : "";
      previous.disabled = offset === 0;
      next.disabled = !found.more;
      problem.replaceChildren();
    } catch (error) {
      if (mine === latest) problem.replaceChildren(notice(error));
    }
  }
  go(0);
  const node = el("div", {className: "paged"}, problem,
    el("table", {}, el("thead", {}, el("tr", {}, columns.map((c) => el("th", {}, c)))), body),
    el("div", {className: "pager"}, previous, range, next));
  return {node, go, reload: () => go(offset)};
}

// A filter in the query language (README "Queries and filters"): apply(where or null).
function filterBox(apply, example) {
  const input = el("input", {type: "text", name: "where", placeholder: example,
                             "aria-label": "filter", spellcheck: "false"});
  const problem = el("span", {className: "error-text"});
  return el("form", {className: "filter", onsubmit: (event) => {
    event.preventDefault();
    const text = input.value.trim();
    let where = null;
    if (text) {
      try {
        where = parse(text);
      } catch (error) {
        problem.textContent = "not JSON: " + error.message;
        return;
      }
    }
    problem.textContent = "";
    apply(where);
  }}, el("label", {}, "Filter"), input, el("button", {}, "Apply"),
     el("small", {className: "muted", title: OPERATORS}, "JSON filter: " + OPERATORS), problem);
}

function liveLog(title) {
  const state = el("span", {className: "muted state"}, "connecting…");
  const rows = el("tbody");
  const node = section(title, state, el("table", {className: "live"}, rows));
  return {
    node,
    state: (text) => { state.textContent = text; },
    add: (cells) => {
      rows.prepend(el("tr", {}, cells));
      while (rows.children.length > 200) rows.lastChild.remove();
    },
  };
}

// ---- pages ----------------------------------------------------------------------------------

function header(kind, name, ...actions) {
  document.title = `${name} · ${kind} · beaver`;
  document.getElementById("where").textContent = `${kind} ${name}`;
  return el("div", {className: "title"},
    el("h1", {}, el("a", {href: "#/"}, "Overview"), " / ", el("span", {className: "kind"}, kind),
       " ", el("span", {className: "name"}, name)),
    el("div", {className: "actions"}, actions));
}

async function overview() {
  document.title = "beaver";
  document.getElementById("where").textContent = "";
  const info = await api("GET", ["info"]);
  const structures = [...info.structures].sort((a, b) =>
    KINDS.indexOf(a.kind) - KINDS.indexOf(b.kind) || a.name.localeCompare(b.name));
  const rows = structures.map((s) => el("tr", {},
    el("td", {className: "kind"}, s.kind),
    el("td", {className: "name"}, s.kind in ROUTE_OF ? el("a", {href: hash(s.kind, s.name)}, s.name)
                                                     : s.name),
    el("td", {className: "number"}, s.size),
    el("td", {className: "muted"}, s.kind === "lock" ? (s.locked ? "held" : "waiting") : "")));
  return el("div", {},
    el("h1", {}, "Overview"),
    el("dl", {className: "facts"},
      el("dt", {}, "File"), el("dd", {}, info.path),
      el("dt", {}, "Size"), el("dd", {id: "file-size"}, size(info.bytes)),
      el("dt", {}, "Structures"), el("dd", {}, structures.length),
      el("dt", {}, "Versions"), el("dd", {}, `beaver ${info.beaver_version}, schema ${info.schema_version}`)),
    table(["kind", "name", "items", ""], rows));
}

function dictPage(name) {
  let where = null;
  const keys = pager(["key", "value", "TTL left", ""], page("dict", name, () => where),
    (item) => el("tr", {},
      el("td", {className: "key"}, item.key), valueCell(item.value),
      el("td", {className: "number"}, seconds(item.ttl)),
      el("td", {}, writeButton("Delete", `Delete key "${item.key}"?`, async () => {
        await api("DELETE", ["dicts", name, item.key]);
        keys.reload();
      }))));
  return el("div", {}, header("dict", name, clearButton("dict", name, () => keys.go(0))),
    filterBox((w) => { where = w; keys.go(0); }, '{"age": {"$gte": 30}}'), keys.node);
}

function listPage(name) {
  const items = pager(["index", "value"], async (offset, limit) => {
    const {size: length} = await api("GET", ["lists", name]);
    const values = await api("GET", ["lists", name, "slice"],
                             {query: {start: offset, stop: offset + limit}});
    return {items: values, more: offset + limit < length};
  }, (value, index) => el("tr", {}, el("td", {className: "number"}, index), valueCell(value)));
  return el("div", {}, header("list", name, clearButton("list", name, () => items.go(0))),
    items.node);
}

function queuePage(name) {
  const leases = el("div");
  const items = pager(["#", "priority", "queued at", "data"], async (offset, limit) => {
    const found = await page("queue", name, () => null)(offset, limit);
    leases.replaceChildren(section(`Leased: ${found.leased_count}`, table(
      ["priority", "queued at", "data", "lease runs out in"],
      found.leased.map((item) => el("tr", {}, el("td", {className: "number"}, compact(item.priority)),
        el("td", {}, when(item.timestamp)), valueCell(item.data),
        el("td", {className: "number"}, seconds(item.expires_in)))))));
    return found;
  }, (item, index) => el("tr", {}, el("td", {className: "number"}, index + 1),
    el("td", {className: "number"}, compact(item.priority)), el("td", {}, when(item.timestamp)),
    valueCell(item.data)));
  return el("div", {}, header("queue", name, clearButton("queue", name, () => items.go(0))),
    section("Waiting, in the order get() hands them out", items.node), leases);
}

async function download(name, key) {
  const response = await request("GET", ["blobs", name, key]);
  const data = await response.blob();
  // octet-stream and a download attribute: the browser saves it, never renders it here
  const url = URL.createObjectURL(new Blob([data], {type: "application/octet-stream"}));
  const link = el("a", {href: url, download: key.split("/").pop() || "blob"});
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(url), 60000);
}

function blobPage(name) {
  const blobs = pager(["key", "size", "metadata", ""], page("blob", name, () => null),
    (item) => el("tr", {},
      el("td", {className: "key"}, item.key), el("td", {className: "number"}, size(item.size)),
      valueCell(item.metadata),
      el("td", {className: "buttons"},
        el("button", {type: "button", className: "download", onclick: () =>
          download(name, item.key).catch((error) => banner(error.message))}, "Download"),
        writeButton("Delete", `Delete blob "${item.key}"?`, async () => {
          await api("DELETE", ["blobs", name, item.key]);
          blobs.reload();
        }))));
  return el("div", {}, header("blob", name, clearButton("blob", name, () => blobs.go(0))),
    blobs.node);
}

function chart(found) {
  const width = 720, height = 150, left = 40, bottom = 22;
  const counts = found.counts;
  const top = Math.max(1, ...counts);
  const step = (found.end - found.start) / Math.max(1, counts.length);
  const bar = (width - left) / Math.max(1, counts.length);
  const node = svg("svg", {viewBox: `0 0 ${width} ${height + bottom}`, className: "chart",
                           role: "img", "aria-label": "log entries over time"});
  counts.forEach((count, i) => {
    const tall = (count / top) * (height - 4);
    node.append(svg("rect", {x: left + i * bar + 0.5, y: height - tall, height: tall,
                             width: Math.max(0.5, bar - 1)},
      svg("title", {}, `${count} from ${when(found.start + i * step)}`)));
  });
  node.append(
    svg("line", {x1: left, y1: height, x2: width, y2: height, className: "axis"}),
    svg("text", {x: left - 4, y: 10, "text-anchor": "end"}, top),
    svg("text", {x: left - 4, y: height, "text-anchor": "end"}, 0),
    svg("text", {x: left, y: height + 16}, when(found.start)),
    svg("text", {x: width, y: height + 16, "text-anchor": "end"}, when(found.end)));
  return node;
}

function logPage(name) {
  let where = null;
  const drawing = el("div");
  let latest = 0;
  async function draw() {
    const mine = ++latest;
    try {
      const found = await api("GET", ["ui", "api", "chart", name], {query: {buckets: 60,
        where: where === null ? null : JSON.stringify(where)}});
      if (mine !== latest) return;
      const total = found.counts.reduce((a, b) => a + b, 0);
      drawing.replaceChildren(found.counts.length
        ? el("div", {}, el("p", {className: "muted"}, `${total} entries, ${found.counts.length} bars`),
             chart(found))
        : el("p", {className: "muted"}, "no entries"));
    } catch (error) {
      drawing.replaceChildren(notice(error));
    }
  }
  const entries = pager(["time", "data"], async (offset, limit) => {
    const found = await api("GET", ["logs", name, "range"], {query: {order: "desc", offset,
      limit: limit + 1, where: where === null ? null : JSON.stringify(where)}});
    return {items: found.slice(0, limit), more: found.length > limit};
  }, (entry) => el("tr", {}, el("td", {className: "time"}, when(entry.timestamp)),
                   valueCell(entry.data)));
  const tail = liveLog("Live tail (entries logged from now on)");
  stream(["events", "log", name], {event: "log"},
         (event) => tail.add([el("td", {className: "time"}, when(event.timestamp)),
                              valueCell(event.data)]), tail.state);
  draw();
  return el("div", {}, header("log", name, clearButton("log", name, () => { entries.go(0); draw(); })),
    filterBox((w) => { where = w; entries.go(0); draw(); }, '{"status": {"$gte": 500}}'),
    section("Entries over time", drawing), tail.node, section("Entries, newest first", entries.node));
}

function channelPage(name) {
  const history = el("div");
  async function loadHistory() {
    try {
      const messages = await api("GET", ["channels", name, "history"], {query: {limit: PAGE}});
      history.replaceChildren(table(["message"], messages.reverse().map((m) => el("tr", {},
        valueCell(m)))));
    } catch (error) {
      history.replaceChildren(notice(error));
    }
  }
  const tail = liveLog("Live tail (messages published from now on)");
  stream(["channels", name, "sse"], {}, (message) => tail.add([valueCell(message)]), tail.state);
  const input = el("input", {type: "text", name: "message", placeholder: '{"event": "hello"}',
                             "aria-label": "message"});
  const publish = el("form", {className: "write publish", onsubmit: async (event) => {
    event.preventDefault();
    let message = input.value;
    try { message = parse(message); } catch (notJson) { /* sent as a string */ }
    try {
      await api("POST", ["channels", name, "publish"], {body: message});
      input.value = "";
    } catch (error) {
      banner(error.message);
    }
  }}, el("label", {}, "Publish"), input, el("button", {}, "Publish"));
  loadHistory();
  return el("div", {}, header("channel", name, clearButton("channel", name, loadHistory)),
    publish, tail.node, section(`Retained messages (the last ${PAGE}), newest first`, history));
}

function hitsTable(name, hits, scoreName) {
  return table(["document", scoreName, "text"], hits.map((hit) => el("tr", {},
    el("td", {className: "key"}, el("a", {href: hash("document", name, hit.document.id)},
                                     hit.document.id)),
    el("td", {className: "number"}, hit.score.toFixed(4)),
    hit.snippet !== undefined ? el("td", {className: "value"}, hit.snippet)
                              : valueCell(hit.document.body))), "hits");
}

function documentRow(name) {
  return (doc) => el("tr", {},
    el("td", {className: "key"}, el("a", {href: hash("document", name, doc.id)}, doc.id)),
    valueCell(doc.body), el("td", {className: "number"}, doc.dimensions ?? ""));
}

function collectionPage(name) {
  let where = null;
  const documents = pager(["id", "body", "vector"], async (offset, limit) => {
    if (where === null) return page("collection", name, () => null)(offset, limit);
    const found = await api("POST", ["collections", name, "find"],
                            {body: {where, limit: limit + 1, offset}});
    const items = found.map((d) => (Array.isArray(d) ? d[1] : d)).map((d) =>
      ({id: d.id, body: d.body, dimensions: d.embedding ? d.embedding.length : null}));
    return {items: items.slice(0, limit), more: items.length > limit};
  }, documentRow(name));
  const filters = el("div", {hidden: true});
  // The filter lights up where the server has POST /collections/{name}/find
  api("POST", ["collections", name, "find"], {body: {limit: 1}}).then(
    () => { filters.hidden = false; },
    (error) => { filters.hidden = error.status === 404 && error.name === "NotFound"; });
  filters.append(filterBox((w) => { where = w; documents.go(0); }, '{"lang": "en"}'));
  const results = el("div", {className: "results"});
  const query = el("input", {type: "search", name: "query", placeholder: "words, \"a phrase\", pre*",
                             "aria-label": "text search"});
  const fuzziness = el("select", {name: "fuzziness", "aria-label": "typos allowed"},
    el("option", {value: "0"}, "exact words"), el("option", {value: "1"}, "1 typo"),
    el("option", {value: "2"}, "2 typos"));
  const search = el("form", {className: "search", onsubmit: async (event) => {
    event.preventDefault();
    try {
      const hits = await api("POST", ["collections", name, "match"], {body: {
        query: query.value, fuzziness: Number(fuzziness.value), top_k: 20, highlight: true}});
      results.replaceChildren(el("p", {className: "muted"}, `${hits.length} found`),
                              hitsTable(name, hits, "relevance"));
    } catch (error) {
      results.replaceChildren(notice(error));
    }
  }}, el("label", {}, "Text search"), query, fuzziness, el("button", {}, "Search"));
  return el("div", {}, header("collection", name, clearButton("collection", name, () => documents.go(0))),
    search, results, filters, section("Documents", documents.node));
}

async function documentPage(name, id) {
  const doc = await api("GET", ["collections", name, "documents", id]);
  const edges = await api("GET", ["collections", name, "edges"],
                          {query: {document: id, direction: "both"}});
  const similar = el("div", {className: "similar"});
  if (doc.embedding) {
    api("POST", ["collections", name, "search"], {body: {vector: doc.embedding, top_k: 11}})
      .then((hits) => similar.replaceChildren(
        hitsTable(name, hits.filter((hit) => hit.document.id !== id).slice(0, 10), "distance")),
      (error) => similar.replaceChildren(notice(error)));
  }
  const graph = table(["", "label", "document", "metadata"], edges.map((edge) => {
    const out = edge.source === id;
    const other = out ? edge.target : edge.source;
    return el("tr", {}, el("td", {className: "muted"}, out ? "→" : "←"),
      el("td", {}, edge.label), el("td", {className: "key"},
        el("a", {href: hash("document", name, other)}, other)),
      edge.metadata === null ? el("td") : valueCell(edge.metadata));
  }), "graph");
  const remove = writeButton("Delete", `Delete document "${id}"?`, async () => {
    await api("DELETE", ["collections", name, "documents", id]);
    location.hash = hash("collection", name);
  });
  const title = header("document", id, remove);
  title.querySelector("h1").replaceChildren(el("a", {href: "#/"}, "Overview"), " / ",
    el("a", {href: hash("collection", name)}, name), " / ", el("span", {className: "name"}, id));
  return el("div", {}, title, section("Body", pretty(doc.body)),
    section(`Graph neighbours (${edges.length} edges)`, graph),
    section("More like this (nearest vectors)", doc.embedding
      ? [el("p", {className: "muted"}, `${doc.embedding.length} dimensions`), similar]
      : el("p", {className: "muted"}, "this document has no vector")));
}

// ---- routing and the token ------------------------------------------------------------------

const PAGES = {dict: dictPage, list: listPage, queue: queuePage, blob: blobPage, log: logPage,
               channel: channelPage, collection: collectionPage, document: documentPage};

function closeStreams() {
  for (const stop of cleanups.splice(0)) stop();
}

async function show() {
  closeStreams();
  const mine = ++shown;
  banner("");
  let parts;
  try {
    parts = location.hash.replace(/^#\/?/, "").split("/").map(decodeURIComponent);
  } catch (error) {
    parts = [""];
  }
  const [kind, ...names] = parts;
  const render = PAGES[kind] && names.length ? PAGES[kind] : overview;
  main.replaceChildren(el("p", {className: "muted"}, "Loading…"));
  try {
    const node = await render(...names);
    if (mine === shown) main.replaceChildren(node);
  } catch (error) {
    if (mine === shown && !(error instanceof ApiError && error.status === 401)) {
      main.replaceChildren(notice(error));
    }
  }
}

function login() {
  if (document.querySelector("form.login")) return;      // already asking
  closeStreams();
  shown++;
  const had = sessionStorage.getItem(TOKEN) !== null;
  sessionStorage.removeItem(TOKEN);
  document.getElementById("forget").hidden = true;
  const input = el("input", {type: "password", name: "token", autocomplete: "current-password",
                             "aria-label": "token", required: true});
  main.replaceChildren(el("form", {className: "login", onsubmit: (event) => {
    event.preventDefault();
    sessionStorage.setItem(TOKEN, input.value);
    document.getElementById("forget").hidden = false;
    show();
  }}, el("h1", {}, "This server wants its token"),
     el("p", {}, had ? "That token was refused." : "Enter the server's bearer token " +
       "(--token or BEAVER_TOKEN). It is kept in this tab only (sessionStorage) and sent in the " +
       "Authorization header."),
     input, el("button", {}, "Open")));
  input.focus();
}

function start() {
  const editing = document.getElementById("editing");
  editing.checked = sessionStorage.getItem(EDITING) === "1";
  document.body.classList.toggle("editing", editing.checked);
  editing.addEventListener("change", () => {
    sessionStorage.setItem(EDITING, editing.checked ? "1" : "0");
    document.body.classList.toggle("editing", editing.checked);
  });
  const forget = document.getElementById("forget");
  forget.hidden = sessionStorage.getItem(TOKEN) === null;
  forget.addEventListener("click", () => {
    sessionStorage.removeItem(TOKEN);
    location.reload();
  });
  window.addEventListener("hashchange", show);
  // leaving the page closes its streams (a kept page would hold them open); coming back
  // from the browser's back-forward cache opens them again
  window.addEventListener("pagehide", closeStreams);
  window.addEventListener("pageshow", (event) => { if (event.persisted) show(); });
  window.addEventListener("unhandledrejection", (event) => banner(String(event.reason)));
  show();
}

start();
