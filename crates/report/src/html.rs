//! The report as one self-contained HTML file: inline CSS, charts as PNG `data:` URIs, every
//! piece of text escaped. Sections: summary, charts, per-layer results, plans, environment.

use crate::format as f;
use crate::model::{Report, SummaryRow, VariantReport};
use base64::Engine as _;
use std::fmt::Write as _;

/// Section titles, shared with the PDF.
pub(crate) const SECTIONS: [&str; 5] = ["Summary", "Charts", "Per-layer results", "Plans", "Environment"];

/// The summary table's columns: (title, CSS class, numeric).
pub(crate) const SUMMARY_COLUMNS: [(&str, &str, bool); 9] = [
    ("Variant", "name", false),
    ("Method", "method", false),
    ("Params", "params", true),
    ("Bytes", "bytes", true),
    ("Perplexity", "perplexity", true),
    ("Δppl", "delta-ppl", true),
    ("Decode tok/s", "decode", true),
    ("Decode speed", "speed-ratio", true),
    ("Mean layer error", "mean-error", true),
];

/// The summary row's cells as text, in [`SUMMARY_COLUMNS`] order.
pub(crate) fn summary_cells(r: &SummaryRow) -> [String; 9] {
    [
        r.name.clone(),
        r.method.clone(),
        f::count(r.params as u64),
        f::count(r.bytes),
        f::perplexity(r.perplexity),
        f::percent(r.delta_ppl_pct),
        f::speed(r.decode_tokens_per_s),
        f::ratio(r.decode_speed_ratio),
        f::error(r.mean_rel_error),
    ]
}

/// The exact value behind each summary cell (`data-value`), for machines.
fn summary_values(r: &SummaryRow) -> [Option<String>; 9] {
    let o = |v: Option<f64>| v.map(|v| v.to_string());
    [
        None,
        None,
        Some(r.params.to_string()),
        Some(r.bytes.to_string()),
        Some(r.perplexity.to_string()),
        o(r.delta_ppl_pct),
        Some(r.decode_tokens_per_s.to_string()),
        o(r.decode_speed_ratio),
        o(r.mean_rel_error),
    ]
}

/// Per-layer table columns: (title, numeric).
pub(crate) const LAYER_COLUMNS: [(&str, bool); 7] =
    [("Layer", false), ("Method", false), ("Ranks", false), ("Params", true), ("Dense params", true), ("Rel. error", true), ("Act. error", true)];

pub(crate) fn layer_cells(v: &VariantReport) -> Vec<[String; 7]> {
    v.layer_rows()
        .iter()
        .map(|l| {
            [l.name.clone(), l.method.clone(), f::ranks(&l.ranks), f::count(l.params as u64), f::count(l.dense_params as u64), f::error(Some(l.rel_error)), f::error(l.act_error)]
        })
        .collect()
}

/// The lines under the title: what was run, on what.
pub(crate) fn run_facts(r: &Report) -> Vec<(String, String)> {
    let s = &r.summary;
    vec![
        ("Model".into(), s.model.clone()),
        ("Evaluation text".into(), s.text.clone()),
        ("Perplexity protocol".into(), format!("ctx {} tokens, at most {} windows, {} tokens scored", s.ctx, s.max_windows, f::count(s.original.tokens_scored as u64))),
        ("Parameter budget".into(), format!("{:.0}% of the linear-layer parameters kept by every factorized variant", s.param_ratio * 100.0)),
        ("Run directory".into(), r.run_dir.display().to_string()),
    ]
}

/// The heal record of a variant as one sentence.
pub(crate) fn heal_sentence(v: &VariantReport) -> Option<String> {
    let h = v.manifest.heal.as_ref()?;
    let first = h.losses.first().map(|l| f::loss(*l)).unwrap_or_else(|| f::NONE.into());
    let last = h.losses.last().map(|l| f::loss(*l)).unwrap_or_else(|| f::NONE.into());
    let dense = v.result.dense_step_seconds.map(|d| format!(" (dense model: {} per step)", f::seconds(d))).unwrap_or_default();
    Some(format!(
        "Healed for {} steps at lr {} on {} ({} tensors trained): loss {first} → {last}, {} per step{dense}.",
        h.steps, h.lr, h.text, h.trained_tensors, f::seconds(h.step_seconds)
    ))
}

/// One sentence about a variant: method, totals.
pub(crate) fn variant_sentence(v: &VariantReport) -> String {
    let t = &v.manifest.totals;
    format!(
        "{} layers compressed; linear parameters {} ({:.1}% of the source's), file {} ({:.1}% of the source's); factors stored as {}.",
        v.manifest.layers.len(),
        f::count(t.linear_params as u64),
        t.linear_param_ratio * 100.0,
        f::bytes_human(t.bytes as u64),
        t.byte_ratio * 100.0,
        v.manifest.factor_dtype
    )
}

