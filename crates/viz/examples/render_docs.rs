//! Renders one of each chart at 2× scale into docs/images/ (the pictures in the docs).
//! `cargo run -p compactor-viz --example render_docs [-- OUT_DIR]`

#[path = "../tests/common/mod.rs"]
mod common;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let out = std::path::PathBuf::from(std::env::args().nth(1).unwrap_or_else(|| concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/images").into()));
    std::fs::create_dir_all(&out)?;
    let r = compactor_viz::Renderer::new()?;
    println!("adapter: {}", r.adapter_name());
    r.render_spectra(&common::spectra(), 720, 440, 2.0)?.save_png(out.join("spectra.png"))?;
    r.render_spectra(&common::spectra_depth(), 720, 440, 2.0)?.save_png(out.join("spectra-depth.png"))?;
    r.render_heatmap(&common::heatmap(), 640, 480, 2.0)?.save_png(out.join("heatmap.png"))?;
    r.render_layer_map(&common::layer_map(), 640, 520, 2.0)?.save_png(out.join("layer-map.png"))?;
    r.render_curves(&common::curves(), 720, 440, 2.0)?.save_png(out.join("curves.png"))?;
    println!("wrote {}", out.display());
    Ok(())
}
