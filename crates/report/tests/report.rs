//! End-to-end checks of the report on a real run directory of the bundled model.
//!
//! The run directory is `COMPACTOR_REPORT_RUN_DIR` if set (e.g. the output of
//! `compactor demo --out DIR`), else a small real run of the bundled model made here with the
//! engine (svd, tt, int8 and a healed svd; see [`make_run`]).
//!
//! Numbers are checked against `run.json` read here, independently of the report's own code,
//! in the HTML (parsed with `scraper`) and in the PDF (through poppler's `pdftotext`).

use compactor_core::run::RunSummary;
use compactor_report::{build_report, build_report_with, write_html, write_pdf, Report, ReportError, ReportOptions};
use scraper::{Html, Selector};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

fn repo() -> PathBuf {
    let p = std::env::var_os("CARGO_MANIFEST_DIR").map(PathBuf::from).unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR"))).join("../..");
    p.canonicalize().unwrap_or(p)
}

struct Fixture {
    _tmp: Option<tempfile::TempDir>,
    run_dir: PathBuf,
    summary: RunSummary,
    report: Report,
    out: tempfile::TempDir,
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let (tmp, run_dir) = match std::env::var_os("COMPACTOR_REPORT_RUN_DIR") {
            Some(d) => (None, PathBuf::from(d)),
            None => match std::env::var_os("COMPACTOR_REPORT_OUT") {
                // keep the run too, to look at it or to rerun against it
                Some(keep) => {
                    let dir = PathBuf::from(keep).join("run");
                    if !dir.join("run.json").is_file() {
                        make_run(&dir);
                    }
                    (None, dir)
                }
                None => {
                    let tmp = tempfile::tempdir().unwrap();
                    let dir = tmp.path().join("run");
                    make_run(&dir);
                    (Some(tmp), dir)
                }
            },
        };
        let summary: RunSummary = serde_json::from_str(&std::fs::read_to_string(run_dir.join("run.json")).unwrap()).unwrap();
        let report = build_report(&run_dir).expect("report builds");
        let out = tempfile::tempdir().unwrap();
        write_html(&report, &out.path().join("report.html")).unwrap();
        write_pdf(&report, &out.path().join("report.pdf")).unwrap();
        // to look at the outputs: COMPACTOR_REPORT_OUT=/some/dir cargo test -p compactor-report
        if let Some(keep) = std::env::var_os("COMPACTOR_REPORT_OUT") {
            let keep = PathBuf::from(keep);
            std::fs::create_dir_all(&keep).unwrap();
            for n in ["report.html", "report.pdf"] {
                std::fs::copy(out.path().join(n), keep.join(n)).unwrap();
            }
        }
        Fixture { _tmp: tmp, run_dir, summary, report, out }
    })
}

/// A small real run of the bundled model into `dir`: the same steps as `compactor demo`
/// (compress, heal, evaluate, `run.json`) with fewer variants and windows so that it takes
/// seconds, not the demo's minutes. The full demo output is checked the same way by setting
/// `COMPACTOR_REPORT_RUN_DIR`.
fn make_run(dir: &Path) {
    use compactor_core::pipeline::{compress, CompressOptions};
    use compactor_core::plan::{Allocation, Method, Plan, QuantSpec};
    use compactor_core::run::{evaluate, EvalOptions, Environment, RunSummary};
    let assets = repo().join("assets");
    let model = assets.join("models/granite-tiny");
    let text = assets.join("gutenberg-heldout.txt");
    let p = &compactor_core::progress::NoProgress;
    let eval = EvalOptions { max_windows: 2, decode_tokens: 8, ..Default::default() };
    std::fs::create_dir_all(dir).unwrap();
    let mut int8 = Plan::simple(Method::Dense, None, Some(QuantSpec { bits: 8, group: 64, symmetric: true }));
    int8.allocation = Allocation::Uniform;
    let plans = [("svd", Plan::simple(Method::Svd, Some(0.5), None)), ("tt", Plan::simple(Method::Tt, Some(0.5), None)), ("int8", int8)];
    let original = evaluate("original", &model, &text, &eval, p).unwrap();
    let mut variants = Vec::new();
    for (name, plan) in &plans {
        compress(&model, plan, &dir.join(name), &CompressOptions::default(), p).unwrap();
        variants.push(evaluate(name, &dir.join(name), &text, &eval, p).unwrap());
    }
    let ho = compactor_core::heal::HealOptions { steps: 3, lr: 2e-4, ctx: 64, batch: 2, dense_reference_steps: 1, ..Default::default() };
    compactor_core::heal::heal(&dir.join("svd"), &assets.join("calibration.txt"), &dir.join("svd-healed"), &ho, p).unwrap();
    variants.push(evaluate("svd-healed", &dir.join("svd-healed"), &text, &eval, p).unwrap());
    let summary = RunSummary {
        model: model.display().to_string(),
        text: text.display().to_string(),
        ctx: eval.ctx,
        max_windows: eval.max_windows,
        param_ratio: 0.5,
        original,
        variants,
        environment: Environment::here(&eval.device),
    };
    std::fs::write(dir.join("run.json"), serde_json::to_string_pretty(&summary).unwrap()).unwrap();
}

