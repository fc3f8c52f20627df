// Typed wrappers over the app's Tauri commands (src-tauri/src/commands.rs).
import { Channel, invoke } from "@tauri-apps/api/core";

export interface AppInfo {
  version: string;
  bundled_model: string | null;
  startup_model: string | null;
  recent: string[];
  runs_root: string;
  eval_text: string | null;
  calib_text: string | null;
}

export interface TensorEntry { name: string; shape: number[]; dtype: string; params: number; bytes: number; role: string | null }
export interface RoleGroup { role: string; count: number; shape: [number, number]; params: number; bytes: number }
export interface ModelConfig {
  arch: string; hidden_size: number; intermediate_size: number; vocab_size: number; num_hidden_layers: number;
  num_attention_heads: number; num_key_value_heads: number; head_dim: number; rope_theta: number;
  max_position_embeddings: number; tie_word_embeddings: boolean; dtype: string | null;
}
export interface Inventory {
  dir: string; config: ModelConfig; files: string[]; file_bytes: number; tensors: TensorEntry[];
  linear_groups: RoleGroup[]; total_params: number; total_bytes: number; linear_params: number; linear_bytes: number;
}
export interface LayerBasic { name: string; short: string; layer: number; role: string; shape: [number, number]; params: number; bytes: number }
export interface ModelInfo { dir: string; name: string; inventory: Inventory; layers: LayerBasic[]; suggested_sites: number }

export interface SpectrumRow { name: string; stable_rank: number; effective_rank: number; alpha: number | null; sigma_max: number; thumb: number[] }

export interface ChartImage { url: string; width: number; height: number; plot: [number, number, number, number] | null }
export interface CurvePoint { method: string; ratio: number; params_fraction: number; rel_error: number; ranks: number[] }
export interface LayerView {
  name: string; short: string; shape: [number, number]; method: string; ratio: number; ranks: number[]; params: number;
  rel_error: number; mark_rank: number; sigma: number[]; energy: number[]; spectrum_y: [number, number];
  spectrum: ChartImage; heatmap: ChartImage; curves: ChartImage; curve_points: CurvePoint[]; stats: SpectrumRow;
}
export interface HeatValue { row: number; col: number; w: number; w_hat: number; err: number; block_rows: [number, number]; block_cols: [number, number]; block_max: number }

export interface PreviewRow {
  name: string; short: string; method: string; rank: number; ranks: number[]; dense_params: number; params: number; dense_bytes: number;
  bytes: number; predicted_error: number | null; energy: number | null; energy_rank: number;
}
export interface PlanPreview {
  rows: PreviewRow[]; dense_params: number; params: number; dense_bytes: number; bytes: number; model_params: number;
  model_params_after: number; model_bytes: number; model_bytes_after: number; mean_predicted_error: number | null; plan_json: string;
}

export interface VariantResult {
  name: string; dir: string; method: string; perplexity: number; tokens_scored: number; params: number; linear_params: number;
  bytes: number; prefill_tokens_per_s: number; decode_tokens_per_s: number; eval_seconds: number; mean_rel_error: number | null;
}
export interface RunLayer { name: string; method: string; ranks: number[]; params: number; dense_params: number; rel_error: number; seconds: number }
export interface RunOutcome {
  run_dir: string; variant_dir: string; original: VariantResult; variant: VariantResult; seconds: number; layers: RunLayer[];
  linear_param_ratio: number; byte_ratio: number;
}
export interface SummaryRow {
  name: string; method: string; params: number; bytes: number; perplexity: number; delta_ppl_pct: number | null;
  decode_tokens_per_s: number; decode_speed_ratio: number | null; mean_rel_error: number | null;
}
export interface ReportLayerRow { name: string; layer: number; role: string; method: string; ranks: number[]; params: number; dense_params: number; bytes: number; rel_error: number; act_error: number | null }
export interface CompareView {
  run_dir: string; title: string; rows: SummaryRow[];
  charts: { id: string; title: string; caption: string; url: string; width: number; height: number }[];
  unavailable: string[]; variants: { name: string; method: string; layers: ReportLayerRow[] }[];
}
export interface SavedReport { html: string; pdf: string; html_bytes: number; pdf_bytes: number }

export type JobEvent =
  | { kind: "stage"; stage: string; total: number; elapsed: number }
  | { kind: "progress"; stage: string; done: number; total: number; msg: string; elapsed: number; stage_elapsed: number }
  | { kind: "note"; text: string; elapsed: number }
  | { kind: "row"; row: unknown };

let jobCounter = 0;
export function newJob(prefix: string): string {
  jobCounter += 1;
  return `${prefix}-${jobCounter}`;
}

function channel(on: (e: JobEvent) => void): Channel<JobEvent> {
  const ch = new Channel<JobEvent>();
  ch.onmessage = on;
  return ch;
}

/** Errors come back from Rust as sentences; anything else is turned into one. */
export function errorText(e: unknown): string {
  if (typeof e === "string") return e;
  if (e instanceof Error) return e.message;
  try {
    return JSON.stringify(e);
  } catch {
    return String(e);
  }
}

export const api = {
  appInfo: () => invoke<AppInfo>("app_info"),
  pickPath: (kind: string) => invoke<string | null>("pick_path", { kind }),
  openModel: (path: string) => invoke<ModelInfo>("open_model", { path }),
  loadSpectra: (job: string, on: (e: JobEvent) => void) => invoke<SpectrumRow[]>("load_spectra", { job, channel: channel(on) }),
  layerView: (job: string, args: { name: string; method: string; ratio: number; sites: number | null; scale: number; width: number }, on: (e: JobEvent) => void) =>
    invoke<LayerView>("layer_view", { job, args, channel: channel(on) }),
  heatValue: (fx: number, fy: number) => invoke<HeatValue>("heat_value", { fx, fy }),
  previewPlan: (plan: unknown) => invoke<PlanPreview>("preview_plan", { plan }),
  loadPlan: (path: string) => invoke<{ path: string; plan: unknown }>("load_plan", { path }),
  savePlan: (plan: unknown, path: string) => invoke<string>("save_plan", { plan, path }),
  runPlan: (
    job: string,
    args: { plan: unknown; name: string; eval_windows: number; eval_text: string | null; runs_root: string | null },
    on: (e: JobEvent) => void,
  ) => invoke<RunOutcome>("run_plan", { job, args, channel: channel(on) }),
  cancelJob: (job: string) => invoke<boolean>("cancel_job", { job }),
  compare: () => invoke<CompareView>("compare"),
  saveReport: (path: string) => invoke<SavedReport>("save_report", { path }),
};
