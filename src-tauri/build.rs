fn main() {
    // The frontend is embedded at compile time from ../ui/dist (`npm run build` in ui/). When it
    // has not been built, embed a page that says so, so that a plain `cargo build --workspace`
    // still works and the app never opens on a blank window.
    let dist = std::path::Path::new("../ui/dist");
    if !dist.join("index.html").is_file() {
        std::fs::create_dir_all(dist).expect("create ui/dist");
        std::fs::write(
            dist.join("index.html"),
            "<!doctype html><meta charset=utf-8><title>Compactor</title><body><h1>Compactor: the user interface was not built</h1>\
             <p>Run <code>npm ci &amp;&amp; npm run build</code> in <code>ui/</code> (or <code>scripts/demo.sh --gui</code>), then rebuild the app.</p></body>",
        )
        .expect("write ui/dist/index.html");
    }
    println!("cargo:rerun-if-changed=../ui/dist");
    tauri_build::try_build(tauri_build::Attributes::new().app_manifest(tauri_build::AppManifest::new().commands(&[
        "app_info",
        "pick_path",
        "open_model",
        "load_spectra",
        "layer_view",
        "heat_value",
        "preview_plan",
        "load_plan",
        "save_plan",
        "run_plan",
        "cancel_job",
        "compare",
        "save_report",
    ])))
    .expect("tauri build step");
}
