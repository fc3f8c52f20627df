//! The four chart kinds: layout in logical points, drawn on a [`Canvas`], handed to
//! the GPU as one [`Frame`].

use crate::canvas::*;
use crate::colormap;
use crate::gpu::{Frame, HeatLayer, Renderer};
use crate::image::RgbaImage;
use crate::reduce::ReduceMode;
use crate::{ColorKey, Colormap, Curves, HeatmapInput, LayerMap, Reduce, Series, SpectraChart, VizError};
use epaint::{
    emath::{Align2, Pos2, Rect},
    pos2, vec2, Color32,
};

const TAB10: [u32; 10] = [0x1f77b4, 0xff7f0e, 0x2ca02c, 0xd62728, 0x9467bd, 0x8c564b, 0xe377c2, 0x7f7f7f, 0xbcbd22, 0x17becf];
const ROLES: [&str; 7] = ["q", "k", "v", "o", "gate", "up", "down"];

fn hex(c: u32) -> Color32 {
    Color32::from_rgb((c >> 16) as u8, (c >> 8) as u8, c as u8)
}

fn palette(i: usize) -> Color32 {
    hex(TAB10[i % TAB10.len()])
}

/// "model.layers.3.self_attn.q_proj" / "q_proj" / "Q" → "q".
fn normalize_role(role: &str) -> String {
    let last = role.rsplit('.').next().unwrap_or(role).to_ascii_lowercase();
    last.strip_suffix("_proj").unwrap_or(&last).to_string()
}

fn role_color(role: &str) -> Color32 {
    let r = normalize_role(role);
    match ROLES.iter().position(|&k| k == r) {
        Some(i) => palette(i),
        None => palette(7),
    }
}

fn depth_color(d: f32) -> Color32 {
    // viridis without its last, pale-yellow stretch, so every line shows on white
    let [r, g, b] = colormap::sample(Colormap::Viridis, d.clamp(0.0, 1.0) * 0.88);
    Color32::from_rgb(r, g, b)
}

fn series_color(s: &Series) -> Color32 {
    match &s.color_key {
        ColorKey::Depth(d) => depth_color(*d),
        ColorKey::Role(r) => role_color(r),
    }
}

fn check_size(width: u32, height: u32, scale: f32) -> Result<(), VizError> {
    if width < 160 || height < 120 {
        return Err(VizError::InvalidInput(format!("chart size {width}x{height} is too small (at least 160x120 points)")));
    }
    if !(scale.is_finite() && (0.25..=8.0).contains(&scale)) {
        return Err(VizError::InvalidInput(format!("scale {scale} outside 0.25..=8")));
    }
    Ok(())
}

fn px_size(width: u32, height: u32, scale: f32) -> (u32, u32) {
    ((width as f32 * scale).round() as u32, (height as f32 * scale).round() as u32)
}

/// Axis ticks: (value, optional label).
type Ticks = Vec<(f64, Option<String>)>;

fn lin_ticks_labeled(lo: f64, hi: f64, target: usize, integer: bool) -> Ticks {
    let (vals, mut step) = linear_ticks(lo, hi, target);
    let vals = if integer && step < 1.0 {
        step = 1.0;
        linear_ticks(lo, hi, ((hi - lo) as usize).max(1)).0
    } else {
        vals
    };
    vals.into_iter().map(|v| (v, Some(fmt_tick(v, step)))).collect()
}

/// x ticks whose labels do not collide: fewer ticks until they fit.
fn fitting_x_ticks(c: &mut Canvas, lo: f64, hi: f64, width: f32, integer: bool) -> Ticks {
    let mut target = ((width / 70.0) as usize).clamp(2, 12);
    loop {
        let ticks = lin_ticks_labeled(lo, hi, target, integer);
        let widest = ticks.iter().filter_map(|(_, l)| l.as_ref()).map(|l| c.measure(l, TICK_SIZE).x).fold(0.0, f32::max);
        let n = ticks.len().max(1) as f32;
        if target <= 2 || (widest + 14.0) * n <= width {
            return ticks;
        }
        target -= 1;
    }
}

fn widest_label(c: &mut Canvas, ticks: &Ticks) -> f32 {
    ticks.iter().filter_map(|(_, l)| l.as_ref()).map(|l| c.measure(l, TICK_SIZE).x).fold(0.0, f32::max)
}

/// Space below the plot for x tick labels and the x axis label.
const BOTTOM: f32 = TICK_LEN + 4.0 + TICK_SIZE * 1.3 + 8.0 + LABEL_SIZE * 1.3 + 10.0;

