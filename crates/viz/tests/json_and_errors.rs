//! JSON inputs (what `compactor render` passes) and error reporting.

use compactor_viz::{render_json, Renderer, VizError};

#[test]
fn every_chart_kind_renders_from_json() {
    let r = Renderer::new().unwrap();
    let inputs = [
        ("spectra", r#"{"title":"t","series":[{"label":"L0 q","values":[5,3,1,0.5,0.1],"color_key":{"Role":"q"},"mark_rank":3},
                      {"label":"L1","values":[4,2,1],"color_key":{"Depth":1.0}}]}"#),
        ("heatmap", r#"{"title":"t","rows":3,"cols":4,"data":[1,2,3,4,5,6,7,8,9,10,11,12],"approx":[1,2,3,4,5,6,7,8,9,10,11,0],"reduce":"Rms"}"#),
        ("layer-map", r#"{"title":"t","row_labels":["layer 0","layer 1"],"col_labels":["svd","tt"],"values":[0.1,0.2,null,0.4]}"#),
        ("curves", r#"{"title":"t","x_label":"ratio","y_label":"err","lines":[{"label":"svd","points":[[0.1,0.5],[0.5,0.1]]}],"log_y":true}"#),
    ];
    for (kind, json) in inputs {
        let img = r.render_json(kind, json, 400, 300, 1.0).unwrap_or_else(|e| panic!("{kind}: {e}"));
        assert_eq!((img.width, img.height), (400, 300));
        // not blank: some dark ink somewhere
        assert!(img.pixels.chunks(4).any(|p| p[0] < 80 && p[1] < 80 && p[2] < 80), "{kind} is blank");
    }
}

#[test]
fn convenience_function_and_bad_input_errors() {
    assert!(render_json("curves", r#"{"title":"t","x_label":"x","y_label":"y","lines":[{"label":"a","points":[[0,1],[1,2]]}]}"#, 300, 200, 2.0).is_ok());
    let e = render_json("pie", "{}", 300, 200, 1.0).unwrap_err();
    assert!(e.to_string().contains("unknown chart kind"), "{e}");
    let e = render_json("curves", "{not json", 300, 200, 1.0).unwrap_err();
    assert!(matches!(e, VizError::Json { .. }), "{e}");
    let r = Renderer::new().unwrap();
    let e = r.render_json("heatmap", r#"{"title":"t","rows":3,"cols":4,"data":[1,2]}"#, 300, 200, 1.0).unwrap_err();
    assert!(matches!(e, VizError::InvalidInput(_)), "{e}");
    let e = r.render_json("spectra", r#"{"title":"t","series":[]}"#, 300, 200, 1.0).unwrap_err();
    assert!(matches!(e, VizError::InvalidInput(_)), "{e}");
}

#[test]
fn no_adapter_message_tells_how_to_install_lavapipe() {
    let e = VizError::NoAdapter { detail: "no adapters".into() };
    let msg = e.to_string();
    assert!(msg.contains("apt-get install mesa-vulkan-drivers libvulkan1"), "{msg}");
}