fn count(n: u64) -> String {
    // independent of compactor_report::format: 1234567 -> "1,234,567"
    let s = n.to_string();
    let b = s.as_bytes();
    let mut o = String::new();
    for (i, c) in b.iter().enumerate() {
        if i > 0 && (b.len() - i) % 3 == 0 {
            o.push(',');
        }
        o.push(*c as char);
    }
    o
}

fn sel(s: &str) -> Selector {
    Selector::parse(s).unwrap()
}

fn text_of(e: scraper::ElementRef) -> String {
    e.text().collect::<String>().trim().to_string()
}

fn tool(name: &str, args: &[&std::ffi::OsStr]) -> String {
    let out = Command::new(name).args(args).output().unwrap_or_else(|e| panic!("`{name}` does not run ({e}); install poppler-utils"));
    assert!(out.status.success(), "{name} failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn summary_table_numbers_equal_run_json() {
    let f = fixture();
    let doc = Html::parse_document(&std::fs::read_to_string(f.out.path().join("report.html")).unwrap());
    let rows: Vec<_> = doc.select(&sel("table#summary tbody tr")).collect();
    let expected: Vec<_> = std::iter::once(&f.summary.original).chain(f.summary.variants.iter()).collect();
    assert_eq!(rows.len(), expected.len(), "one row for the original and one per variant");
    assert!(expected.len() >= 4, "the run has several variants");
    for (row, v) in rows.iter().zip(expected) {
        let cell = |class: &str| row.select(&sel(&format!("td.{class}"))).next().unwrap_or_else(|| panic!("no {class} cell for {}", v.name));
        assert_eq!(text_of(cell("name")), v.name);
        assert_eq!(text_of(cell("params")).replace(',', "").parse::<usize>().unwrap(), v.params, "{} params", v.name);
        assert_eq!(text_of(cell("params")), count(v.params as u64));
        assert_eq!(text_of(cell("bytes")).replace(',', "").parse::<u64>().unwrap(), v.bytes, "{} bytes", v.name);
        assert_eq!(text_of(cell("perplexity")), format!("{:.3}", v.perplexity), "{} perplexity", v.name);
        let exact: f64 = cell("perplexity").value().attr("data-value").unwrap().parse().unwrap();
        assert_eq!(exact, v.perplexity, "{} exact perplexity", v.name);
        let speed = v.decode_tokens_per_s / f.summary.original.decode_tokens_per_s;
        assert_eq!(text_of(cell("speed-ratio")), format!("{speed:.2}×"), "{} speed ratio", v.name);
        if v.name != "original" {
            let d = 100.0 * (v.perplexity / f.summary.original.perplexity - 1.0);
            assert_eq!(text_of(cell("delta-ppl")), format!("{d:+.2}%"), "{} Δppl", v.name);
            assert!(v.mean_rel_error.is_some());
        }
    }
}

#[test]
fn html_has_the_sections_in_order_and_a_table_per_variant() {
    let f = fixture();
    let html = std::fs::read_to_string(f.out.path().join("report.html")).unwrap();
    let doc = Html::parse_document(&html);
    let h2: Vec<String> = doc.select(&sel("h2")).map(text_of).collect();
    assert_eq!(h2, ["Summary", "Charts", "Per-layer results", "Plans", "Environment"]);
    let tables = doc.select(&sel("table.layers")).count();
    assert_eq!(tables, f.summary.variants.len());
    // the per-layer rows of the first variant are its manifest's, in order
    let m = &f.report.variants[0].manifest;
    let first = doc.select(&sel("table.layers")).next().unwrap();
    let names: Vec<String> = first.select(&sel("tbody tr td:first-child")).map(text_of).collect();
    assert_eq!(names, m.layers.iter().map(|l| l.name.clone()).collect::<Vec<_>>());
    assert_eq!(doc.select(&sel("pre.plan")).count(), f.summary.variants.len());
    assert!(!html.contains("src=\"http"), "self-contained: no external resources");
    assert!(!html.contains("<link"), "self-contained: no linked stylesheets");
}

#[test]
fn every_image_is_an_embedded_png() {
    let f = fixture();
    let doc = Html::parse_document(&std::fs::read_to_string(f.out.path().join("report.html")).unwrap());
    let imgs: Vec<_> = doc.select(&sel("img")).collect();
    if imgs.is_empty() {
        let notes: Vec<String> = doc.select(&sel(".unavailable")).map(text_of).collect();
        assert!(notes.iter().any(|n| n.starts_with("charts unavailable: ")), "no charts and no reason given");
        eprintln!("charts were not drawn here: {notes:?}");
        return;
    }
    use base64::Engine as _;
    for img in &imgs {
        let src = img.value().attr("src").unwrap();
        let b64 = src.strip_prefix("data:image/png;base64,").unwrap_or_else(|| panic!("not a PNG data URI: {}", &src[..src.len().min(40)]));
        let bytes = base64::engine::general_purpose::STANDARD.decode(b64).expect("valid base64");
        let info = png::Decoder::new(std::io::Cursor::new(bytes)).read_info().expect("decodes as PNG").info().clone();
        assert!(info.width >= 300 && info.height >= 200, "a real chart, got {}x{}", info.width, info.height);
        let w: u32 = img.value().attr("width").unwrap().parse().unwrap();
        assert_eq!(w * 2, info.width, "drawn at 2x");
    }
    let ids: Vec<&str> = doc.select(&sel("figure")).filter_map(|f| f.value().attr("id")).collect();
    for want in ["chart-error-map", "chart-error-vs-params", "chart-heal-loss"] {
        assert!(ids.contains(&want), "{want} missing from {ids:?}");
    }
}

#[test]
fn pdf_has_selectable_text_with_the_same_numbers_and_renders() {
    let f = fixture();
    let pdf = f.out.path().join("report.pdf");
    let text = tool("pdftotext", &[pdf.as_os_str(), "-".as_ref()]);
    for s in ["Summary", "Charts", "Per-layer results", "Plans", "Environment", &f.report.title] {
        assert!(text.contains(s), "section `{s}` not in the PDF text");
    }
    for v in std::iter::once(&f.summary.original).chain(f.summary.variants.iter()) {
        for want in [format!("{:.3}", v.perplexity), count(v.params as u64), count(v.bytes)] {
            assert!(text.contains(&want), "{}: `{want}` not in the PDF text", v.name);
        }
    }
    // every layer of every variant is listed
    for v in &f.report.variants {
        let l = v.manifest.layers.last().unwrap();
        assert!(text.contains(&l.name), "{}", l.name);
    }
    let info = tool("pdfinfo", &[pdf.as_os_str()]);
    let pages: usize = info.lines().find_map(|l| l.strip_prefix("Pages:")).unwrap().trim().parse().unwrap();
    assert!(pages >= 3);
    assert!(text.contains(&format!("Page {pages} of {pages}")), "page numbers");
    assert!(text.contains("Page 1 of"), "page numbers");
    let dir = tempfile::tempdir().unwrap();
    let prefix = dir.path().join("p");
    tool("pdftoppm", &["-r".as_ref(), "50".as_ref(), "-png".as_ref(), pdf.as_os_str(), prefix.as_os_str()]);
    let rendered = std::fs::read_dir(dir.path()).unwrap().filter(|e| e.as_ref().unwrap().path().extension().is_some_and(|x| x == "png")).count();
    assert_eq!(rendered, pages, "pdftoppm renders every page");
    if !f.report.charts.images.is_empty() {
        let imgs = tool("pdfimages", &["-list".as_ref(), pdf.as_os_str()]);
        assert!(imgs.lines().count() - 2 >= f.report.charts.images.len(), "charts embedded: {imgs}");
    }
}

#[test]
fn text_from_the_run_is_escaped() {
    let f = fixture();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let mut s = f.summary.clone();
    s.model = "models/<script>alert('x')</script> & \"co\"".into();
    std::fs::write(dir.join("run.json"), serde_json::to_string(&s).unwrap()).unwrap();
    for v in &s.variants {
        std::fs::create_dir_all(dir.join(&v.name)).unwrap();
        std::fs::copy(f.run_dir.join(&v.name).join("compactor.json"), dir.join(&v.name).join("compactor.json")).unwrap();
    }
    let r = build_report_with(dir, &ReportOptions { charts: false, ..Default::default() }).unwrap();
    let html = compactor_report::render_html(&r);
    assert!(!html.contains("<script>"), "markup from run.json must not reach the page");
    let doc = Html::parse_document(&html);
    let facts: Vec<String> = doc.select(&sel("dl.facts dd")).map(text_of).collect();
    assert_eq!(facts[0], s.model, "the escaped text reads back as the original");
    assert!(html.contains("charts unavailable: charts were not requested"));
    // and the PDF still comes out
    assert!(compactor_report::render_pdf(&r).unwrap().starts_with(b"%PDF"));
}

#[test]
fn errors_name_the_file() {
    let tmp = tempfile::tempdir().unwrap();
    let err = build_report(tmp.path()).unwrap_err();
    assert!(matches!(err, ReportError::Missing { .. }), "{err}");
    assert!(err.to_string().contains(&tmp.path().join("run.json").display().to_string()), "{err}");

    std::fs::write(tmp.path().join("run.json"), "{ not json").unwrap();
    let err = build_report(tmp.path()).unwrap_err();
    assert!(matches!(err, ReportError::Json { .. }), "{err}");
    assert!(err.to_string().contains("run.json"), "{err}");

    // a variant without its manifest
    let f = fixture();
    let mut s = f.summary.clone();
    s.variants.truncate(1);
    s.variants[0].dir = "/nonexistent".into();
    std::fs::write(tmp.path().join("run.json"), serde_json::to_string(&s).unwrap()).unwrap();
    let err = build_report(tmp.path()).unwrap_err();
    assert!(err.to_string().contains(&format!("{}/compactor.json", s.variants[0].name)), "{err}");
}

#[test]
fn outputs_are_replaced_atomically() {
    let f = fixture();
    let tmp = tempfile::tempdir().unwrap();
    let p = tmp.path().join("r.html");
    std::fs::write(&p, "old").unwrap();
    write_html(&f.report, &p).unwrap();
    assert!(std::fs::read_to_string(&p).unwrap().starts_with("<!DOCTYPE html>"));
    let names: Vec<_> = std::fs::read_dir(tmp.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(names.len(), 1, "no temporary file left: {names:?}");
    let err = write_pdf(&f.report, &tmp.path().join("missing-dir/r.pdf")).unwrap_err();
    assert!(err.to_string().contains("missing-dir/r.pdf"), "{err}");
}