/// Left margin for y tick labels of width `label_w` and a rotated y axis label.
fn left_margin(label_w: f32) -> f32 {
    12.0 + LABEL_SIZE * 1.3 + 8.0 + label_w + TICK_LEN + 4.0
}

/// Grid, frame, ticks, tick labels and axis labels of an x-y plot.
fn draw_axes(c: &mut Canvas, m: &Mapping, xt: &Ticks, yt: &Ticks, x_label: &str, y_label: &str) {
    let r = m.rect;
    for (v, l) in yt {
        let y = m.py(*v);
        c.line(pos2(r.min.x, y), pos2(r.max.x, y), 1.0, if l.is_some() { GRID } else { GRID_MINOR });
    }
    for (v, _) in xt {
        let x = m.px(*v);
        c.line(pos2(x, r.min.y), pos2(x, r.max.y), 1.0, GRID);
    }
    for (v, l) in yt {
        let y = m.py(*v);
        let len = if l.is_some() { TICK_LEN } else { TICK_LEN * 0.6 };
        c.line(pos2(r.min.x - len, y), pos2(r.min.x, y), 1.0, FRAME);
        if let Some(l) = l {
            c.text(pos2(r.min.x - TICK_LEN - 4.0, y), Align2::RIGHT_CENTER, l, TICK_SIZE, INK);
        }
    }
    for (v, l) in xt {
        let x = m.px(*v);
        c.line(pos2(x, r.max.y), pos2(x, r.max.y + TICK_LEN), 1.0, FRAME);
        if let Some(l) = l {
            c.text(pos2(x, r.max.y + TICK_LEN + 3.0), Align2::CENTER_TOP, l, TICK_SIZE, INK);
        }
    }
    c.rect_stroke(r, 1.0, FRAME);
    c.text(pos2(r.center().x, c.size.y - 10.0), Align2::CENTER_BOTTOM, x_label, LABEL_SIZE, INK);
    c.text_vertical(pos2(12.0 + LABEL_SIZE * 0.65, r.center().y), y_label, LABEL_SIZE, INK);
}

/// Keeps at most ~2 points per pixel column: for each column the first, min, max and
/// last point, in x order, so the drawn line looks the same.
fn decimate(pts: Vec<Pos2>, columns: usize) -> Vec<Pos2> {
    if pts.len() <= 4 * columns.max(1) {
        return pts;
    }
    let mut out = Vec::with_capacity(4 * columns);
    let mut i = 0;
    while i < pts.len() {
        let col = pts[i].x.floor();
        let mut j = i;
        let (mut lo, mut hi) = (i, i);
        while j < pts.len() && pts[j].x.floor() == col {
            if pts[j].y < pts[lo].y {
                lo = j;
            }
            if pts[j].y > pts[hi].y {
                hi = j;
            }
            j += 1;
        }
        let mut idx = vec![i, lo, hi, j - 1];
        idx.sort_unstable();
        idx.dedup();
        out.extend(idx.into_iter().map(|k| pts[k]));
        i = j;
    }
    out
}

/// Log range [lo, hi] of positive values, padded a little.
fn log_range(lo: f64, hi: f64) -> (f64, f64) {
    let (mut a, mut b) = (lo.log10(), hi.log10());
    if b - a < 1e-6 {
        a -= 0.5;
        b += 0.5;
    }
    let pad = (b - a) * 0.04;
    (10f64.powf(a - pad), 10f64.powf(b + pad))
}

fn lin_range(lo: f64, hi: f64) -> (f64, f64) {
    if hi - lo < 1e-12 * hi.abs().max(1.0) {
        return (lo - 0.5, hi + 0.5);
    }
    let pad = (hi - lo) * 0.05;
    (lo - pad, hi + pad)
}

impl Renderer {
    fn canvas_frame<F>(&self, width: u32, height: u32, scale: f32, draw: F) -> Result<RgbaImage, VizError>
    where
        F: FnOnce(&mut Canvas) -> Result<Option<HeatLayer>, VizError>,
    {
        check_size(width, height, scale)?;
        let (wp, hp) = px_size(width, height, scale);
        let mut fonts = self.fonts.lock().map_err(|_| VizError::Gpu("font cache poisoned by a panic".into()))?;
        let mut c = Canvas::new(&mut fonts, wp as f32 / scale, hp as f32 / scale, scale);
        let heat = draw(&mut c)?;
        let (primitives, atlas) = c.finish();
        drop(fonts);
        self.draw(Frame { width_px: wp, height_px: hp, scale, primitives, atlas, heat })
    }

