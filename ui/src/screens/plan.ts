// Plan editor: a budget, a method per layer group, per-layer overrides, and a live preview of
// the predicted parameters, bytes and error (compactor_core::pipeline::preview).
import { api, type PreviewRow } from "../api";
import { bytes, clear, count, h, METHOD_LABEL, num, pct, ROLE_LABEL } from "../dom";
import { guard, header, navigate, notice, register, type Screen } from "../shell";
import { draftFromPlan, planJson, ROLES, state, type MethodName, type Quant, type Role } from "../state";

const el = h("section");
const previewBox = h("div", { id: "plan-preview" });
const controls = h("div", { class: "plan-controls" });
const planPath = h("input", { id: "plan-path", type: "text", class: "path", placeholder: "plan.json path", spellcheck: "false" }) as HTMLInputElement;
const METHODS: MethodName[] = ["svd", "tt", "tucker", "cp", "dense"];

let timer = 0;
let seq = 0;

export function currentPlan(): Record<string, unknown> {
  return planJson(state.plan, state.info?.calib_text ?? null);
}

/** Asks the engine for the predicted sizes of the current plan. */
export async function refreshPreview(): Promise<void> {
  if (!state.model) return;
  const my = ++seq;
  const p = await guard(() => api.previewPlan(currentPlan()));
  if (my !== seq) return;
  state.preview = p ?? null;
  renderPreview();
}

function schedulePreview(): void {
  window.clearTimeout(timer);
  clear(previewBox.querySelector(".preview-state") ?? previewBox, h("span", { class: "muted" }, "updating…"));
  timer = window.setTimeout(() => refreshPreview(), 150);
}

function changed(): void {
  renderControls();
  schedulePreview();
}

function methodSelect(value: string, withDefault: boolean, on: (v: string) => void, id?: string): HTMLSelectElement {
  const s = h(
    "select",
    { id: id ?? null },
    withDefault ? h("option", { value: "default" }, `as default (${state.plan.method})`) : null,
    METHODS.map((m) => h("option", { value: m }, METHOD_LABEL[m])),
  ) as HTMLSelectElement;
  s.value = value;
  s.addEventListener("change", () => on(s.value));
  return s;
}

