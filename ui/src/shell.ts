// The window: sidebar with the steps, the error banner, one screen at a time.
import { errorText } from "./api";
import { baseName, bytes, clear, count, h } from "./dom";
import { state, type ScreenId } from "./state";

export interface Screen {
  id: ScreenId;
  title: string;
  el: HTMLElement;
  /** Called every time the screen is shown. */
  show(): void;
}

const screens = new Map<ScreenId, Screen>();
const navButtons = new Map<ScreenId, HTMLButtonElement>();
let current: ScreenId = "open";

const errorBox = h("div", { id: "error", class: "banner error hidden", role: "alert" });
const noticeBox = h("div", { id: "notice", class: "banner notice hidden", role: "status" });
const content = h("main", { class: "content", id: "content" });
const modelCard = h("div", { class: "side-model", id: "side-model" });

const STEPS: { id: ScreenId; label: string; hint: string }[] = [
  { id: "open", label: "Open model", hint: "pick a checkpoint" },
  { id: "layers", label: "Layers", hint: "spectra of every matrix" },
  { id: "layer", label: "Layer view", hint: "one matrix up close" },
  { id: "plan", label: "Plan", hint: "methods and budget" },
  { id: "run", label: "Run", hint: "compress and evaluate" },
  { id: "compare", label: "Compare", hint: "variants and report" },
];

export function mountShell(root: HTMLElement): void {
  const nav = h("nav", { class: "steps" });
  STEPS.forEach((s, i) => {
    const b = h(
      "button",
      { class: "step", "data-screen": s.id, id: `nav-${s.id}`, onclick: () => navigate(s.id) },
      h("span", { class: "step-num" }, String(i + 1)),
      h("span", { class: "step-text" }, h("span", { class: "step-label" }, s.label), h("span", { class: "step-hint" }, s.hint)),
    );
    navButtons.set(s.id, b);
    nav.append(b);
  });
  const side = h("aside", { class: "side" }, h("div", { class: "brand" }, h("span", { class: "logo" }), "Compactor"), nav, modelCard);
  clear(root, h("div", { class: "shell" }, side, h("div", { class: "main" }, errorBox, noticeBox, content)));
  window.addEventListener("error", (e) => showError(`Unexpected error in the page: ${e.message}`));
  window.addEventListener("unhandledrejection", (e) => showError(errorText(e.reason)));
  refreshNav();
}

export function register(s: Screen): void {
  screens.set(s.id, s);
  s.el.classList.add("screen");
  s.el.id = `screen-${s.id}`;
}

export function navigate(id: ScreenId): void {
  const s = screens.get(id);
  if (!s) return;
  if (id !== "open" && !state.model) {
    showError("Open a model first.");
    id = "open";
  }
  current = id;
  const target = screens.get(id)!;
  clear(content, target.el);
  content.scrollTop = 0;
  for (const [sid, b] of navButtons) b.classList.toggle("active", sid === id);
  document.title = `Compactor — ${target.title}`;
  try {
    target.show();
  } catch (e) {
    showError(errorText(e));
  }
}

export function currentScreen(): ScreenId {
  return current;
}

export function refreshNav(): void {
  for (const [id, b] of navButtons) {
    const needsModel = id !== "open";
    const needsRun = id === "compare";
    b.disabled = (needsModel && !state.model) || (needsRun && state.runs.length === 0);
    b.classList.toggle("done", (id === "open" && !!state.model) || (id === "run" && state.runs.length > 0));
  }
  if (state.model) {
    const inv = state.model.inventory;
    clear(
      modelCard,
      h("div", { class: "side-model-label" }, "Model"),
      h("div", { class: "side-model-name", title: state.model.dir }, state.model.name),
      h("div", { class: "side-model-meta" }, `${inv.config.arch} · ${count(inv.total_params)} params · ${bytes(inv.file_bytes)}`),
      state.runs.length ? h("div", { class: "side-model-meta" }, `${state.runs.length} variant${state.runs.length > 1 ? "s" : ""} run · ${baseName(state.runs[0].run_dir)}`) : null,
    );
  } else {
    clear(modelCard, h("div", { class: "side-model-label" }, "No model open"));
  }
}

export function showError(text: string): void {
  errorBox.classList.remove("hidden");
  clear(errorBox, h("span", { class: "banner-icon" }, "!"), h("span", { class: "banner-text", id: "error-text" }, text), h("button", { class: "banner-close", title: "Dismiss", onclick: () => clearError() }, "×"));
}

export function clearError(): void {
  errorBox.classList.add("hidden");
  errorBox.replaceChildren();
}

let noticeTimer = 0;
export function notice(text: string): void {
  noticeBox.classList.remove("hidden");
  clear(noticeBox, h("span", { class: "banner-text" }, text));
  window.clearTimeout(noticeTimer);
  noticeTimer = window.setTimeout(() => noticeBox.classList.add("hidden"), 6000);
}

/** Runs `f`, showing its error in words; returns undefined on failure. */
export async function guard<T>(f: () => Promise<T>): Promise<T | undefined> {
  try {
    return await f();
  } catch (e) {
    showError(errorText(e));
    return undefined;
  }
}

/** A screen header: title, one sentence on what it is for. */
export function header(title: string, help: string, ...right: (Node | null)[]): HTMLElement {
  return h("header", { class: "screen-head" }, h("div", null, h("h1", null, title), h("p", { class: "help" }, help)), h("div", { class: "head-actions" }, ...right));
}
