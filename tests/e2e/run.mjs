#!/usr/bin/env node
// End-to-end test of the Compactor desktop app: the real app binary in the real WebKitGTK
// webview, driven through tauri-driver + WebKitWebDriver under Xvfb, over plain W3C WebDriver
// HTTP (no npm packages needed).
//
//   node tests/e2e/run.mjs [--app PATH] [--out DIR] [--update-docs]
//
// Flow: a bad path shows an error in words → open the bundled model → Layers (spectra) →
// a layer (charts, hover readouts) → edit the plan (group method, override, save the plan JSON)
// → run it (progress, then results) → compare → save the HTML + PDF report and check the files.
// A screenshot of every screen goes to OUT/screens; --update-docs copies them to docs/images.

import { spawn, spawnSync } from "node:child_process";
import fs from "node:fs";
import net from "node:net";
import os from "node:os";
import path from "node:path";

const repo = path.resolve(path.dirname(new URL(import.meta.url).pathname), "../..");
const args = process.argv.slice(2);
const opt = (name, dflt) => {
  const i = args.indexOf(name);
  return i >= 0 ? args[i + 1] : dflt;
};
const targetDir = process.env.CARGO_TARGET_DIR || path.join(os.homedir(), ".cache/compactor/target");
const app = path.resolve(opt("--app", process.env.COMPACTOR_APP_BIN || path.join(targetDir, "debug/compactor-app")));
const out = path.resolve(opt("--out", path.join(repo, "out/e2e")));
const updateDocs = args.includes("--update-docs") || process.env.E2E_UPDATE_DOCS === "1";
const shots = path.join(out, "screens");
const t0 = Date.now();
const procs = [];
let failures = 0;

function log(...a) {
  console.log(`[e2e ${((Date.now() - t0) / 1000).toFixed(1).padStart(6)} s]`, ...a);
}
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

function freePort() {
  return new Promise((resolve, reject) => {
    const s = net.createServer();
    s.listen(0, "127.0.0.1", () => {
      const p = s.address().port;
      s.close(() => resolve(p));
    });
    s.on("error", reject);
  });
}

function start(cmd, argv, env, name) {
  const logFile = fs.openSync(path.join(out, `${name}.log`), "w");
  const p = spawn(cmd, argv, { env, stdio: ["ignore", logFile, logFile], detached: true });
  p.on("error", (e) => log(`${name} failed to start: ${e.message}`));
  procs.push({ p, name });
  return p;
}

function stopAll() {
  for (const { p, name } of procs.reverse()) {
    if (p.exitCode === null) {
      try {
        process.kill(-p.pid, "SIGTERM"); // its process group: tauri-driver's WebKitWebDriver and the app too
      } catch {
        try { p.kill("SIGTERM"); } catch { /* gone */ }
      }
      log(`stopped ${name}`);
    }
  }
}

// ---- WebDriver over HTTP
let base = "";
let sid = "";
const ELEM = "element-6066-11e4-a52e-4f735466cecf";