    /// Singular-value spectra: x = index (1-based), y = value on a log scale.
    ///
    /// `width × height` is the logical size; the image has `scale` times as many pixels
    /// in each direction.
    pub fn render_spectra(&self, chart: &SpectraChart, width: u32, height: u32, scale: f32) -> Result<RgbaImage, VizError> {
        if chart.series.is_empty() {
            return Err(VizError::InvalidInput("spectra chart has no series".into()));
        }
        let mut lo = f64::INFINITY;
        let mut hi = 0f64;
        let mut n_max = 0usize;
        for s in &chart.series {
            n_max = n_max.max(s.values.len());
            for &v in &s.values {
                if v.is_finite() && v > 0.0 {
                    lo = lo.min(v as f64);
                    hi = hi.max(v as f64);
                }
            }
        }
        if !(hi > 0.0) {
            return Err(VizError::InvalidInput("spectra chart has no positive finite values".into()));
        }
        self.canvas_frame(width, height, scale, |c| {
            // legend
            let all_depth = chart.series.iter().all(|s| matches!(s.color_key, ColorKey::Depth(_)));
            let per_series = chart.series.len() <= 10;
            let mut entries = Vec::new();
            let mut depth_legend: Option<(String, String)> = None;
            if per_series {
                for s in &chart.series {
                    entries.push(LegendEntry { label: s.label.clone(), color: series_color(s), marker: None });
                }
            } else if all_depth {
                let key = |s: &Series| match s.color_key {
                    ColorKey::Depth(d) => d,
                    _ => 0.0,
                };
                let first = chart.series.iter().min_by(|a, b| key(a).total_cmp(&key(b))).unwrap();
                let last = chart.series.iter().max_by(|a, b| key(a).total_cmp(&key(b))).unwrap();
                depth_legend = Some((first.label.clone(), last.label.clone()));
            } else {
                let mut roles: Vec<String> = Vec::new();
                for s in &chart.series {
                    if let ColorKey::Role(r) = &s.color_key {
                        let r = normalize_role(r);
                        if !roles.contains(&r) {
                            roles.push(r);
                        }
                    }
                }
                roles.sort_by_key(|r| ROLES.iter().position(|k| k == r).unwrap_or(ROLES.len()));
                for r in roles {
                    entries.push(LegendEntry { color: role_color(&r), label: r, marker: None });
                }
            }
            let legend_title = if per_series { None } else if all_depth { Some("layer depth") } else { Some("role") };
            let legend_w = match &depth_legend {
                Some((a, b)) => {
                    let t = c.measure("layer depth", LABEL_SIZE).x;
                    (14.0 + 8.0 + c.measure(a, TICK_SIZE).x.max(c.measure(b, TICK_SIZE).x)).max(t) + 16.0
                }
                None => legend_width(c, legend_title, &entries),
            };

            let marks: Vec<(usize, usize)> = chart
                .series
                .iter()
                .enumerate()
                .filter_map(|(i, s)| s.mark_rank.filter(|&r| r >= 1 && r <= s.values.len()).map(|r| (i, r)))
                .collect();
            let label_marks = marks.len() <= 6;
            let subtitle = if !marks.is_empty() && !label_marks { Some("dots: truncation rank of each series") } else { None };
            let top = draw_title(c, &chart.title, subtitle);

            let (y0, y1) = log_range(lo, hi);
            let est_h = c.size.y - top - BOTTOM;
            let yt = log_ticks(y0, y1, ((est_h / 30.0) as usize).max(2));
            let left = left_margin(widest_label(c, &yt));
            let right = legend_w + 20.0;
            let rect = Rect::from_min_max(pos2(left, top), pos2(c.size.x - right, c.size.y - BOTTOM));
            if rect.width() < 40.0 || rect.height() < 40.0 {
                return Err(VizError::InvalidInput("chart too small for its labels and legend".into()));
            }
            let xr = if n_max <= 1 { (0.5, 1.5) } else { (1.0, n_max as f64) };
            let xt = fitting_x_ticks(c, xr.0, xr.1, rect.width(), true);
            let xt: Ticks = xt.into_iter().filter(|(v, _)| *v >= xr.0 - 1e-9).collect();
            let m = Mapping { rect, x: xr, y: (y0, y1), log_y: true };
            draw_axes(c, &m, &xt, &yt, "singular value index i (1 = largest)", "singular value σ_i");

            c.set_clip(Some(rect));
            let width = if chart.series.len() > 8 { 1.2 } else { 1.8 };
            let columns = (rect.width() * c.scale) as usize;
            for s in &chart.series {
                let color = series_color(s);
                let pts: Vec<Pos2> = s
                    .values
                    .iter()
                    .enumerate()
                    .filter(|(_, v)| v.is_finite() && **v > 0.0)
                    .map(|(i, &v)| m.pos((i + 1) as f64, v as f64))
                    .collect();
                c.polyline(decimate(pts, columns), width, color);
            }
            // truncation ranks
            for (k, &(i, r)) in marks.iter().enumerate() {
                let s = &chart.series[i];
                let color = series_color(s);
                let x = m.px(r as f64);
                let v = s.values[r - 1];
                if label_marks {
                    c.dashed(pos2(x, rect.min.y), pos2(x, rect.max.y), 1.2, fade(color, 0.9), 5.0, 3.0);
                }
                if v.is_finite() && v > 0.0 {
                    c.marker(m.pos(r as f64, v as f64), 0, if label_marks { 4.0 } else { 3.0 }, color);
                }
                if label_marks {
                    let text = format!("r = {r}");
                    let size = c.measure(&text, TICK_SIZE);
                    let y = rect.min.y + 5.0 + (k as f32) * (size.y + 4.0);
                    let right_side = x + 5.0 + size.x + 4.0 < rect.max.x;
                    let (p, a) = if right_side { (pos2(x + 5.0, y), Align2::LEFT_TOP) } else { (pos2(x - 5.0, y), Align2::RIGHT_TOP) };
                    let bg = a.anchor_size(p, size).expand(2.0);
                    c.rect_filled(bg, fade(Color32::WHITE, 0.85));
                    c.text(p, a, &text, TICK_SIZE, color);
                }
            }
            c.set_clip(None);

            // legend
            let at = pos2(rect.max.x + 14.0, rect.min.y);
            match depth_legend {
                Some((first, last)) => {
                    let h = (rect.height() * 0.5).clamp(60.0, 200.0);
                    let box_r = Rect::from_min_size(at, vec2(legend_w, h + 36.0));
                    c.rect_stroke(box_r, 1.0, GRID);
                    c.text(pos2(at.x + 8.0, at.y + 6.0), Align2::LEFT_TOP, "layer depth", LABEL_SIZE, INK);
                    let bar = Rect::from_min_size(pos2(at.x + 8.0, at.y + 28.0), vec2(14.0, h));
                    // first layer at the top, as the legend reads downwards
                    let colors: Vec<Color32> = (0..=32).map(|i| depth_color(1.0 - i as f32 / 32.0)).collect();
                    c.color_bar(bar, &colors);
                    c.text(pos2(bar.max.x + 6.0, bar.min.y), Align2::LEFT_TOP, &first, TICK_SIZE, INK);
                    c.text(pos2(bar.max.x + 6.0, bar.max.y), Align2::LEFT_BOTTOM, &last, TICK_SIZE, INK);
                }
                None => {
                    draw_legend(c, at, legend_w, legend_title, &entries);
                }
            }
            Ok(None)
        })
    }