function renderControls(): void {
  const d = state.plan;
  const m = state.model;
  if (!m) return;
  const ratio = h("input", { id: "plan-ratio", type: "range", min: "0.05", max: "1", step: "0.01", value: String(d.ratio) }) as HTMLInputElement;
  const ratioOut = h("output", { id: "plan-ratio-value", class: "big" }, pct(d.ratio, 0));
  ratio.addEventListener("input", () => {
    d.ratio = Number(ratio.value);
    ratioOut.textContent = pct(d.ratio, 0);
    schedulePreview();
  });
  const quant = h("select", { id: "plan-quant" }, h("option", { value: "none" }, "none (source dtype)"), h("option", { value: "int8" }, "int8, groups of 64"), h("option", { value: "int4" }, "int4, groups of 64")) as HTMLSelectElement;
  quant.value = d.quant;
  quant.addEventListener("change", () => { d.quant = quant.value as Quant; changed(); });
  const sites = h("select", { id: "plan-sites" }, h("option", { value: "0" }, "automatic"), [2, 3, 4].map((k) => h("option", { value: String(k) }, `${k} sites`))) as HTMLSelectElement;
  sites.value = String(d.sites);
  sites.addEventListener("change", () => { d.sites = Number(sites.value); changed(); });
  const alloc = h("select", { id: "plan-allocation" }, h("option", { value: "uniform" }, "uniform: every layer keeps the target"), h("option", { value: "energy" }, "by spectrum energy: low-rank layers give more")) as HTMLSelectElement;
  alloc.value = d.allocation;
  alloc.addEventListener("change", () => { d.allocation = alloc.value as "uniform" | "energy"; changed(); });
  const aa = h("input", { type: "checkbox", id: "plan-aa", checked: d.activationAware, disabled: !state.info?.calib_text }) as HTMLInputElement;
  aa.addEventListener("change", () => { d.activationAware = aa.checked; changed(); });

  const groupRows = ROLES.map((r: Role) => {
    const g = m.inventory.linear_groups.find((x) => x.role === r);
    if (!g) return null;
    return h("tr", null, h("td", null, h("span", { class: `chip role-${r}` }, ROLE_LABEL[r])), h("td", { class: "num muted" }, `${g.count} × ${g.shape.join("×")}`), h("td", null, methodSelect(d.groups[r], true, (v) => { d.groups[r] = v as MethodName | "default"; changed(); }, `plan-group-${r}`)));
  });

  const overrideRows = d.overrides.map((o, i) => {
    const layer = h("select", { class: "mono" }, m.layers.map((l) => h("option", { value: l.name }, l.short))) as HTMLSelectElement;
    layer.value = o.layer;
    layer.addEventListener("change", () => { o.layer = layer.value; changed(); });
    const r = h("input", { type: "number", min: "1", max: "100", step: "1", class: "small", value: o.ratio === null ? "" : String(Math.round(o.ratio * 100)), placeholder: "target", disabled: o.method === "dense" }) as HTMLInputElement;
    r.addEventListener("change", () => { const v = Number(r.value); o.ratio = r.value === "" || !(v > 0 && v <= 100) ? null : v / 100; changed(); });
    return h("tr", null, h("td", null, layer), h("td", null, methodSelect(o.method, false, (v) => { o.method = v as MethodName; changed(); })), h("td", null, r, " %"), h("td", null, h("button", { class: "link", title: "Remove", onclick: () => { d.overrides.splice(i, 1); changed(); } }, "remove")));
  });

  clear(
    controls,
    h(
      "div",
      { class: "card" },
      h("h3", null, "Budget"),
      h("div", { class: "budget" }, h("span", null, "Keep"), ratioOut, h("span", { class: "muted" }, "of the linear-layer parameters")),
      ratio,
      h("div", { class: "form" },
        h("label", null, "Default method"), methodSelect(d.method, false, (v) => { d.method = v as MethodName; changed(); }, "plan-method"),
        h("label", null, "Quantize factors"), quant,
        h("label", { title: "How many tensor sites tt / tucker / cp split each dimension into" }, "Tensor-network sites"), sites,
        h("label", null, "Allocation"), alloc,
        h("label", { title: state.info?.calib_text ? "Whitened fits from calibration activations (SVD-LLM style), for svd and tt" : "needs the bundled calibration text" }, "Activation-aware"), h("span", null, aa, h("span", { class: "muted" }, " uses calibration text (slower)")),
      ),
    ),
    h("div", { class: "card" }, h("h3", null, "Method per layer group"), h("table", { class: "grid compact", id: "plan-groups" }, h("tbody", null, groupRows))),
    h(
      "div",
      { class: "card" },
      h("h3", null, "Per-layer overrides ", h("span", { class: "muted" }, "(first match wins)")),
      d.overrides.length ? h("table", { class: "grid compact", id: "plan-overrides" }, h("thead", null, h("tr", null, h("th", null, "layer"), h("th", null, "method"), h("th", null, "keep"), h("th", null, ""))), h("tbody", null, overrideRows)) : h("p", { class: "muted" }, "None: every layer follows its group."),
      d.extraRules.length ? h("p", { class: "muted" }, `${d.extraRules.length} more rule(s) from the loaded file are kept as they are.`) : null,
      h("button", { id: "plan-add-override", onclick: () => { d.overrides.push({ layer: state.layer ?? m.layers[0].name, method: "dense", ratio: null }); changed(); } }, "+ Add override"),
    ),
    h(
      "div",
      { class: "card" },
      h("h3", null, "Plan file"),
      h("div", { class: "path-row" }, planPath),
      h(
        "div",
        { class: "button-row" },
        h("button", { id: "plan-load", onclick: () => loadPlan() }, "Load…"),
        h("button", { id: "plan-save", onclick: () => savePlan() }, "Save…"),
        h("span", { class: "muted" }, "Leave the path empty to choose in a dialog."),
      ),
    ),
  );
}

async function loadPlan(): Promise<void> {
  let p: string | null | undefined = planPath.value.trim();
  if (!p) p = await guard(() => api.pickPath("plan_open"));
  if (!p || !state.model) return;
  const r = await guard(() => api.loadPlan(p as string));
  if (!r) return;
  state.plan = draftFromPlan(r.plan as Record<string, any>, state.model.layers.map((l) => l.name), state.plan.sites);
  planPath.value = r.path;
  notice(`Loaded ${r.path}`);
  changed();
}

