// Color-maps a reduced heatmap image (one f32 per pixel, from reduce.wgsl) into
// a pixel-aligned rectangle of the render target.
//
// value -> t = clamp((v - vmin) / (vmax - vmin), 0, 1) -> lut[round(t * 255)],
// the same formula as the CPU path (`colormap::map_value`).

struct HeatParams {
    // x0, y0, w, h of the image rectangle in physical pixels
    rect: vec4<f32>,
    // render target size in physical pixels
    target_size: vec2<f32>,
    vmin: f32,
    vmax: f32,
    img_w: u32,
    img_h: u32,
    _pad0: u32,
    _pad1: u32,
};

@group(0) @binding(0) var<uniform> hp: HeatParams;
@group(0) @binding(1) var<storage, read> vals: array<f32>;
@group(0) @binding(2) var<storage, read> lut: array<u32>;

@vertex
fn vs_main(@builtin(vertex_index) i: u32) -> @builtin(position) vec4<f32> {
    // two triangles covering the rectangle
    var corners = array<vec2<f32>, 6>(
        vec2<f32>(0.0, 0.0), vec2<f32>(1.0, 0.0), vec2<f32>(0.0, 1.0),
        vec2<f32>(1.0, 0.0), vec2<f32>(1.0, 1.0), vec2<f32>(0.0, 1.0),
    );
    let c = corners[i];
    let px = hp.rect.xy + c * hp.rect.zw;
    let ndc = vec2<f32>(2.0 * px.x / hp.target_size.x - 1.0, 1.0 - 2.0 * px.y / hp.target_size.y);
    return vec4<f32>(ndc, 0.0, 1.0);
}

@fragment
fn fs_main(@builtin(position) frag: vec4<f32>) -> @location(0) vec4<f32> {
    let local = frag.xy - hp.rect.xy;
    let ix = min(u32(max(local.x, 0.0) * f32(hp.img_w) / hp.rect.z), hp.img_w - 1u);
    let iy = min(u32(max(local.y, 0.0) * f32(hp.img_h) / hp.rect.w), hp.img_h - 1u);
    let v = vals[iy * hp.img_w + ix];
    let span = max(hp.vmax - hp.vmin, 1e-30);
    let t = clamp((v - hp.vmin) / span, 0.0, 1.0);
    let idx = min(u32(t * 255.0 + 0.5), 255u);
    return unpack4x8unorm(lut[idx]);
}
