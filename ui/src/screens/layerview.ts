// Layer view: spectrum and error heatmap drawn by compactor-viz (wgpu), a hover readout of the
// value under the pointer, and error-vs-parameters curves of every method.
import { api, newJob, type ChartImage, type LayerView } from "../api";
import { clear, count, h, METHOD_LABEL, num, pct, ROLE_LABEL, shape } from "../dom";
import { guard, header, navigate, register, type Screen } from "../shell";
import { state } from "../state";

const el = h("section");
const layerSelect = h("select", { id: "lv-layer" }) as HTMLSelectElement;
const methodSelect = h("select", { id: "lv-method" }, ["svd", "tt", "tucker", "cp"].map((m) => h("option", { value: m }, METHOD_LABEL[m]))) as HTMLSelectElement;
const ratioInput = h("input", { id: "lv-ratio", type: "range", min: "0.05", max: "0.95", step: "0.05", value: "0.5" }) as HTMLInputElement;
const ratioLabel = h("span", { class: "ratio-label", id: "lv-ratio-label" });
const stats = h("div", { class: "stats", id: "lv-stats" });
const charts = h("div", { id: "lv-charts" });
const status = h("div", { class: "progress-line", id: "lv-status" });
let job: string | null = null;
let requested = "";

function chartBox(id: string, img: ChartImage, readout: HTMLElement): { box: HTMLElement; image: HTMLImageElement; cursor: HTMLElement; cursorH: HTMLElement } {
  const image = h("img", { src: img.url, alt: id, id: `${id}-img`, draggable: "false" }) as HTMLImageElement;
  image.style.setProperty("width", `${img.width / devicePixelRatio}px`);
  const cursor = h("div", { class: "cursor-v hidden" });
  const cursorH = h("div", { class: "cursor-h hidden" });
  const box = h("div", { class: "chart-box", id }, h("div", { class: "chart-stage" }, image, cursor, cursorH), readout);
  box.style.setProperty("width", `${img.width / devicePixelRatio + 18}px`);
  return { box, image, cursor, cursorH };
}

/** Pointer position as a fraction of the plot area, or null outside it. */
function plotFraction(ev: MouseEvent, image: HTMLImageElement, img: ChartImage): { fx: number; fy: number; x: number; y: number; plot: [number, number, number, number] } | null {
  if (!img.plot) return null;
  const r = image.getBoundingClientRect();
  const sx = img.width / r.width, sy = img.height / r.height;
  const px = (ev.clientX - r.left) * sx, py = (ev.clientY - r.top) * sy;
  const [x0, y0, x1, y1] = img.plot;
  if (px < x0 || px > x1 || py < y0 || py > y1) return null;
  return { fx: (px - x0) / (x1 - x0), fy: (py - y0) / (y1 - y0), x: px / sx, y: py / sy, plot: [x0 / sx, y0 / sy, x1 / sx, y1 / sy] };
}

function placeCursor(c: HTMLElement, cH: HTMLElement, x: number, y: number | null, plot: [number, number, number, number]): void {
  c.classList.remove("hidden");
  c.style.setProperty("left", `${x}px`);
  c.style.setProperty("top", `${plot[1]}px`);
  c.style.setProperty("height", `${plot[3] - plot[1]}px`);
  if (y === null) {
    cH.classList.add("hidden");
  } else {
    cH.classList.remove("hidden");
    cH.style.setProperty("top", `${y}px`);
    cH.style.setProperty("left", `${plot[0]}px`);
    cH.style.setProperty("width", `${plot[2] - plot[0]}px`);
  }
}