async function savePlan(): Promise<void> {
  let p: string | null | undefined = planPath.value.trim();
  if (!p) p = await guard(() => api.pickPath("plan_save"));
  if (!p) return;
  const saved = await guard(() => api.savePlan(currentPlan(), p as string));
  if (saved) {
    planPath.value = saved;
    notice(`Saved the plan to ${saved}`);
    const s = document.getElementById("plan-saved");
    if (s) s.textContent = `saved: ${saved}`;
  }
}

const RANKS_TITLE: Record<string, string> = { tt: "bond dimensions", tucker: "rank of each mode", cp: "components", svd: "rank" };

/** The rank column: every rank of a fit that has more than one (tt bonds, Tucker modes), as the
 * manifest will record them, else the one rank. */
function rankCell(r: PreviewRow): HTMLElement {
  const many = r.ranks.length > 1;
  return h("td", { class: many ? "num mono" : "num", title: RANKS_TITLE[r.method] ?? "" }, many ? r.ranks.join("·") : String(r.rank));
}

function renderPreview(): void {
  const p = state.preview;
  if (!p) {
    clear(previewBox, h("div", { class: "preview-state" }, h("span", { class: "muted" }, "No preview yet.")));
    return;
  }
  const big = (k: string, a: string, b: string, sub: string, id: string) => h("div", { class: "metric", id }, h("div", { class: "metric-k" }, k), h("div", { class: "metric-v" }, a, h("span", { class: "arrow" }, " → "), b), h("div", { class: "metric-sub" }, sub));
  const known = state.spectraState === "done";
  clear(
    previewBox,
    h("div", { class: "preview-state" }),
    h(
      "div",
      { class: "metrics" },
      big("linear-layer parameters", count(p.dense_params), count(p.params), `${pct(p.params / p.dense_params)} kept`, "pv-params"),
      big("whole model", bytes(p.model_bytes), bytes(p.model_bytes_after), `${count(p.model_params_after)} parameters, ${pct(p.model_bytes_after / p.model_bytes)} of the bytes`, "pv-bytes"),
      h("div", { class: "metric", id: "pv-error" }, h("div", { class: "metric-k" }, "mean predicted error"), h("div", { class: "metric-v" }, p.mean_predicted_error === null ? "—" : num(p.mean_predicted_error, 3)), h("div", { class: "metric-sub" }, p.mean_predicted_error === null ? (known ? "predicted for SVD layers only; others are measured by Run" : "after the spectra are computed") : "‖W − Ŵ‖/‖W‖ over SVD layers (Eckart–Young)")),
    ),
    h(
      "div",
      { class: "table-wrap short" },
      h(
        "table",
        { class: "grid compact", id: "preview-table" },
        h("thead", null, h("tr", null, h("th", null, "layer"), h("th", null, "method"), h("th", { class: "num" }, "rank"), h("th", { class: "num" }, "params"), h("th", { class: "num" }, "kept"), h("th", { class: "num" }, "bytes"), h("th", { class: "num" }, "pred. error"), h("th", { class: "num" }, "energy"))),
        h(
          "tbody",
          null,
          p.rows.map((r) => h("tr", null, h("td", { class: "mono" }, r.short), h("td", null, r.method), rankCell(r), h("td", { class: "num" }, count(r.params)), h("td", { class: "num" }, pct(r.params / r.dense_params, 0)), h("td", { class: "num" }, bytes(r.bytes)), h("td", { class: "num" }, num(r.predicted_error, 3)), h("td", { class: "num" }, pct(r.energy)))),
        ),
      ),
    ),
    h("details", { class: "json" }, h("summary", null, "Plan JSON"), h("pre", { id: "plan-json" }, p.plan_json)),
  );
}

function render(): void {
  if (!state.model) return;
  clear(
    el,
    header(
      "Plan",
      "Choose how each layer is compressed. The preview on the right is computed by the engine from the shapes and spectra; nothing is written until you Run.",
      h("span", { class: "muted", id: "plan-saved" }),
      h("button", { class: "primary", id: "go-run", onclick: () => navigate("run") }, "Run →"),
    ),
    h("div", { class: "plan-layout" }, controls, h("div", { class: "card preview" }, h("h3", null, "Predicted result"), previewBox)),
  );
  renderControls();
  renderPreview();
  refreshPreview();
}

const screen: Screen = { id: "plan", title: "Plan", el, show: render };
register(screen);
