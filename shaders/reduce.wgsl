// Block reduction of a row-major f32 matrix (rows x cols) to an image (out_w x out_h).
//
// Output pixel (x, y) covers input rows [y*rows/out_h, (y+1)*rows/out_h) and
// columns [x*cols/out_w, (x+1)*cols/out_w) (integer division; at least one
// element, so images larger than the matrix repeat elements).
// mode 0: max |v| over the block; mode 1: RMS, sqrt(mean(v^2)).
// One invocation per output pixel; elements are visited row by row, exactly
// like `reduce_blocks_cpu`, so the two agree to float rounding.
//
// The matrix may arrive in chunks of whole output rows: `data` holds input rows
// starting at `in_row0`, and this dispatch writes output rows
// [out_y0, out_y0 + n_out_rows).

struct Params {
    rows: u32,
    cols: u32,
    out_w: u32,
    out_h: u32,
    mode: u32,
    out_y0: u32,
    in_row0: u32,
    n_out_rows: u32,
};

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> data: array<f32>;
@group(0) @binding(2) var<storage, read_write> out_img: array<f32>;

@compute @workgroup_size(8, 8, 1)
fn reduce_main(@builtin(global_invocation_id) gid: vec3<u32>) {
    let x = gid.x;
    let ly = gid.y;
    if (x >= p.out_w || ly >= p.n_out_rows) {
        return;
    }
    let y = p.out_y0 + ly;
    let r0 = y * p.rows / p.out_h;
    let r1 = max((y + 1u) * p.rows / p.out_h, r0 + 1u);
    let c0 = x * p.cols / p.out_w;
    let c1 = max((x + 1u) * p.cols / p.out_w, c0 + 1u);
    var acc = 0.0;
    for (var r = r0; r < r1; r = r + 1u) {
        let base = (r - p.in_row0) * p.cols;
        for (var c = c0; c < c1; c = c + 1u) {
            let v = data[base + c];
            if (p.mode == 0u) {
                acc = max(acc, abs(v));
            } else {
                acc = acc + v * v;
            }
        }
    }
    if (p.mode == 1u) {
        acc = sqrt(acc / f32((r1 - r0) * (c1 - c0)));
    }
    out_img[y * p.out_w + x] = acc;
}
