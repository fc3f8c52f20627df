// Open: bundled model, a folder dialog, a path field, recent models; then the inventory.
import { api } from "../api";
import { baseName, bytes, clear, count, h, pct, ROLE_LABEL, shape } from "../dom";
import { clearError, guard, header, navigate, notice, refreshNav, register, type Screen } from "../shell";
import { defaultPlan, state } from "../state";
import { startSpectra } from "./layers";

const el = h("section");
const pathInput = h("input", { id: "model-path", type: "text", class: "path", placeholder: "/path/to/model (config.json + *.safetensors)", spellcheck: "false" }) as HTMLInputElement;
const inventoryBox = h("div", { id: "inventory" });
const status = h("span", { class: "muted", id: "open-status" });

export async function openModel(path: string): Promise<boolean> {
  clearError();
  status.textContent = `Opening ${path}…`;
  const m = await guard(() => api.openModel(path));
  status.textContent = "";
  if (!m) return false;
  state.model = m;
  state.spectra = new Map();
  state.spectraState = "none";
  state.plan = defaultPlan(m.suggested_sites);
  state.preview = null;
  state.layer = null;
  state.layerView = null;
  state.runs = [];
  state.compare = null;
  pathInput.value = m.dir;
  if (state.info && !state.info.recent.includes(m.dir)) state.info.recent.unshift(m.dir);
  refreshNav();
  render();
  notice(`Opened ${m.name}: ${m.layers.length} linear layers. Computing their spectra in the background.`);
  startSpectra();
  return true;
}

function card(title: string, ...rows: [string, string | number][]): HTMLElement {
  return h("div", { class: "card" }, h("h3", null, title), h("dl", { class: "kv" }, ...rows.flatMap(([k, v]) => [h("dt", null, k), h("dd", null, String(v))])));
}

function renderInventory(): void {
  const m = state.model;
  if (!m) {
    clear(inventoryBox, h("div", { class: "empty" }, h("p", null, "No model open yet."), h("p", { class: "muted" }, "A model is a Hugging Face checkpoint directory of the Llama family (Llama, Granite, Mistral, Qwen2, SmolLM): config.json, model.safetensors (or shards) and tokenizer.json.")));
    return;
  }
  const inv = m.inventory;
  const c = inv.config;
  const other = inv.total_params - inv.linear_params;
  clear(
    inventoryBox,
    h("div", { class: "inv-title" }, h("h2", { id: "model-name" }, m.name), h("span", { class: "muted path-text" }, m.dir)),
    h(
      "div",
      { class: "cards" },
      card("Architecture", ["family", c.arch], ["layers", c.num_hidden_layers], ["hidden size", c.hidden_size], ["MLP size", c.intermediate_size], ["attention heads", `${c.num_attention_heads} (${c.num_key_value_heads} KV, head ${c.head_dim})`], ["vocabulary", c.vocab_size], ["context", c.max_position_embeddings], ["tied embeddings", c.tie_word_embeddings ? "yes" : "no"]),
      card("Totals", ["parameters", count(inv.total_params)], ["in linear layers", `${count(inv.linear_params)} (${pct(inv.linear_params / inv.total_params, 0)})`], ["elsewhere (embeddings, norms)", count(other)], ["tensors", inv.tensors.length], ["stored dtype", c.dtype ?? inv.tensors[0]?.dtype ?? "—"], ["on disk", bytes(inv.file_bytes)], ["files", inv.files.map(baseName).join(", ")]),
      h(
        "div",
        { class: "card wide" },
        h("h3", null, "Linear layers by role (what compression acts on)"),
        h(
          "table",
          { class: "grid compact", id: "role-table" },
          h("thead", null, h("tr", null, h("th", null, "role"), h("th", { class: "num" }, "layers"), h("th", { class: "num" }, "shape (out × in)"), h("th", { class: "num" }, "parameters"), h("th", { class: "num" }, "share"), h("th", { class: "num" }, "bytes"))),
          h(
            "tbody",
            null,
            inv.linear_groups.map((g) =>
              h("tr", null, h("td", null, h("span", { class: `chip role-${g.role}` }, ROLE_LABEL[g.role] ?? g.role)), h("td", { class: "num" }, g.count), h("td", { class: "num" }, shape(g.shape)), h("td", { class: "num" }, count(g.params)), h("td", { class: "num" }, h("span", { class: "bar-cell" }, h("span", { class: "bar-fill", "data-w": String(g.params / inv.linear_params) }), pct(g.params / inv.linear_params, 0))), h("td", { class: "num" }, bytes(g.bytes))),
            ),
          ),
        ),
      ),
    ),
    h("div", { class: "next-row" }, h("span", { class: "muted" }, "Next: look at the spectrum of every weight matrix."), h("button", { class: "primary", id: "go-layers", onclick: () => navigate("layers") }, "Layers →")),
  );
  inventoryBox.querySelectorAll<HTMLElement>(".bar-fill").forEach((b) => b.style.setProperty("width", `${Math.round(100 * Number(b.dataset.w))}%`));
}

function render(): void {
  const info = state.info;
  const recent = (info?.recent ?? []).filter((r) => r !== state.model?.dir);
  clear(
    el,
    header("Open a model", "Compactor reads a checkpoint directory memory-mapped and read-only; nothing is changed in it."),
    h(
      "div",
      { class: "open-row" },
      h(
        "div",
        { class: "card open-card" },
        h("h3", null, "Bundled model"),
        h("p", { class: "muted" }, info?.bundled_model ? "granite-tiny: a 6-layer Granite with real weights, small enough to compress in seconds." : "The bundled model was not found next to this app."),
        h("button", { class: "primary", id: "open-bundled", disabled: !info?.bundled_model, onclick: () => info?.bundled_model && openModel(info.bundled_model) }, "Open granite-tiny"),
      ),
      h(
        "div",
        { class: "card open-card grow" },
        h("h3", null, "A model on disk"),
        h(
          "div",
          { class: "path-row" },
          pathInput,
          h("button", { id: "browse-model", onclick: async () => { const p = await guard(() => api.pickPath("model_dir")); if (p) { pathInput.value = p; openModel(p); } } }, "Browse…"),
          h("button", { id: "open-path", class: "primary", onclick: () => openModel(pathInput.value) }, "Open"),
        ),
        recent.length
          ? h("div", { class: "recent" }, h("span", { class: "muted" }, "Recent:"), recent.slice(0, 5).map((r) => h("button", { class: "link", title: r, onclick: () => openModel(r) }, baseName(r))))
          : h("p", { class: "muted" }, "Recent models appear here."),
        status,
      ),
    ),
    inventoryBox,
  );
  renderInventory();
}

pathInput.addEventListener("keydown", (e) => {
  if (e.key === "Enter") openModel(pathInput.value);
});

const screen: Screen = { id: "open", title: "Open", el, show: render };
register(screen);
