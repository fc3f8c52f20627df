//! Writes the report of a run directory: `cargo run -p compactor-report --example write_report -- RUN_DIR out.html out.pdf`
//! (the CLI's `compactor report` does the same).
fn main() {
    let a: Vec<String> = std::env::args().collect();
    if a.len() != 4 {
        eprintln!("usage: write_report RUN_DIR OUT.html OUT.pdf");
        std::process::exit(2);
    }
    let t = std::time::Instant::now();
    let r = compactor_report::build_report(std::path::Path::new(&a[1])).unwrap_or_else(|e| {
        eprintln!("error: {e}");
        std::process::exit(1)
    });
    for u in &r.charts.unavailable {
        eprintln!("{u}");
    }
    compactor_report::write_html(&r, a[2].as_ref()).unwrap();
    compactor_report::write_pdf(&r, a[3].as_ref()).unwrap();
    eprintln!("{} charts, wrote {} and {} in {:.1} s", r.charts.images.len(), a[2], a[3], t.elapsed().as_secs_f64());
}
