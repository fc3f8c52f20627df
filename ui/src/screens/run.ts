// Run: compress with the current plan (per-layer progress, elapsed, ETA, cancel), then evaluate.
import { api, errorText, newJob, type JobEvent, type RunOutcome } from "../api";
import { baseName, bytes, clear, count, h, num, pct, secs } from "../dom";
import { guard, header, navigate, refreshNav, register, showError, type Screen } from "../shell";
import { state } from "../state";
import { currentPlan } from "./plan";

const el = h("section");
const nameInput = h("input", { id: "run-name", type: "text", class: "small-text", spellcheck: "false" }) as HTMLInputElement;
const windowsInput = h("input", { id: "run-windows", type: "number", min: "1", max: "1000", value: "16", class: "small" }) as HTMLInputElement;
const textInput = h("input", { id: "run-text", type: "text", class: "path", spellcheck: "false" }) as HTMLInputElement;
const rootInput = h("input", { id: "run-root", type: "text", class: "path", spellcheck: "false" }) as HTMLInputElement;
const startBtn = h("button", { class: "primary", id: "run-start" }, "Run") as HTMLButtonElement;
const cancelBtn = h("button", { id: "run-cancel", disabled: true }, "Cancel") as HTMLButtonElement;
const progressBox = h("div", { id: "run-progress", class: "card" });
const resultBox = h("div", { id: "run-result" });
let job: string | null = null;
let running = false;

interface Live {
  stage: string;
  done: number;
  total: number;
  elapsed: number;
  stageElapsed: number;
  t0: number;
  layers: { name: string; text: string }[];
  notes: string[];
}
let live: Live | null = null;
let ticker = 0;

function suggestedName(): string {
  const d = state.plan;
  const q = d.quant === "none" ? "" : `-${d.quant}`;
  const aa = d.activationAware ? "aa-" : "";
  return d.method === "dense" ? `dense${q}` : `${aa}${d.method}${q}-${Math.round(d.ratio * 100)}`;
}

function planSummary(): string {
  const d = state.plan;
  const groups = Object.entries(d.groups).filter(([, m]) => m !== "default").map(([r, m]) => `${r}: ${m}`);
  const parts = [`${d.method} keeping ${pct(d.ratio, 0)}`, d.quant !== "none" ? d.quant : "", d.allocation !== "uniform" ? `${d.allocation} allocation` : "", d.activationAware ? "activation-aware" : "", groups.length ? groups.join(", ") : "", d.overrides.length ? `${d.overrides.length} override(s)` : ""];
  return parts.filter(Boolean).join(" · ");
}

function renderProgress(): void {
  if (!live) {
    clear(progressBox, h("p", { class: "muted" }, "Press Run to compress the model with this plan, then measure perplexity and speed of the original and of the result."));
    return;
  }
  const L = live;
  const frac = L.total > 0 ? Math.min(1, L.done / L.total) : 0;
  const elapsed = running ? (performance.now() - L.t0) / 1000 : L.elapsed;
  const eta = frac > 0 && frac < 1 ? (L.stageElapsed / frac) * (1 - frac) : NaN;
  const bar = h("div", { class: "bar big" }, h("div", { class: "bar-fill" }));
  (bar.firstChild as HTMLElement).style.setProperty("width", `${100 * frac}%`);
  clear(
    progressBox,
    h("div", { class: "run-stage" }, h("b", { id: "run-stage" }, L.stage || "starting"), h("span", { class: "muted" }, L.total ? `  ${L.done} / ${L.total}` : "")),
    bar,
    h("div", { class: "run-times" }, h("span", { id: "run-elapsed" }, `elapsed ${secs(elapsed)}`), h("span", null, Number.isFinite(eta) ? `stage ETA ${secs(eta)}` : running ? "ETA —" : ""), h("span", { id: "run-state", class: running ? "" : "ok" }, running ? "running" : "finished")),
    h("div", { class: "run-log", id: "run-log" }, L.layers.slice(-200).map((l) => h("div", { class: "log-line" }, h("span", { class: "check" }, "✓"), h("span", { class: "mono" }, l.name), h("span", { class: "muted" }, l.text))), L.notes.slice(-4).map((n) => h("div", { class: "log-line note" }, n))),
  );
  const log = progressBox.querySelector(".run-log");
  if (log) log.scrollTop = log.scrollHeight;
}

function onEvent(e: JobEvent): void {
  if (!live) return;
  if (e.kind === "stage") {
    live.stage = e.stage;
    live.total = e.total;
    live.done = 0;
    live.stageElapsed = 0;
  } else if (e.kind === "progress") {
    live.stage = e.stage;
    live.done = e.done;
    live.total = e.total;
    live.elapsed = e.elapsed;
    live.stageElapsed = e.stage_elapsed;
    if (e.stage === "compress" && e.msg) {
      const [name, ...rest] = e.msg.split(" ");
      live.layers.push({ name: name.replace(/^model\./, ""), text: rest.join(" ") });
    }
  } else if (e.kind === "note") {
    live.notes.push(e.text);
  }
  renderProgress();
}