/// The environment table.
pub(crate) fn environment(r: &Report) -> Vec<(String, String)> {
    let e = &r.summary.environment;
    let mut rows = vec![
        ("Compactor version".to_string(), e.compactor_version.clone()),
        ("Operating system".into(), format!("{} ({})", e.os, e.arch)),
        ("CPUs".into(), e.cpus.to_string()),
        ("Device".into(), e.device.clone()),
        ("Report generator".into(), r.generator.clone()),
    ];
    if let Some(v) = r.variants.first() {
        rows.push(("Source checkpoint".into(), v.manifest.source.dir.clone()));
        rows.push(("Source fingerprint".into(), v.manifest.source.fingerprint.clone()));
        rows.push(("Source size".into(), format!("{} parameters, {}", f::count(v.manifest.source.params as u64), f::bytes_human(v.manifest.source.bytes as u64))));
    }
    let mut versions: Vec<String> = r.variants.iter().map(|v| format!("{} ({})", v.manifest.compactor_version, v.manifest.format)).collect();
    versions.dedup();
    if !versions.is_empty() {
        rows.push(("Manifest writer".into(), versions.join(", ")));
    }
    rows
}

/// Escapes text for HTML element content and attribute values.
pub fn escape(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => o.push_str("&amp;"),
            '<' => o.push_str("&lt;"),
            '>' => o.push_str("&gt;"),
            '"' => o.push_str("&quot;"),
            '\'' => o.push_str("&#39;"),
            c => o.push(c),
        }
    }
    o
}

