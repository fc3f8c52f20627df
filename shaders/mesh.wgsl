// Draws epaint's tessellated meshes (shapes and text glyphs) for compactor-viz.
//
// Vertices are in logical points (epaint's coordinate system, origin top-left);
// colors are premultiplied sRGB bytes, blended in gamma space like egui does.
// The texture is epaint's font atlas (RGBA8, premultiplied); untextured shapes
// sample its white texel at uv (0,0).

struct Screen {
    size_points: vec2<f32>,
    _pad: vec2<f32>,
};

@group(0) @binding(0) var<uniform> screen: Screen;
@group(0) @binding(1) var atlas: texture_2d<f32>;
@group(0) @binding(2) var atlas_sampler: sampler;

struct VsIn {
    @location(0) pos: vec2<f32>,
    @location(1) uv: vec2<f32>,
    @location(2) color: vec4<f32>,
};

struct VsOut {
    @builtin(position) pos: vec4<f32>,
    @location(0) uv: vec2<f32>,
    @location(1) color: vec4<f32>,
};

@vertex
fn vs_main(v: VsIn) -> VsOut {
    var out: VsOut;
    let ndc = vec2<f32>(
        2.0 * v.pos.x / screen.size_points.x - 1.0,
        1.0 - 2.0 * v.pos.y / screen.size_points.y,
    );
    out.pos = vec4<f32>(ndc, 0.0, 1.0);
    out.uv = v.uv;
    out.color = v.color;
    return out;
}

@fragment
fn fs_main(in: VsOut) -> @location(0) vec4<f32> {
    return in.color * textureSample(atlas, atlas_sampler, in.uv);
}
