// The page's state, shared by the screens, and the plan as the editor holds it.
import type { AppInfo, CompareView, LayerView, ModelInfo, PlanPreview, RunOutcome, SpectrumRow } from "./api";

export type ScreenId = "open" | "layers" | "layer" | "plan" | "run" | "compare";

export const ROLES = ["q", "k", "v", "o", "gate", "up", "down"] as const;
export type Role = (typeof ROLES)[number];
export const ROLE_MODULE: Record<Role, string> = {
  q: "self_attn.q_proj", k: "self_attn.k_proj", v: "self_attn.v_proj", o: "self_attn.o_proj",
  gate: "mlp.gate_proj", up: "mlp.up_proj", down: "mlp.down_proj",
};

export type MethodName = "svd" | "tt" | "tucker" | "cp" | "dense";
export type Quant = "none" | "int8" | "int4";

export interface Override { layer: string; method: MethodName; ratio: number | null }

export interface PlanDraft {
  ratio: number;
  method: MethodName;
  quant: Quant;
  sites: number; // 0: automatic
  allocation: "uniform" | "energy";
  activationAware: boolean;
  groups: Record<Role, MethodName | "default">;
  overrides: Override[];
  /** Rules of a loaded plan the editor has no control for; kept as they are, after the others. */
  extraRules: unknown[];
}

export function defaultPlan(sites: number): PlanDraft {
  return {
    ratio: 0.5,
    method: "svd",
    quant: "none",
    sites,
    allocation: "uniform",
    activationAware: false,
    groups: { q: "default", k: "default", v: "default", o: "default", gate: "default", up: "default", down: "default" },
    overrides: [],
    extraRules: [],
  };
}

function quantJson(q: Quant): unknown {
  return q === "none" ? undefined : { bits: q === "int8" ? 8 : 4, group: 64 };
}

/** The plan JSON of compactor-core (`plan.rs`) for a draft. */
export function planJson(d: PlanDraft, calibText: string | null): Record<string, unknown> {
  const dflt: Record<string, unknown> = { method: d.method };
  const q = quantJson(d.quant);
  if (q) dflt.quant = q;
  if (d.sites > 0 && d.method !== "svd" && d.method !== "dense") dflt.sites = d.sites;
  const rules: unknown[] = [];
  for (const o of d.overrides) {
    if (!o.layer) continue;
    const r: Record<string, unknown> = { match: o.layer, method: o.method };
    if (o.method !== "dense" && o.ratio !== null) r.ratio = o.ratio;
    if (d.sites > 0 && o.method !== "svd" && o.method !== "dense") r.sites = d.sites;
    rules.push(r);
  }
  for (const role of ROLES) {
    const m = d.groups[role];
    if (m === "default" || m === d.method) continue;
    const r: Record<string, unknown> = { match: `model.layers.*.${ROLE_MODULE[role]}`, method: m };
    if (d.sites > 0 && m !== "svd" && m !== "dense") r.sites = d.sites;
    rules.push(r);
  }
  rules.push(...d.extraRules);
  const plan: Record<string, unknown> = {
    version: 1,
    target: { param_ratio: d.ratio },
    default: dflt,
    rules,
    allocation: d.allocation,
    activation_aware: d.activationAware,
  };
  if (d.activationAware && calibText) plan.calibration = { text: calibText, tokens: 8192, ctx: 256 };
  return plan;
}

/** Best-effort inverse of planJson, for a loaded plan file. */
export function draftFromPlan(p: Record<string, any>, layerNames: string[], sites: number): PlanDraft {
  const d = defaultPlan(sites);
  d.ratio = p?.target?.param_ratio ?? 1;
  d.method = (p?.default?.method as MethodName) ?? "svd";
  if (p?.default?.keep_dense) d.method = "dense";
  const bits = p?.default?.quant?.bits;
  d.quant = bits === 8 ? "int8" : bits === 4 ? "int4" : "none";
  if (typeof p?.default?.sites === "number") d.sites = p.default.sites;
  d.allocation = p?.allocation === "energy" ? "energy" : "uniform";
  d.activationAware = !!p?.activation_aware;
  for (const r of (p?.rules ?? []) as Record<string, any>[]) {
    const keys = Object.keys(r).filter((k) => !["match", "method", "sites", "keep_dense", "ratio"].includes(k));
    const method: MethodName | undefined = r.keep_dense ? "dense" : r.method;
    const role = ROLES.find((ro) => r.match === `model.layers.*.${ROLE_MODULE[ro]}`);
    if (role && method && keys.length === 0 && r.ratio === undefined) {
      d.groups[role] = method;
    } else if (layerNames.includes(String(r.match).replace(/\.weight$/, "")) && method && keys.length === 0) {
      d.overrides.push({ layer: String(r.match).replace(/\.weight$/, ""), method, ratio: r.ratio ?? null });
    } else {
      d.extraRules.push(r);
    }
  }
  return d;
}

export interface State {
  info: AppInfo | null;
  model: ModelInfo | null;
  spectra: Map<string, SpectrumRow>;
  spectraState: "none" | "running" | "done" | "failed";
  plan: PlanDraft;
  preview: PlanPreview | null;
  layer: string | null;
  layerView: LayerView | null;
  runs: RunOutcome[];
  compare: CompareView | null;
}

export const state: State = {
  info: null,
  model: null,
  spectra: new Map(),
  spectraState: "none",
  plan: defaultPlan(0),
  preview: null,
  layer: null,
  layerView: null,
  runs: [],
  compare: null,
};