function renderCharts(v: LayerView): void {
  const specRead = h("div", { class: "readout", id: "spectrum-readout" }, "Point at the spectrum to read σ_i and the energy kept at rank i.");
  const heatRead = h("div", { class: "readout", id: "heatmap-readout" }, "Point at the heatmap to read W, Ŵ and the error of that entry.");
  const spec = chartBox("spectrum", v.spectrum, specRead);
  const heat = chartBox("heatmap", v.heatmap, heatRead);

  spec.image.addEventListener("mousemove", (ev) => {
    const f = plotFraction(ev, spec.image, v.spectrum);
    if (!f) return;
    const n = v.sigma.length;
    const i = Math.min(n, Math.max(1, Math.round(1 + f.fx * (n - 1))));
    const s = v.sigma[i - 1];
    const [ly0, ly1] = v.spectrum_y;
    const fy = s > 0 ? 1 - (Math.log10(s) - ly0) / (ly1 - ly0) : null;
    const xi = f.plot[0] + ((i - 1) / Math.max(n - 1, 1)) * (f.plot[2] - f.plot[0]);
    placeCursor(spec.cursor, spec.cursorH, xi, fy === null ? null : f.plot[1] + fy * (f.plot[3] - f.plot[1]), f.plot);
    clear(specRead, h("b", null, `i = ${i}`), `  σ = ${num(s, 4)}  ·  energy kept at rank ${i}: ${pct(v.energy[i - 1], 2)}  ·  σ_i/σ_1 = ${num(s / v.sigma[0], 4)}`, i === v.mark_rank ? h("span", { class: "tag" }, "plan rank") : null);
  });
  spec.image.addEventListener("mouseleave", () => { spec.cursor.classList.add("hidden"); spec.cursorH.classList.add("hidden"); });

  let pending = false;
  let next: { fx: number; fy: number } | null = null;
  const query = async () => {
    if (pending || !next) return;
    pending = true;
    const q = next;
    next = null;
    try {
      const hv = await api.heatValue(q.fx, q.fy);
      clear(heatRead, h("b", null, `row ${hv.row}, col ${hv.col}`), `  W = ${num(hv.w, 5)}  ·  Ŵ = ${num(hv.w_hat, 5)}  ·  |W − Ŵ| = ${num(hv.err, 5)}  ·  pixel = rows ${hv.block_rows[0]}–${hv.block_rows[1] - 1} × cols ${hv.block_cols[0]}–${hv.block_cols[1] - 1}, max ${num(hv.block_max, 5)}`);
    } catch (e) {
      clear(heatRead, String(e));
    }
    pending = false;
    if (next) query();
  };
  heat.image.addEventListener("mousemove", (ev) => {
    const f = plotFraction(ev, heat.image, v.heatmap);
    if (!f) return;
    placeCursor(heat.cursor, heat.cursorH, f.x, f.y, f.plot);
    next = { fx: f.fx, fy: f.fy };
    query();
  });
  heat.image.addEventListener("mouseleave", () => { heat.cursor.classList.add("hidden"); heat.cursorH.classList.add("hidden"); });

  const curves = h("img", { src: v.curves.url, alt: "error curves", id: "curves-img" }) as HTMLImageElement;
  curves.style.setProperty("width", `${v.curves.width / devicePixelRatio}px`);
  const best = bestAt(v);
  clear(
    charts,
    h("div", { class: "chart-row" }, spec.box, heat.box),
    h("div", { class: "chart-box wide", id: "curves" }, curves, h("div", { class: "readout" }, best)),
  );
}

/** One sentence on which method is best at the ratio asked. */
function bestAt(v: LayerView): string {
  const near = v.curve_points.filter((p) => Math.abs(p.ratio - v.ratio) < 1e-6);
  if (near.length === 0) return "Each line is one method fitted at kept ratios 5%…90%; lower is better.";
  near.sort((a, b) => a.rel_error - b.rel_error);
  return `At ${pct(v.ratio, 0)} of the parameters: ${near.map((p) => `${p.method} ${num(p.rel_error, 3)}`).join(" · ")} (relative Frobenius error; lower is better).`;
}