const debug = process.env.E2E_DEBUG === "1";
async function wd(method, url, body) {
  if (debug) log(`-> ${method} ${url} ${body === undefined ? "" : JSON.stringify(body).slice(0, 160)}`);
  const r = await fetch(`${base}${url}`, { method, headers: { "content-type": "application/json" }, body: body === undefined ? undefined : JSON.stringify(body), signal: AbortSignal.timeout(120000) });
  const j = await r.json().catch(() => ({}));
  if (!r.ok) throw new Error(`${method} ${url}: ${r.status} ${JSON.stringify(j.value ?? j).slice(0, 400)}`);
  return j.value;
}
const s = (u) => `/session/${sid}${u}`;
async function find(css) {
  const v = await wd("POST", s("/element"), { using: "css selector", value: css });
  return v[ELEM];
}
async function findAll(css) {
  const v = await wd("POST", s("/elements"), { using: "css selector", value: css });
  return v.map((e) => e[ELEM]);
}
const text = async (id) => wd("GET", s(`/element/${id}/text`));
const click = async (css) => wd("POST", s(`/element/${await find(css)}/click`), {});
const exec = (script, a = []) => wd("POST", s("/execute/sync"), { script, args: a });
async function type(css, value) {
  const id = await find(css);
  await wd("POST", s(`/element/${id}/clear`), {});
  await wd("POST", s(`/element/${id}/value`), { text: value });
}
/** Sets a form control's value from script and fires the events a user's change would. */
async function setValue(css, value) {
  const ok = await exec(
    `const el = document.querySelector(arguments[0]); if (!el) return false; el.value = arguments[1];
     el.dispatchEvent(new Event('input', {bubbles: true})); el.dispatchEvent(new Event('change', {bubbles: true})); return true;`,
    [css, value],
  );
  if (!ok) throw new Error(`no element ${css}`);
}
async function hover(css, fx, fy) {
  const id = await find(css);
  const rect = await wd("GET", s(`/element/${id}/rect`));
  const x = Math.round((fx - 0.5) * rect.width), y = Math.round((fy - 0.5) * rect.height);
  await wd("POST", s("/actions"), {
    actions: [{ type: "pointer", id: "mouse", parameters: { pointerType: "mouse" }, actions: [{ type: "pointerMove", duration: 50, origin: { [ELEM]: id }, x, y }, { type: "pause", duration: 100 }] }],
  });
}
async function waitFor(what, f, timeoutMs = 30000) {
  const end = Date.now() + timeoutMs;
  let last;
  while (Date.now() < end) {
    try {
      const v = await f();
      if (v) return v;
    } catch (e) {
      last = e;
    }
    await sleep(150);
  }
  const err = await exec("const e = document.getElementById('error-text'); return e ? e.textContent : '';").catch(() => "");
  throw new Error(`timed out waiting for ${what}${err ? `; the app says: ${err}` : ""}${last ? ` (${last.message})` : ""}`);
}
const textOf = (css) => exec("const e = document.querySelector(arguments[0]); return e ? e.textContent : null;", [css]);
async function screenshot(name) {
  // let the page paint what the last step changed (WebKit returns the last painted frame)
  await exec("return new Promise((r) => requestAnimationFrame(() => requestAnimationFrame(() => r(true))));").catch(() => {});
  await sleep(400);
  const png = Buffer.from(await wd("GET", s("/screenshot")), "base64");
  const f = path.join(shots, `${name}.png`);
  fs.writeFileSync(f, png);
  log(`screenshot ${path.relative(repo, f)} (${png.length} bytes)`);
}

async function step(name, f) {
  const t = Date.now();
  try {
    await f();
    log(`ok   ${name} (${((Date.now() - t) / 1000).toFixed(1)} s)`);
  } catch (e) {
    failures++;
    log(`FAIL ${name}: ${e.message}`);
    try { await screenshot(`failed-${name.replace(/\W+/g, "-")}`); } catch { /* no session */ }
    throw e;
  }
}
function check(cond, what) {
  if (!cond) throw new Error(`check failed: ${what}`);
}