const CSS: &str = r#"
:root { --fg:#1d2330; --muted:#5b6475; --line:#d6dae2; --head:#eef1f6; --accent:#2b5fab; }
* { box-sizing: border-box; }
body { font-family: "DejaVu Sans", "Segoe UI", Helvetica, Arial, sans-serif; color: var(--fg); margin: 0; background: #fff; font-size: 14px; line-height: 1.45; }
main { max-width: 1000px; margin: 0 auto; padding: 28px 32px 60px; }
h1 { font-size: 26px; margin: 0 0 6px; }
h2 { font-size: 20px; margin: 36px 0 10px; padding-bottom: 4px; border-bottom: 2px solid var(--accent); }
h3 { font-size: 16px; margin: 24px 0 6px; }
p { margin: 6px 0; }
.muted, figcaption, .note { color: var(--muted); font-size: 12.5px; }
dl.facts { display: grid; grid-template-columns: max-content 1fr; gap: 2px 14px; margin: 10px 0 0; font-size: 13px; }
dl.facts dt { color: var(--muted); }
dl.facts dd { margin: 0; word-break: break-all; }
table { border-collapse: collapse; width: 100%; margin: 8px 0 4px; font-size: 12.5px; }
th, td { border: 1px solid var(--line); padding: 3px 7px; text-align: left; vertical-align: top; }
thead th { background: var(--head); font-weight: 600; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
tr.original td { background: #f7f8fb; font-weight: 600; }
table.layers td:first-child { font-family: "DejaVu Sans Mono", Menlo, Consolas, monospace; font-size: 11.5px; }
table.kv th { width: 30%; background: var(--head); font-weight: 600; }
table.kv td { word-break: break-all; }
figure { margin: 18px 0; }
figure img { width: 100%; height: auto; border: 1px solid var(--line); display: block; }
figcaption { margin-top: 4px; }
.unavailable { background: #fff4e5; border: 1px solid #f0c27b; padding: 6px 10px; border-radius: 4px; color: #7a4b00; }
pre { background: #f6f8fa; border: 1px solid var(--line); padding: 8px 10px; font-size: 11.5px; overflow-x: auto; white-space: pre-wrap; word-break: break-all; }
nav ol { margin: 6px 0 0; padding-left: 20px; }
@media print {
  body { font-size: 11px; }
  main { max-width: none; padding: 0; }
  h2 { break-after: avoid; }
  h3 { break-after: avoid; }
  figure, tr { break-inside: avoid; }
  thead { display: table-header-group; }
  nav { display: none; }
  pre { white-space: pre-wrap; }
}
"#;

/// Renders the whole report as an HTML document.
pub fn render_html(r: &Report) -> String {
    let mut h = String::with_capacity(1 << 20);
    let e = escape;
    let _ = write!(
        h,
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n<meta name=\"generator\" content=\"{}\">\n<title>{}</title>\n<style>{CSS}</style>\n</head>\n<body>\n<main>\n",
        e(&r.generator),
        e(&r.title)
    );
    let _ = writeln!(h, "<header>\n<h1>{}</h1>\n<p class=\"muted\">The original model and its compressed variants, measured on the same text.</p>\n<dl class=\"facts\">", e(&r.title));
    for (k, v) in run_facts(r) {
        let _ = writeln!(h, "<dt>{}</dt><dd>{}</dd>", e(&k), e(&v));
    }
    h.push_str("</dl>\n</header>\n<nav><ol>");
    for (i, s) in SECTIONS.iter().enumerate() {
        let _ = write!(h, "<li><a href=\"#s{i}\">{}</a></li>", e(s));
    }
    h.push_str("</ol></nav>\n");

    // summary
    let _ = writeln!(h, "<section id=\"s0\">\n<h2>{}</h2>\n<table class=\"summary\" id=\"summary\">\n<thead><tr>", SECTIONS[0]);
    for (title, class, num) in SUMMARY_COLUMNS {
        let _ = write!(h, "<th class=\"{class}{}\">{}</th>", if num { " num" } else { "" }, e(title));
    }
    h.push_str("</tr></thead>\n<tbody>\n");
    for (i, row) in r.rows.iter().enumerate() {
        let _ = write!(h, "<tr{} data-variant=\"{}\">", if i == 0 { " class=\"original\"" } else { "" }, e(&row.name));
        for ((cell, value), (_, class, num)) in summary_cells(row).iter().zip(summary_values(row)).zip(SUMMARY_COLUMNS) {
            let dv = value.map(|v| format!(" data-value=\"{}\"", e(&v))).unwrap_or_default();
            let _ = write!(h, "<td class=\"{class}{}\"{dv}>{}</td>", if num { " num" } else { "" }, e(cell));
        }
        h.push_str("</tr>\n");
    }
    h.push_str("</tbody>\n</table>\n");
    let _ = writeln!(
        h,
        "<p class=\"note\">Δppl: perplexity change against the original. Decode speed: decode tokens/s as a multiple of the original's. Mean layer error: mean of ‖W − Ŵ‖_F / ‖W‖_F over the compressed layers. Bytes: size of the model files on disk.</p>\n</section>"
    );

    // charts
    let _ = writeln!(h, "<section id=\"s1\">\n<h2>{}</h2>", SECTIONS[1]);
    for u in &r.charts.unavailable {
        let _ = writeln!(h, "<p class=\"unavailable\">{}</p>", e(u));
    }
    let b64 = base64::engine::general_purpose::STANDARD;
    for c in &r.charts.images {
        let _ = writeln!(
            h,
            "<figure id=\"chart-{}\">\n<img alt=\"{}\" width=\"{}\" height=\"{}\" src=\"data:image/png;base64,{}\">\n<figcaption><strong>{}.</strong> {}</figcaption>\n</figure>",
            e(&c.id),
            e(&c.title),
            c.width / 2,
            c.height / 2,
            b64.encode(&c.png),
            e(&c.title),
            e(&c.caption)
        );
    }
    h.push_str("</section>\n");

    // per-layer tables
    let _ = writeln!(h, "<section id=\"s2\">\n<h2>{}</h2>", SECTIONS[2]);
    for v in &r.variants {
        let _ = writeln!(h, "<h3 id=\"layers-{}\">{} <span class=\"muted\">({})</span></h3>", e(&v.result.name), e(&v.result.name), e(&v.result.method));
        let _ = writeln!(h, "<p>{}</p>", e(&variant_sentence(v)));
        if let Some(s) = heal_sentence(v) {
            let _ = writeln!(h, "<p>{}</p>", e(&s));
        }
        h.push_str("<table class=\"layers\"><thead><tr>");
        for (t, num) in LAYER_COLUMNS {
            let _ = write!(h, "<th{}>{}</th>", if num { " class=\"num\"" } else { "" }, e(t));
        }
        h.push_str("</tr></thead>\n<tbody>\n");
        for row in layer_cells(v) {
            h.push_str("<tr>");
            for (cell, (_, num)) in row.iter().zip(LAYER_COLUMNS) {
                let _ = write!(h, "<td{}>{}</td>", if num { " class=\"num\"" } else { "" }, e(cell));
            }
            h.push_str("</tr>\n");
        }
        h.push_str("</tbody></table>\n");
    }
    h.push_str("</section>\n");

    // plans
    let _ = writeln!(h, "<section id=\"s3\">\n<h2>{}</h2>\n<p class=\"note\">The plan each variant was compressed with, as stored in its compactor.json.</p>", SECTIONS[3]);
    for v in &r.variants {
        let _ = writeln!(h, "<h3>{}</h3>\n<pre class=\"plan\">{}</pre>", e(&v.result.name), e(&v.manifest.plan.to_json()));
    }
    h.push_str("</section>\n");

    // environment
    let _ = writeln!(h, "<section id=\"s4\">\n<h2>{}</h2>\n<table class=\"kv\"><tbody>", SECTIONS[4]);
    for (k, v) in environment(r) {
        let _ = writeln!(h, "<tr><th>{}</th><td>{}</td></tr>", e(&k), e(&v));
    }
    h.push_str("</tbody></table>\n</section>\n</main>\n</body>\n</html>\n");
    h
}

#[cfg(test)]
mod tests {
    #[test]
    fn escape_covers_markup_and_quotes() {
        assert_eq!(super::escape("<a href=\"x\">&'</a>"), "&lt;a href=&quot;x&quot;&gt;&amp;&#39;&lt;/a&gt;");
    }
}
