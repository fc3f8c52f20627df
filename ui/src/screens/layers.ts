// Layers: every linear layer with its spectrum statistics, sortable, a thumbnail per row.
import { api, newJob, type LayerBasic, type SpectrumRow } from "../api";
import { clear, count, h, num, pct, ROLE_LABEL, shape, svg } from "../dom";
import { currentScreen, guard, header, navigate, register, type Screen } from "../shell";
import { state } from "../state";
import { refreshPreview } from "./plan";

const el = h("section");
const progress = h("div", { class: "progress-line", id: "spectra-progress" });
const table = h("table", { class: "grid sortable", id: "layers-table" });
const filter = h("input", { type: "search", class: "filter", placeholder: "Filter: name or role (e.g. mlp, L3, down)", id: "layers-filter" }) as HTMLInputElement;

type Key = "layer" | "role" | "params" | "stable_rank" | "alpha" | "energy" | "name";
let sortKey: Key = "layer";
let sortDir = 1;
let spectraJob: string | null = null;

export async function startSpectra(): Promise<void> {
  if (!state.model || state.spectraState === "running") return;
  state.spectraState = "running";
  const job = newJob("spectra");
  spectraJob = job;
  const total = state.model.layers.length;
  setProgress(0, total);
  const rows = await guard(() =>
    api.loadSpectra(job, (e) => {
      if (e.kind === "row") {
        const r = e.row as SpectrumRow;
        state.spectra.set(r.name, r);
        setProgress(state.spectra.size, total);
        if (currentScreen() === "layers") renderTable();
      }
    }),
  );
  if (spectraJob !== job) return; // another model was opened meanwhile
  state.spectraState = rows ? "done" : "failed";
  setProgress(state.spectra.size, total);
  await refreshPreview();
  if (currentScreen() === "layers") renderTable();
}

function setProgress(done: number, total: number): void {
  if (state.spectraState === "done") {
    clear(progress, h("span", { class: "ok" }, `Spectra of all ${total} layers computed.`), " Energy is the share of ‖W‖² the plan's rank keeps (SVD rank with the same parameter budget).");
    return;
  }
  if (state.spectraState === "failed") {
    clear(progress, h("span", { class: "warn" }, `Spectra stopped after ${done} of ${total} layers.`), " ", h("button", { class: "link", onclick: () => startSpectra() }, "Retry"));
    return;
  }
  const bar = h("span", { class: "bar" }, h("span", { class: "bar-fill" }));
  (bar.firstChild as HTMLElement).style.setProperty("width", `${(100 * done) / Math.max(total, 1)}%`);
  clear(progress, h("span", null, `Computing singular values: ${done} / ${total} layers `), bar, " ", h("button", { class: "link", onclick: () => spectraJob && api.cancelJob(spectraJob) }, "Stop"));
}

/** A spectrum thumbnail: log10(σ/σmax) against the index, on the y range shared by all rows. */
function thumb(r: SpectrumRow | undefined, role: string, lo: number): Element {
  const W = 120, H = 24;
  if (!r) return h("span", { class: "muted" }, "…");
  const n = r.thumb.length;
  const y = (v: number) => (Math.min(1, v / lo) * (H - 4) + 2).toFixed(1);
  const xs = r.thumb.map((_, i) => ((i / Math.max(n - 1, 1)) * (W - 2) + 1).toFixed(1));
  const pts = r.thumb.map((v, i) => `${xs[i]},${y(v)}`).join(" ");
  return svg(
    "svg",
    { width: W, height: H, viewBox: `0 0 ${W} ${H}`, class: `thumb role-${role}` },
    svg("polygon", { points: `${xs[0]},${H} ${pts} ${xs[n - 1]},${H}`, class: "thumb-area" }),
    svg("polyline", { points: pts, fill: "none", "stroke-width": 1.5, class: "thumb-line" }),
  );
}

/** The lowest thumbnail value over all layers (so thumbnails compare across rows). */
function thumbFloor(): number {
  let lo = -0.3;
  for (const r of state.spectra.values()) for (const v of r.thumb) lo = Math.min(lo, v);
  return Math.max(lo, -3);
}

function energyOf(name: string): { energy: number | null; rank: number | null } {
  const p = state.preview?.rows.find((r) => r.name === name);
  return { energy: p?.energy ?? null, rank: p?.energy_rank ?? null };
}