// ---- main
async function main() {
  if (!fs.existsSync(app)) throw new Error(`app binary not found: ${app} (build it: npm run build in ui/, then cargo build -p compactor-app)`);
  for (const tool of ["Xvfb", "tauri-driver", "WebKitWebDriver"]) {
    if (spawnSync("sh", ["-c", `command -v ${tool}`]).status !== 0) throw new Error(`${tool} is not installed (scripts/install-deps.sh installs it)`);
  }
  fs.rmSync(out, { recursive: true, force: true });
  fs.mkdirSync(shots, { recursive: true });
  const home = fs.mkdtempSync(path.join(os.tmpdir(), "compactor-e2e-"));
  const display = `:${90 + Math.floor(Math.random() * 400)}`;
  const env = {
    ...process.env,
    DISPLAY: display,
    XDG_RUNTIME_DIR: path.join(home, "xdg"),
    XDG_CONFIG_HOME: path.join(home, "config"),
    XDG_DATA_HOME: path.join(home, "data"),
    XDG_CACHE_HOME: path.join(home, "cache"),
    COMPACTOR_APP_RUNS: path.join(out, "runs"),
    NO_AT_BRIDGE: "1",
  };
  fs.mkdirSync(env.XDG_RUNTIME_DIR, { recursive: true, mode: 0o700 });
  start("Xvfb", [display, "-screen", "0", "1280x800x24", "-nolisten", "tcp"], env, "xvfb");
  await sleep(700);
  const port = await freePort();
  const nativePort = await freePort();
  start("tauri-driver", ["--port", String(port), "--native-port", String(nativePort)], env, "tauri-driver");
  base = `http://127.0.0.1:${port}`;
  await waitFor("tauri-driver", async () => (await fetch(`${base}/status`).catch(() => null))?.ok !== undefined, 15000);

  log(`app ${app}`);
  const v = await wd("POST", "/session", { capabilities: { alwaysMatch: { "tauri:options": { application: app } } } });
  sid = v.sessionId;
  log(`session ${sid}`);
  await wd("POST", s("/window/rect"), { x: 0, y: 0, width: 1280, height: 800 }).catch(() => {});
  await waitFor("the app's first screen", async () => (await textOf("#open-bundled")) !== null, 30000);

  await step("a bad path is reported in words", async () => {
    await type("#model-path", "/nonexistent/model");
    await click("#open-path");
    const t = await waitFor("an error message", () => textOf("#error-text"), 10000);
    check(/nonexistent/.test(t) && /Cannot open/.test(t), `error text names the path: ${t}`);
    await screenshot("00-error");
    await click(".banner-close");
  });

  await step("open the bundled model", async () => {
    await click("#open-bundled");
    await waitFor("the inventory", async () => (await textOf("#model-name")) === "granite-tiny", 30000);
    const roles = await findAll("#role-table tbody tr");
    check(roles.length === 7, `7 role groups (got ${roles.length})`);
    await screenshot("01-open");
  });

  await step("layers: spectra of every layer", async () => {
    await click("#nav-layers");
    await waitFor("all spectra", async () => /computed/.test((await textOf("#spectra-progress")) ?? ""), 60000);
    const rows = await findAll("#layers-table tbody tr");
    check(rows.length === 42, `42 linear layers (got ${rows.length})`);
    await waitFor("energy at the plan's rank", async () => /%/.test((await textOf('#layers-table tbody tr[data-layer="model.layers.0.self_attn.q_proj"] td:nth-child(8)')) ?? ""), 20000);
    // sort by stable rank
    await click("#layers-table th:nth-child(6)");
    await screenshot("02-layers");
  });

  await step("layer view: charts and hover readouts", async () => {
    await click("#nav-layers");
    await click('#layers-table tr[data-layer="model.layers.2.mlp.down_proj"] td:nth-child(2)');
    await waitFor("the layer's charts", async () => (await textOf("#lv-ready")) !== null, 120000);
    check(/down_proj/.test(await textOf("#lv-ready")), "the chosen layer is shown");
    await hover("#heatmap-img", 0.45, 0.5);
    await waitFor("heatmap readout", async () => /row \d+, col \d+/.test((await textOf("#heatmap-readout")) ?? ""), 10000);
    await hover("#spectrum-img", 0.3, 0.5);
    await waitFor("spectrum readout", async () => /i = \d+/.test((await textOf("#spectrum-readout")) ?? ""), 10000);
    await screenshot("03-layer");
  });

  const planFile = path.join(out, "plan.json");
  await step("plan: edit, preview, save", async () => {
    await click("#nav-plan");
    await waitFor("the preview", async () => (await textOf("#pv-params")) !== null, 30000);
    await setValue("#plan-ratio", "0.5");
    await setValue("#plan-group-k", "dense"); // keep k_proj dense
    await click("#plan-add-override");
    await setValue("#plan-overrides tbody tr:first-child select:first-of-type", "model.layers.0.mlp.down_proj");
    await setValue("#plan-overrides tbody tr:first-child td:nth-child(2) select", "svd");
    await setValue("#plan-overrides tbody tr:first-child input", "80");
    await waitFor("the preview of the edited plan", async () => /"model.layers.0.mlp.down_proj"/.test((await textOf("#plan-json")) ?? ""), 15000);
    const pj = JSON.parse(await textOf("#plan-json"));
    check(pj.rules.some((r) => r.match === "model.layers.*.self_attn.k_proj" && r.method === "dense"), "k_proj kept dense");
    check(pj.rules.some((r) => r.match === "model.layers.0.mlp.down_proj" && r.ratio === 0.8), "override with ratio 0.8");
    await type("#plan-path", planFile);
    await click("#plan-save");
    await waitFor("the saved plan", async () => fs.existsSync(planFile), 10000);
    const saved = JSON.parse(fs.readFileSync(planFile, "utf8"));
    check(saved.version === 1 && saved.target.param_ratio === 0.5 && saved.rules.length === 2, `saved plan: ${JSON.stringify(saved)}`);
    await exec("document.getElementById('content').scrollTop = 0;");
    await sleep(300);
    await screenshot("04-plan");
  });

  await step("run: compress and evaluate", async () => {
    await click("#nav-run");
    await setValue("#run-windows", "8");
    await type("#run-name", "svd-50-kdense");
    await click("#run-start");
    await waitFor("progress", async () => (await textOf("#run-stage")) !== null, 10000);
    await waitFor("the result", async () => (await textOf("#run-result-table")) !== null, 300000);
    const t = await textOf("#run-result-table");
    check(/perplexity/.test(t), "perplexity row");
    const layers = await findAll("#run-log .log-line:not(.note)");
    check(layers.length === 42, `42 layers in the run log (got ${layers.length})`);
    await screenshot("05-run");
  });

  await step("a second variant (tensor train) for the comparison", async () => {
    await click("#nav-plan");
    await setValue("#plan-method", "tt");
    await setValue("#plan-group-k", "default");
    await click("#plan-overrides button.link"); // remove the override
    await click("#nav-run");
    await type("#run-name", "tt-50");
    await click("#run-start");
    await waitFor("the second result", async () => /tt-50/.test((await textOf("#run-result-card h3")) ?? ""), 300000);
  });

  await step("a run can be cancelled, and leaves no variant behind", async () => {
    // CP-ALS over every layer takes minutes here: the stop lands while compressing
    await click("#nav-plan");
    await setValue("#plan-method", "cp");
    await click("#nav-run");
    await type("#run-name", "to-be-cancelled");
    const root = await exec("return document.getElementById('run-root').value;");
    await click("#run-start");
    await waitFor("a layer done", async () => (await findAll("#run-log .log-line:not(.note)")).length > 0, 120000);
    await click("#run-cancel");
    await waitFor("the run to stop", async () => (await textOf("#run-state")) === "stopped", 180000);
    check(/stopped/.test((await textOf("#run-progress")) ?? ""), "the progress card says the run stopped");
    check((await textOf("#error-text")) === null, "a stop the user asked for is not shown as an error");
    // neither the variant nor its temporary folder is left anywhere under the runs folder
    const left = [];
    const walk = (d, depth) => {
      for (const e of fs.readdirSync(d, { withFileTypes: true })) {
        if (e.name.includes("to-be-cancelled")) left.push(path.join(d, e.name));
        if (e.isDirectory() && depth < 2) walk(path.join(d, e.name), depth + 1);
      }
    };
    walk(root, 0);
    check(left.length === 0, `nothing of the cancelled run under ${root}: ${left.join(", ")}`);
  });

  const html = path.join(out, "report", "compactor-report.html");
  const pdf = html.replace(/\.html$/, ".pdf");
  await step("compare and save the report", async () => {
    await click("#nav-compare");
    await waitFor("the comparison table", async () => (await findAll("#compare-table tbody tr")).length === 3, 120000);
    await type("#report-path", html);
    await click("#report-save");
    await waitFor("the saved report", async () => (await textOf("#report-pdf")) !== null, 180000);
    const h = fs.readFileSync(html, "utf8");
    check(/^<!doctype html>/i.test(h.trimStart()) && /<\/html>\s*$/i.test(h), "the HTML is a whole document");
    check(h.includes("svd-50-kdense") && h.includes("tt-50"), "the HTML names both variants");
    check(/data:image\/png;base64,/.test(h), "the HTML has its charts inline");
    const p = fs.readFileSync(pdf);
    check(p.subarray(0, 5).toString() === "%PDF-" && p.includes(Buffer.from("%%EOF")), "the PDF has a header and a trailer");
    const info = spawnSync("pdfinfo", [pdf], { encoding: "utf8" });
    if (info.status === 0) {
      check(/Pages:\s+[1-9]/.test(info.stdout), "pdfinfo reads pages");
      const txt = spawnSync("pdftotext", [pdf, "-"], { encoding: "utf8" }).stdout ?? "";
      check(txt.includes("svd-50-kdense"), "the PDF text names the variant");
    }
    await exec("document.getElementById('content').scrollTop = 0;");
    await screenshot("06-compare");
  });

  await wd("DELETE", s(""), undefined).catch(() => {});
  sid = "";
}

for (const sig of ["SIGINT", "SIGTERM", "SIGHUP"]) {
  process.on(sig, () => {
    log(`${sig}: stopping`);
    stopAll();
    process.exit(130);
  });
}

let ok = false;
try {
  await main();
  ok = failures === 0;
} catch (e) {
  log(`error: ${e.message}`);
} finally {
  if (sid) await wd("DELETE", s("")).catch(() => {});
  stopAll();
}
if (ok && updateDocs) {
  const docs = path.join(repo, "docs/images");
  for (const [from, to] of [["01-open", "app-open"], ["02-layers", "app-layers"], ["03-layer", "app-layer"], ["04-plan", "app-plan"], ["05-run", "app-run"], ["06-compare", "app-compare"]]) {
    fs.copyFileSync(path.join(shots, `${from}.png`), path.join(docs, `${to}.png`));
  }
  log("copied the screenshots to docs/images/app-*.png");
}
log(ok ? `PASS: the app end to end in ${((Date.now() - t0) / 1000).toFixed(0)} s` : "FAILED (logs and screenshots in " + out + ")");
process.exit(ok ? 0 : 1);