    /// Error-vs-parameter-ratio curves, one line (with markers) per method.
    pub fn render_curves(&self, chart: &Curves, width: u32, height: u32, scale: f32) -> Result<RgbaImage, VizError> {
        let pts = || chart.lines.iter().flat_map(|l| l.points.iter()).filter(|(x, y)| x.is_finite() && y.is_finite() && (!chart.log_y || *y > 0.0));
        if pts().next().is_none() {
            return Err(VizError::InvalidInput("curves chart has no drawable points".into()));
        }
        let (mut x0, mut x1, mut y0, mut y1) = (f64::INFINITY, f64::NEG_INFINITY, f64::INFINITY, f64::NEG_INFINITY);
        for &(x, y) in pts() {
            x0 = x0.min(x);
            x1 = x1.max(x);
            y0 = y0.min(y);
            y1 = y1.max(y);
        }
        self.canvas_frame(width, height, scale, |c| {
            let entries: Vec<LegendEntry> = chart
                .lines
                .iter()
                .enumerate()
                .map(|(i, l)| LegendEntry { label: l.label.clone(), color: palette(i), marker: Some(i) })
                .collect();
            let legend_w = legend_width(c, None, &entries);
            let top = draw_title(c, &chart.title, None);
            let est_h = c.size.y - top - BOTTOM;
            let yr = if chart.log_y { log_range(y0, y1) } else { lin_range(y0, y1) };
            let yt = if chart.log_y {
                log_ticks(yr.0, yr.1, ((est_h / 30.0) as usize).max(2))
            } else {
                lin_ticks_labeled(yr.0, yr.1, ((est_h / 45.0) as usize).clamp(2, 10), false)
            };
            let left = left_margin(widest_label(c, &yt));
            let rect = Rect::from_min_max(pos2(left, top), pos2(c.size.x - legend_w - 20.0, c.size.y - BOTTOM));
            if rect.width() < 40.0 || rect.height() < 40.0 {
                return Err(VizError::InvalidInput("chart too small for its labels and legend".into()));
            }
            let xr = lin_range(x0, x1);
            let xt = fitting_x_ticks(c, xr.0, xr.1, rect.width(), false);
            let m = Mapping { rect, x: xr, y: yr, log_y: chart.log_y };
            draw_axes(c, &m, &xt, &yt, &chart.x_label, &chart.y_label);
            c.set_clip(Some(rect.expand(6.0)));
            for (i, l) in chart.lines.iter().enumerate() {
                let p: Vec<Pos2> = l
                    .points
                    .iter()
                    .filter(|(x, y)| x.is_finite() && y.is_finite() && (!chart.log_y || *y > 0.0))
                    .map(|&(x, y)| m.pos(x, y))
                    .collect();
                c.polyline(p.clone(), 2.0, palette(i));
                for q in p {
                    c.marker(q, i, 4.0, palette(i));
                }
            }
            c.set_clip(None);
            draw_legend(c, pos2(rect.max.x + 14.0, rect.min.y), legend_w, None, &entries);
            Ok(None)
        })
    }