function resultTable(r: RunOutcome): HTMLElement {
  const o = r.original, v = r.variant;
  const row = (k: string, a: string, b: string, c: string) => h("tr", null, h("th", null, k), h("td", { class: "num" }, a), h("td", { class: "num" }, b), h("td", { class: "num" }, c));
  const rel = (a: number, b: number) => (a > 0 ? `${b / a >= 1 ? "+" : ""}${num(100 * (b / a - 1), 1)}%` : "—");
  return h(
    "div",
    { class: "card", id: "run-result-card" },
    h("h3", null, `Result: ${v.name}`, h("span", { class: "muted" }, `  in ${secs(r.seconds)} · ${baseName(r.variant_dir)}`)),
    h(
      "table",
      { class: "grid result", id: "run-result-table" },
      h("thead", null, h("tr", null, h("th", null, ""), h("th", { class: "num" }, "original"), h("th", { class: "num" }, v.name), h("th", { class: "num" }, "change"))),
      h(
        "tbody",
        null,
        row("perplexity", num(o.perplexity, 3), num(v.perplexity, 3), rel(o.perplexity, v.perplexity)),
        row("parameters", count(o.params), count(v.params), rel(o.params, v.params)),
        row("linear-layer parameters", count(o.linear_params), count(v.linear_params), pct(r.linear_param_ratio) + " kept"),
        row("bytes on disk", bytes(o.bytes), bytes(v.bytes), rel(o.bytes, v.bytes)),
        row("decode tokens/s", num(o.decode_tokens_per_s, 1), num(v.decode_tokens_per_s, 1), rel(o.decode_tokens_per_s, v.decode_tokens_per_s)),
        row("mean layer error", "—", num(v.mean_rel_error, 4), ""),
      ),
    ),
    h("p", { class: "muted" }, `Perplexity over ${o.tokens_scored} tokens (${windowsInput.value} windows of 256). Written to ${r.variant_dir}`),
    h("div", { class: "next-row" }, h("button", { onclick: () => navigate("plan") }, "← Change the plan"), h("button", { class: "primary", id: "go-compare", onclick: () => navigate("compare") }, "Compare all variants →")),
  );
}

async function start(): Promise<void> {
  if (running || !state.model) return;
  running = true;
  startBtn.disabled = true;
  cancelBtn.disabled = false;
  const my = newJob("run");
  job = my;
  live = { stage: "", done: 0, total: 0, elapsed: 0, stageElapsed: 0, t0: performance.now(), layers: [], notes: [] };
  clear(resultBox);
  renderProgress();
  ticker = window.setInterval(() => renderProgress(), 500);
  let r: RunOutcome | undefined;
  try {
    r = await api.runPlan(my, { plan: currentPlan(), name: nameInput.value || suggestedName(), eval_windows: Number(windowsInput.value) || 16, eval_text: textInput.value || null, runs_root: rootInput.value || null }, onEvent);
  } catch (e) {
    // a stop the user asked for is reported in the progress card, not as an error
    if (!/^cancell?ed\.?$/i.test(errorText(e).trim())) showError(errorText(e));
  }
  window.clearInterval(ticker);
  running = false;
  job = null;
  startBtn.disabled = false;
  cancelBtn.disabled = true;
  if (live) live.elapsed = (performance.now() - live.t0) / 1000;
  if (r) {
    state.runs.unshift(r);
    state.compare = null;
    refreshNav();
    if (live) live.notes.push(`done: ${r.variant.name}, perplexity ${num(r.variant.perplexity, 3)} (original ${num(r.original.perplexity, 3)})`);
    clear(resultBox, resultTable(r));
    nameInput.value = "";
    nameInput.placeholder = suggestedName();
  } else if (live) {
    live.notes.push("stopped");
    live.stage = "stopped";
  }
  renderProgress();
  const st = document.getElementById("run-state");
  if (st) {
    st.textContent = r ? "finished" : "stopped";
    st.className = r ? "ok" : "warn";
  }
}

startBtn.addEventListener("click", () => start());
cancelBtn.addEventListener("click", async () => {
  if (job) {
    cancelBtn.disabled = true;
    await api.cancelJob(job);
    if (live) live.notes.push("cancelling…");
    renderProgress();
  }
});

function render(): void {
  if (!state.model) return;
  nameInput.placeholder = suggestedName();
  if (!textInput.value) textInput.value = state.info?.eval_text ?? "";
  if (!rootInput.value) rootInput.value = state.info?.runs_root ?? "";
  clear(
    el,
    header("Run", "Compress the model with the plan, layer by layer from the memory-mapped checkpoint, then evaluate the original and the result on held-out text."),
    h(
      "div",
      { class: "card" },
      h("h3", null, "Plan: ", h("span", { id: "run-plan-summary" }, planSummary()), " ", h("button", { class: "link", onclick: () => navigate("plan") }, "edit")),
      h(
        "div",
        { class: "form wide" },
        h("label", null, "Variant name"), nameInput,
        h("label", null, "Evaluation windows"), h("span", null, windowsInput, h("span", { class: "muted" }, " × 256 tokens (more = a more precise perplexity, slower)")),
        h("label", null, "Evaluation text"), h("div", { class: "path-row" }, textInput, h("button", { onclick: async () => { const p = await guard(() => api.pickPath("text_open")); if (p) textInput.value = p; } }, "Browse…")),
        h("label", null, "Output folder"), h("div", { class: "path-row" }, rootInput, h("button", { onclick: async () => { const p = await guard(() => api.pickPath("runs_dir")); if (p) rootInput.value = p; } }, "Browse…")),
      ),
      h("div", { class: "button-row" }, startBtn, cancelBtn),
    ),
    progressBox,
    resultBox,
  );
  renderProgress();
  if (!running && state.runs.length && !resultBox.firstChild) clear(resultBox, resultTable(state.runs[0]));
}

const screen: Screen = { id: "run", title: "Run", el, show: render };
register(screen);
