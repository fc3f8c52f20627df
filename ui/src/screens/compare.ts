// Compare: every variant of this session side by side (the report model of the run folder),
// its charts, and saving the HTML/PDF report.
import { api } from "../api";
import { bytes, clear, count, h, num, pct } from "../dom";
import { guard, header, navigate, notice, register, type Screen } from "../shell";
import { state } from "../state";

const el = h("section");
const body = h("div", { id: "compare-body" });
const reportPath = h("input", { id: "report-path", type: "text", class: "path", placeholder: "leave empty to choose in a dialog", spellcheck: "false" }) as HTMLInputElement;
const saved = h("div", { id: "report-saved", class: "muted" });
let loading = false;

async function load(): Promise<void> {
  if (loading) return;
  loading = true;
  clear(body, h("div", { class: "progress-line" }, h("span", { class: "spinner" }), " Reading the run folder and drawing the charts…"));
  const c = await guard(() => api.compare());
  loading = false;
  if (!c) {
    clear(body, h("p", { class: "warn" }, "Nothing to show (see the message above)."));
    return;
  }
  state.compare = c;
  renderBody();
}

function renderBody(): void {
  const c = state.compare;
  if (!c) return;
  const orig = c.rows[0];
  const bestPpl = Math.min(...c.rows.slice(1).map((r) => r.perplexity));
  clear(
    body,
    h(
      "div",
      { class: "card" },
      h("h3", null, "Variants side by side ", h("span", { class: "muted" }, c.run_dir)),
      h(
        "table",
        { class: "grid", id: "compare-table" },
        h("thead", null, h("tr", null, ["variant", "method", "parameters", "kept", "bytes", "perplexity", "Δ perplexity", "decode tok/s", "speed ×", "mean layer error"].map((t, i) => h("th", { class: i > 1 ? "num" : "" }, t)))),
        h(
          "tbody",
          null,
          c.rows.map((r, i) =>
            h(
              "tr",
              { class: i === 0 ? "original" : r.perplexity === bestPpl ? "best" : "", "data-variant": r.name },
              h("td", null, r.name),
              h("td", null, r.method),
              h("td", { class: "num" }, count(r.params)),
              h("td", { class: "num" }, pct(r.params / orig.params, 0)),
              h("td", { class: "num" }, bytes(r.bytes)),
              h("td", { class: "num" }, num(r.perplexity, 3)),
              h("td", { class: "num" }, r.delta_ppl_pct === null ? "—" : `${r.delta_ppl_pct >= 0 ? "+" : ""}${num(r.delta_ppl_pct, 1)}%`),
              h("td", { class: "num" }, num(r.decode_tokens_per_s, 1)),
              h("td", { class: "num" }, r.decode_speed_ratio === null ? "—" : `${num(r.decode_speed_ratio, 2)}×`),
              h("td", { class: "num" }, num(r.mean_rel_error, 4)),
            ),
          ),
        ),
      ),
      c.rows.length < 3 ? h("p", { class: "muted" }, "Run more plans (Plan → Run) to add variants here; they all share this run folder and the original's evaluation.") : null,
    ),
    c.unavailable.map((u) => h("p", { class: "warn" }, u)),
    h(
      "div",
      { class: "chart-grid", id: "compare-charts" },
      c.charts.map((ch) => {
        const img = h("img", { src: ch.url, alt: ch.title }) as HTMLImageElement;
        return h("figure", { class: "card chart" }, img, h("figcaption", null, h("b", null, ch.title), " ", ch.caption));
      }),
    ),
    h(
      "details",
      { class: "card" },
      h("summary", null, "Per-layer results of each variant"),
      c.variants.map((v) =>
        h(
          "div",
          null,
          h("h4", null, `${v.name} (${v.method})`),
          h(
            "table",
            { class: "grid compact" },
            h("thead", null, h("tr", null, ["layer", "method", "ranks", "params", "kept", "rel. error"].map((t, i) => h("th", { class: i > 1 ? "num" : "" }, t)))),
            h("tbody", null, v.layers.map((l) => h("tr", null, h("td", { class: "mono" }, l.name.replace(/^model\./, "")), h("td", null, l.method), h("td", { class: "num" }, l.ranks.join("·")), h("td", { class: "num" }, count(l.params)), h("td", { class: "num" }, pct(l.params / l.dense_params, 0)), h("td", { class: "num" }, num(l.rel_error, 4))))),
          ),
        ),
      ),
    ),
  );
}

async function saveReport(): Promise<void> {
  let p: string | null | undefined = reportPath.value.trim();
  if (!p) p = await guard(() => api.pickPath("report_save"));
  if (!p) return;
  clear(saved, h("span", { class: "spinner" }), " Writing the HTML and the PDF…");
  const r = await guard(() => api.saveReport(p as string));
  if (!r) {
    clear(saved);
    return;
  }
  reportPath.value = r.html;
  clear(saved, h("span", { class: "ok" }, "Saved "), h("span", { class: "mono", id: "report-html" }, r.html), ` (${bytes(r.html_bytes)}) and `, h("span", { class: "mono", id: "report-pdf" }, r.pdf), ` (${bytes(r.pdf_bytes)})`);
  notice(`Report saved: ${r.html} and ${r.pdf}`);
}

function render(): void {
  clear(
    el,
    header("Compare", "The original and every variant run in this session: size, perplexity, speed and error, with the report's charts.", h("button", { onclick: () => navigate("run") }, "← Run another")),
    h("div", { class: "card report-card" }, h("h3", null, "Report"), h("div", { class: "path-row" }, reportPath, h("button", { class: "primary", id: "report-save", onclick: () => saveReport() }, "Save HTML + PDF…")), saved),
    body,
  );
  if (!state.compare || state.compare.rows.length !== state.runs.length + 1) load();
  else renderBody();
}

const screen: Screen = { id: "compare", title: "Compare", el, show: render };
register(screen);