function value(l: LayerBasic, k: Key): number | string {
  const s = state.spectra.get(l.name);
  switch (k) {
    case "layer": return l.layer * 10 + ["q", "k", "v", "o", "gate", "up", "down"].indexOf(l.role);
    case "name": return l.name;
    case "role": return l.role;
    case "params": return l.params;
    case "stable_rank": return s?.stable_rank ?? -1;
    case "alpha": return s?.alpha ?? -1;
    case "energy": return energyOf(l.name).energy ?? -1;
  }
}

function renderTable(): void {
  const m = state.model;
  if (!m) return;
  const q = filter.value.trim().toLowerCase();
  const layers = m.layers
    .filter((l) => !q || l.short.toLowerCase().includes(q) || l.name.toLowerCase().includes(q) || (ROLE_LABEL[l.role] ?? "").includes(q))
    .sort((a, b) => {
      const va = value(a, sortKey), vb = value(b, sortKey);
      return (va < vb ? -1 : va > vb ? 1 : 0) * sortDir;
    });
  const th = (k: Key | null, label: string, cls = "", title = "") => {
    const active = k === sortKey;
    return h("th", { class: `${cls} ${k ? "sort" : ""} ${active ? (sortDir > 0 ? "asc" : "desc") : ""}`, title: title || null, onclick: k ? () => { sortDir = sortKey === k ? -sortDir : k === "layer" || k === "name" || k === "role" ? 1 : -1; sortKey = k; renderTable(); } : null }, label);
  };
  const lo = thumbFloor();
  clear(
    table,
    h(
      "thead",
      null,
      h(
        "tr",
        null,
        th("layer", "#", "num"),
        th("name", "layer"),
        th("role", "role"),
        th(null, "shape", "num"),
        th("params", "params", "num"),
        th("stable_rank", "stable rank", "num", "‖W‖²_F / σ_max²: how many directions carry the weight"),
        th("alpha", "α", "num", "power-law exponent of the eigenvalue tail (WeightWatcher); lower = heavier tail, more structure"),
        th("energy", "energy @ plan rank", "num", "share of ‖W‖²_F kept by the SVD rank with the plan's parameter budget"),
        th(null, "spectrum (σ/σ_max, log)"),
      ),
    ),
    h(
      "tbody",
      null,
      layers.map((l) => {
        const s = state.spectra.get(l.name);
        const e = energyOf(l.name);
        return h(
          "tr",
          { class: "clickable", "data-layer": l.name, title: `Open ${l.name}`, onclick: () => { state.layer = l.name; navigate("layer"); } },
          h("td", { class: "num muted" }, l.layer),
          h("td", { class: "mono" }, l.short),
          h("td", null, h("span", { class: `chip role-${l.role}` }, ROLE_LABEL[l.role] ?? l.role)),
          h("td", { class: "num" }, shape(l.shape)),
          h("td", { class: "num" }, count(l.params)),
          h("td", { class: "num" }, s ? num(s.stable_rank, 1) : "…"),
          h("td", { class: "num" }, s ? num(s.alpha, 2) : "…"),
          h("td", { class: "num" }, e.energy !== null ? h("span", { title: `rank ${e.rank}` }, `${pct(e.energy)} `, h("span", { class: "muted" }, `r=${e.rank}`)) : s ? "—" : "…"),
          h("td", null, thumb(s, l.role, lo)),
        );
      }),
    ),
  );
}

filter.addEventListener("input", () => renderTable());

function render(): void {
  const m = state.model;
  if (!m) return;
  clear(
    el,
    header(
      "Layers",
      "Every linear layer of the blocks. A spectrum that falls fast means the matrix is close to low rank and compresses well. Click a row to look at one layer.",
      h("button", { class: "primary", id: "go-plan", onclick: () => navigate("plan") }, "Plan →"),
    ),
    h("div", { class: "toolbar" }, filter, progress),
    h("div", { class: "table-wrap" }, table),
  );
  setProgress(state.spectra.size, m.layers.length);
  renderTable();
  if (state.spectraState === "none") startSpectra();
}

const screen: Screen = { id: "layers", title: "Layers", el, show: render };
register(screen);