    /// Whole-model table: rows (layers) × columns (methods or ranks), cells colored by
    /// value with the value written in, NaN cells grey and marked "n/a".
    pub fn render_layer_map(&self, map: &LayerMap, width: u32, height: u32, scale: f32) -> Result<RgbaImage, VizError> {
        let (nr, nc) = (map.row_labels.len(), map.col_labels.len());
        if nr == 0 || nc == 0 {
            return Err(VizError::InvalidInput("layer map needs at least one row and one column label".into()));
        }
        if map.values.len() != nr * nc {
            return Err(VizError::InvalidInput(format!(
                "layer map has {} values, expected rows*cols = {nr}*{nc} = {}",
                map.values.len(),
                nr * nc
            )));
        }
        let finite: Vec<f64> = map.values.iter().copied().filter(|v| v.is_finite()).collect();
        let use_log = map.log_color && finite.iter().all(|&v| v > 0.0) && !finite.is_empty();
        let tf = |v: f64| if use_log { v.log10() } else { v };
        let (mut vmin, mut vmax) = finite.iter().fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), &v| (a.min(tf(v)), b.max(tf(v))));
        if finite.is_empty() {
            (vmin, vmax) = (0.0, 1.0);
        }
        if vmax - vmin < 1e-12 {
            vmax = vmin + 1.0;
        }
        let lut = colormap::lut(map.colormap);
        let color_of = |v: f64| {
            let [r, g, b, _] = lut[colormap::lut_index(tf(v) as f32, vmin as f32, vmax as f32)].to_le_bytes();
            Color32::from_rgb(r, g, b)
        };
        self.canvas_frame(width, height, scale, |c| {
            let top = draw_title(c, &map.title, None);
            // color bar ticks
            let cb_ticks: Ticks = if use_log {
                log_ticks(10f64.powf(vmin), 10f64.powf(vmax), 6).into_iter().filter(|(_, l)| l.is_some()).map(|(v, l)| (v.log10(), l)).collect()
            } else {
                let (vals, step) = linear_ticks(vmin, vmax, 5);
                vals.into_iter().map(|v| (v, Some(fmt_tick(v, step)))).collect()
            };
            let cb_label_w = widest_label(c, &cb_ticks);
            let right = 16.0 + 14.0 + TICK_LEN + 4.0 + cb_label_w + 12.0;
            let row_font = TICK_SIZE;
            let row_w = map.row_labels.iter().map(|l| c.measure(l, row_font).x).fold(0.0, f32::max);
            let left = 12.0 + row_w + 8.0;
            let grid_w = c.size.x - left - right;
            let cell_w = grid_w / nc as f32;
            let col_w = map.col_labels.iter().map(|l| c.measure(l, TICK_SIZE).x).fold(0.0, f32::max);
            let rotate_cols = col_w > cell_w - 6.0;
            let col_h = if rotate_cols { col_w + 10.0 } else { TICK_SIZE * 1.4 + 8.0 };
            let grid = Rect::from_min_max(pos2(left, top + col_h), pos2(c.size.x - right, c.size.y - 14.0));
            if grid.width() < 20.0 || grid.height() < 20.0 {
                return Err(VizError::InvalidInput("layer map too small for its labels".into()));
            }
            let cell_h = grid.height() / nr as f32;
            // column labels
            for (j, l) in map.col_labels.iter().enumerate() {
                let x = grid.min.x + (j as f32 + 0.5) * cell_w;
                if rotate_cols {
                    let g = c.measure(l, TICK_SIZE);
                    c.text_vertical(pos2(x, grid.min.y - 6.0 - g.x / 2.0), l, TICK_SIZE, INK);
                } else {
                    c.text(pos2(x, grid.min.y - 6.0), Align2::CENTER_BOTTOM, l, TICK_SIZE, INK);
                }
            }
            // row labels: thin out when rows are too short for the font
            let rfont = row_font.min(cell_h * 0.9).max(8.0);
            let every = ((rfont * 1.15) / cell_h).ceil().max(1.0) as usize;
            for (i, l) in map.row_labels.iter().enumerate() {
                if i % every != 0 {
                    continue;
                }
                let y = grid.min.y + (i as f32 + 0.5) * cell_h;
                c.text(pos2(grid.min.x - 8.0, y), Align2::RIGHT_CENTER, l, rfont, INK);
            }
            // cells
            let gap = if cell_h > 6.0 && cell_w > 6.0 { 1.0 } else { 0.0 };
            let vfont = (cell_h * 0.62).min(12.0);
            for i in 0..nr {
                for j in 0..nc {
                    let v = map.values[i * nc + j];
                    let cell = Rect::from_min_size(pos2(grid.min.x + j as f32 * cell_w, grid.min.y + i as f32 * cell_h), vec2(cell_w, cell_h));
                    let inner = Rect::from_min_max(cell.min, cell.max - vec2(gap, gap));
                    let (fill, text) = if v.is_finite() { (color_of(v), fmt_value(v)) } else { (Color32::from_gray(232), "n/a".to_string()) };
                    c.rect_filled(inner, fill);
                    if vfont >= 7.0 {
                        let ts = c.measure(&text, vfont);
                        if ts.x <= inner.width() - 4.0 {
                            let lum = 0.299 * fill.r() as f32 + 0.587 * fill.g() as f32 + 0.114 * fill.b() as f32;
                            let tc = if !v.is_finite() { MUTED } else if lum < 140.0 { Color32::WHITE } else { INK };
                            c.text(inner.center(), Align2::CENTER_CENTER, &text, vfont, tc);
                        }
                    }
                }
            }
            // color bar
            let bar = Rect::from_min_max(pos2(grid.max.x + 16.0, grid.min.y), pos2(grid.max.x + 30.0, grid.max.y));
            let colors: Vec<Color32> = (0..=64)
                .map(|i| {
                    let [r, g, b, _] = lut[i * 255 / 64].to_le_bytes();
                    Color32::from_rgb(r, g, b)
                })
                .collect();
            c.color_bar(bar, &colors);
            c.rect_stroke(bar, 1.0, FRAME);
            for (v, l) in &cb_ticks {
                let y = bar.max.y - ((v - vmin) / (vmax - vmin)) as f32 * bar.height();
                c.line(pos2(bar.max.x, y), pos2(bar.max.x + TICK_LEN, y), 1.0, FRAME);
                if let Some(l) = l {
                    c.text(pos2(bar.max.x + TICK_LEN + 3.0, y), Align2::LEFT_CENTER, l, TICK_SIZE, INK);
                }
            }
            Ok(None)
        })
    }

    /// Reconstruction-error heatmap of one matrix: the matrix is reduced to the plot's
    /// pixel size on the GPU (max or RMS of |W − Ŵ| per block), color-mapped by a
    /// shader, and framed with row/column axes and a color bar.
    pub fn render_heatmap(&self, input: &HeatmapInput, width: u32, height: u32, scale: f32) -> Result<RgbaImage, VizError> {
        let (rows, cols) = (input.rows, input.cols);
        if rows == 0 || cols == 0 || input.data.len() != rows * cols {
            return Err(VizError::InvalidInput(format!(
                "heatmap data has {} values, expected rows*cols = {rows}*{cols} = {}",
                input.data.len(),
                rows * cols
            )));
        }
        let diff: Option<Vec<f32>> = match &input.approx {
            Some(a) if a.len() != input.data.len() => {
                return Err(VizError::InvalidInput(format!("heatmap approx has {} values, data has {}", a.len(), input.data.len())))
            }
            Some(a) => Some(input.data.iter().zip(a).map(|(w, h)| (w - h).abs()).collect()),
            None => None,
        };
        let data: &[f32] = diff.as_deref().unwrap_or(&input.data);
        let mode = ReduceMode::from(input.reduce);
        let what = match input.reduce {
            Reduce::Max => "max",
            Reduce::Rms => "RMS",
        };
        self.canvas_frame(width, height, scale, |c| {
            let title_h = c.measure(&input.title, TITLE_SIZE).y;
            let sub_h = c.measure("Ag", TICK_SIZE).y;
            let top = 10.0 + title_h + 3.0 + sub_h + 12.0;
            // y ticks: row indices, 0 at the top
            let est_h = c.size.y - top - BOTTOM;
            let yt = lin_ticks_labeled(0.0, rows as f64, ((est_h / 45.0) as usize).clamp(2, 10), true);
            let left = left_margin(widest_label(c, &yt));
            // color bar on the right: ticks decided after the reduction, reserve room for
            // labels like "0.000123"
            let cb_label_w = c.measure("0.00000", TICK_SIZE).x;
            let right = 16.0 + 14.0 + TICK_LEN + 4.0 + cb_label_w + 8.0 + LABEL_SIZE * 1.3 + 10.0;
            let want = Rect::from_min_max(pos2(left, top), pos2(c.size.x - right, c.size.y - BOTTOM));
            if want.width() < 20.0 || want.height() < 20.0 {
                return Err(VizError::InvalidInput("heatmap too small for its labels".into()));
            }
            // pixel-aligned image rectangle
            let s = c.scale;
            let (px0, py0) = ((want.min.x * s).round() as u32, (want.min.y * s).round() as u32);
            let (px1, py1) = ((want.max.x * s).round() as u32, (want.max.y * s).round() as u32);
            let (iw, ih) = (px1 - px0, py1 - py0);
            let rect = Rect::from_min_max(pos2(px0 as f32 / s, py0 as f32 / s), pos2(px1 as f32 / s, py1 as f32 / s));

            let values = self.reduce_to_buffer(rows, cols, data, iw as usize, ih as usize, mode)?;
            let reduced = self.read_buffer(&values, (iw * ih * 4) as u64)?;
            let reduced: Vec<f32> = bytemuck::pod_collect_to_vec(&reduced);
            let data_max = reduced.iter().copied().filter(|v| v.is_finite()).fold(0f32, f32::max);
            let vmax = input.vmax.filter(|v| v.is_finite() && *v > 0.0).unwrap_or(if data_max > 0.0 { data_max } else { 1.0 });

            c.text(pos2(c.size.x / 2.0, 10.0), Align2::CENTER_TOP, &input.title, TITLE_SIZE, INK);
            let sub = format!(
                "{rows} × {cols} matrix, {what} of |W − Ŵ| over blocks of ≈ {:.1} × {:.1} elements per pixel",
                rows as f64 / ih as f64,
                cols as f64 / iw as f64
            );
            c.text(pos2(c.size.x / 2.0, 10.0 + title_h + 3.0), Align2::CENTER_TOP, &sub, TICK_SIZE, MUTED);

            let m = Mapping { rect, x: (0.0, cols as f64), y: (rows as f64, 0.0), log_y: false };
            let xt = fitting_x_ticks(c, 0.0, cols as f64, rect.width(), true);
            // axes without grid lines over the image
            for (v, l) in &yt {
                let y = m.py(*v);
                c.line(pos2(rect.min.x - TICK_LEN, y), pos2(rect.min.x, y), 1.0, FRAME);
                if let Some(l) = l {
                    c.text(pos2(rect.min.x - TICK_LEN - 4.0, y), Align2::RIGHT_CENTER, l, TICK_SIZE, INK);
                }
            }
            for (v, l) in &xt {
                let x = m.px(*v);
                c.line(pos2(x, rect.max.y), pos2(x, rect.max.y + TICK_LEN), 1.0, FRAME);
                if let Some(l) = l {
                    c.text(pos2(x, rect.max.y + TICK_LEN + 3.0), Align2::CENTER_TOP, l, TICK_SIZE, INK);
                }
            }
            c.rect_stroke(rect.expand(0.5), 1.0, FRAME);
            c.text(pos2(rect.center().x, c.size.y - 10.0), Align2::CENTER_BOTTOM, "column (input feature)", LABEL_SIZE, INK);
            c.text_vertical(pos2(12.0 + LABEL_SIZE * 0.65, rect.center().y), "row (output feature)", LABEL_SIZE, INK);

            // color bar
            let lut = colormap::lut(input.colormap);
            let bar = Rect::from_min_max(pos2(rect.max.x + 16.0, rect.min.y), pos2(rect.max.x + 30.0, rect.max.y));
            let colors: Vec<Color32> = (0..=64)
                .map(|i| {
                    let [r, g, b, _] = lut[i * 255 / 64].to_le_bytes();
                    Color32::from_rgb(r, g, b)
                })
                .collect();
            c.color_bar(bar, &colors);
            c.rect_stroke(bar, 1.0, FRAME);
            let (ticks, step) = linear_ticks(0.0, vmax as f64, 5);
            let mut label_right: f32 = bar.max.x;
            for v in ticks {
                let y = bar.max.y - (v / vmax as f64) as f32 * bar.height();
                c.line(pos2(bar.max.x, y), pos2(bar.max.x + TICK_LEN, y), 1.0, FRAME);
                let r = c.text(pos2(bar.max.x + TICK_LEN + 3.0, y), Align2::LEFT_CENTER, &fmt_tick(v, step), TICK_SIZE, INK);
                label_right = label_right.max(r.max.x);
            }
            let label = format!("{what} |W − Ŵ|");
            let lx = (label_right + 6.0 + LABEL_SIZE * 0.65).min(c.size.x - LABEL_SIZE * 0.7);
            c.text_vertical(pos2(lx, bar.center().y), &label, LABEL_SIZE, INK);

            Ok(Some(HeatLayer { values, img_w: iw, img_h: ih, rect_px: [px0, py0, iw, ih], vmin: 0.0, vmax, colormap: input.colormap }))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_are_normalized_from_weight_names() {
        assert_eq!(normalize_role("model.layers.3.self_attn.q_proj"), "q");
        assert_eq!(normalize_role("GATE_PROJ"), "gate");
        assert_eq!(normalize_role("down"), "down");
    }

    #[test]
    fn decimation_keeps_extremes_of_each_column() {
        let pts: Vec<Pos2> = (0..1000).map(|i| pos2(i as f32 / 100.0, ((i * 7919) % 101) as f32)).collect();
        let d = decimate(pts.clone(), 2);
        assert!(d.len() <= 40);
        let max_all = pts.iter().map(|p| p.y).fold(0.0, f32::max);
        assert_eq!(d.iter().map(|p| p.y).fold(0.0, f32::max), max_all);
    }
}

impl Renderer {
    /// Just the color-mapped heatmap image, `out_w × out_h` pixels, no axes or text:
    /// block reduction (`shaders/reduce.wgsl`) then color mapping (`shaders/heatmap.wgsl`)
    /// on the scale [0, max of the reduced values]. For thumbnails and for the benchmark
    /// against [`crate::heatmap_image_cpu`].
    pub fn render_heatmap_image(
        &self,
        rows: usize,
        cols: usize,
        data: &[f32],
        out_w: u32,
        out_h: u32,
        mode: ReduceMode,
        map: Colormap,
    ) -> Result<RgbaImage, VizError> {
        let values = self.reduce_to_buffer(rows, cols, data, out_w as usize, out_h as usize, mode)?;
        let reduced = self.read_buffer(&values, (out_w * out_h * 4) as u64)?;
        let vmax = bytemuck::pod_collect_to_vec::<u8, f32>(&reduced).into_iter().filter(|v| v.is_finite()).fold(0f32, f32::max);
        let vmax = if vmax > 0.0 { vmax } else { 1.0 };
        self.draw(Frame {
            width_px: out_w,
            height_px: out_h,
            scale: 1.0,
            primitives: Vec::new(),
            atlas: epaint::ColorImage::new([1, 1], vec![Color32::WHITE]),
            heat: Some(HeatLayer { values, img_w: out_w, img_h: out_h, rect_px: [0, 0, out_w, out_h], vmin: 0.0, vmax, colormap: map }),
        })
    }
}

/// The CPU reference of [`Renderer::render_heatmap_image`]: the same reduction and color
/// map in plain loops.
pub fn heatmap_image_cpu(rows: usize, cols: usize, data: &[f32], out_w: u32, out_h: u32, mode: ReduceMode, map: Colormap) -> RgbaImage {
    let reduced = crate::reduce_blocks_cpu(rows, cols, data, out_w as usize, out_h as usize, mode);
    let vmax = reduced.iter().copied().filter(|v| v.is_finite()).fold(0f32, f32::max);
    let vmax = if vmax > 0.0 { vmax } else { 1.0 };
    RgbaImage { width: out_w, height: out_h, pixels: colormap::map_values(&reduced, 0.0, vmax, map) }
}