function renderStats(v: LayerView): void {
  const l = state.model?.layers.find((x) => x.name === v.name);
  const chip = (k: string, val: string, id?: string) => h("div", { class: "stat", id: id ?? null }, h("span", { class: "stat-k" }, k), h("span", { class: "stat-v" }, val));
  clear(
    stats,
    chip("role", ROLE_LABEL[l?.role ?? ""] ?? "—"),
    chip("shape", shape(v.shape)),
    chip("params", count(v.shape[0] * v.shape[1])),
    chip("stable rank", num(v.stats.stable_rank, 1)),
    chip("effective rank", num(v.stats.effective_rank, 0)),
    chip("α", num(v.stats.alpha, 2)),
    chip(`${v.method} ranks`, v.ranks.join("·")),
    chip("kept params", `${count(v.params)} (${pct(v.params / (v.shape[0] * v.shape[1]), 0)})`),
    chip("relative error", num(v.rel_error, 4), "lv-error"),
  );
}

async function load(): Promise<void> {
  const name = layerSelect.value;
  if (!name) return;
  const ratio = Number(ratioInput.value);
  const method = methodSelect.value;
  const key = `${name}|${method}|${ratio}`;
  if (key === requested) return;
  requested = key;
  state.layer = name;
  if (job) api.cancelJob(job);
  const my = newJob("layer");
  job = my;
  clear(status, h("span", { class: "spinner" }), ` Fitting ${method} to ${name} and drawing the charts…`);
  el.classList.add("loading");
  const sites = state.plan.sites > 0 ? state.plan.sites : null;
  const width = Math.max(380, Math.min(640, Math.floor(((charts.getBoundingClientRect().width || 1000) - 66) / 2)));
  const v = await guard(() =>
    api.layerView(my, { name, method, ratio, sites, scale: Math.max(1, devicePixelRatio), width }, (e) => {
      if (job !== my) return;
      if (e.kind === "note") clear(status, h("span", { class: "spinner" }), ` ${e.text}…`);
      if (e.kind === "progress") clear(status, h("span", { class: "spinner" }), ` error curves: ${e.done} / ${e.total} fits`);
    }),
  );
  if (job !== my) return;
  job = null;
  el.classList.remove("loading");
  if (!v) {
    requested = "";
    clear(status, h("span", { class: "warn" }, "Could not draw this layer (see the message above)."));
    return;
  }
  state.layerView = v;
  clear(status, h("span", { class: "ok", id: "lv-ready" }, `${v.short}: ${method} at ${pct(ratio, 0)} → relative error ${num(v.rel_error, 4)}`));
  renderStats(v);
  renderCharts(v);
}

function render(): void {
  const m = state.model;
  if (!m) return;
  if (!state.layer) state.layer = m.layers[0]?.name ?? null;
  clear(layerSelect, m.layers.map((l) => h("option", { value: l.name }, `${l.short}  (${shape(l.shape)})`)));
  layerSelect.value = state.layer ?? "";
  ratioLabel.textContent = `keep ${pct(Number(ratioInput.value), 0)}`;
  clear(
    el,
    header("Layer view", "One weight matrix: its singular values, where a factorization errs, and how every method trades parameters for error.", h("button", { onclick: () => navigate("layers") }, "← Layers"), h("button", { class: "primary", onclick: () => navigate("plan") }, "Plan →")),
    h("div", { class: "toolbar" }, h("label", null, "Layer ", layerSelect), h("label", null, "Method ", methodSelect), h("label", { class: "range" }, ratioInput, ratioLabel)),
    stats,
    status,
    charts,
  );
  const v = state.layerView;
  if (v && v.name === state.layer && `${v.name}|${methodSelect.value}|${Number(ratioInput.value)}` === requested) {
    renderStats(v);
    renderCharts(v);
  } else {
    requested = "";
    clear(charts);
    clear(stats);
    requestAnimationFrame(() => load());
  }
}

layerSelect.addEventListener("change", () => load());
methodSelect.addEventListener("change", () => load());
ratioInput.addEventListener("input", () => (ratioLabel.textContent = `keep ${pct(Number(ratioInput.value), 0)}`));
ratioInput.addEventListener("change", () => load());

const screen: Screen = { id: "layer", title: "Layer view", el, show: render };
register(screen);
