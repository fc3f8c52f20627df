//! A small drawing surface in logical points that collects epaint shapes (lines,
//! rectangles, markers, text laid out by epaint's fonts) and tessellates them for the
//! GPU, plus the axis helpers shared by the charts: nice ticks, number formatting,
//! frames and legends.

use epaint::{
    emath::{Align2, Pos2, Rect, Vec2},
    pos2, vec2, ClippedShape, Color32, FontId, Fonts, Shape, Stroke, TextShape,
};
use std::sync::Arc;

pub(crate) const INK: Color32 = Color32::from_rgb(30, 30, 30);
pub(crate) const MUTED: Color32 = Color32::from_rgb(100, 100, 100);
pub(crate) const GRID: Color32 = Color32::from_rgb(225, 225, 225);
pub(crate) const GRID_MINOR: Color32 = Color32::from_rgb(242, 242, 242);
pub(crate) const FRAME: Color32 = Color32::from_rgb(110, 110, 110);

pub(crate) const TITLE_SIZE: f32 = 17.0;
pub(crate) const LABEL_SIZE: f32 = 13.0;
pub(crate) const TICK_SIZE: f32 = 11.5;
pub(crate) const TICK_LEN: f32 = 4.0;

/// Collects shapes for one chart of `size` points.
pub(crate) struct Canvas<'f> {
    fonts: &'f mut Fonts,
    pub scale: f32,
    pub size: Vec2,
    shapes: Vec<ClippedShape>,
    clip: Rect,
}

impl<'f> Canvas<'f> {
    pub fn new(fonts: &'f mut Fonts, width: f32, height: f32, scale: f32) -> Self {
        fonts.begin_pass(crate::gpu::text_options(), Default::default());
        let size = vec2(width, height);
        Canvas { fonts, scale, size, shapes: Vec::new(), clip: Rect::from_min_size(Pos2::ZERO, size) }
    }

    /// Shapes added after this are clipped to `rect` (None: the whole canvas).
    pub fn set_clip(&mut self, rect: Option<Rect>) {
        self.clip = rect.unwrap_or(Rect::from_min_size(Pos2::ZERO, self.size));
    }

    pub fn add(&mut self, shape: Shape) {
        self.shapes.push(ClippedShape::new(self.clip, shape));
    }

    pub fn galley(&mut self, text: &str, size: f32, color: Color32) -> Arc<epaint::Galley> {
        self.fonts.with_pixels_per_point(self.scale).layout_no_wrap(text.to_string(), FontId::proportional(size), color)
    }

    /// Width and height of `text` at font `size`.
    pub fn measure(&mut self, text: &str, size: f32) -> Vec2 {
        self.galley(text, size, INK).size()
    }

    /// Draws `text` with its `anchor` point at `pos`; returns the covered rectangle.
    pub fn text(&mut self, pos: Pos2, anchor: Align2, text: &str, size: f32, color: Color32) -> Rect {
        let g = self.galley(text, size, color);
        let rect = anchor.anchor_size(pos, g.size());
        self.add(Shape::galley(rect.min, g, color));
        rect
    }

    /// Draws `text` rotated 90° counter-clockwise (reading bottom to top), centered at `center`.
    pub fn text_vertical(&mut self, center: Pos2, text: &str, size: f32, color: Color32) {
        let g = self.galley(text, size, color);
        let s = g.size();
        // With angle -90°, the galley's x axis points up and its y axis points right.
        let pos = pos2(center.x - s.y / 2.0, center.y + s.x / 2.0);
        self.add(Shape::Text(TextShape::new(pos, g, color).with_angle(-std::f32::consts::FRAC_PI_2)));
    }

    pub fn line(&mut self, a: Pos2, b: Pos2, width: f32, color: Color32) {
        self.add(Shape::line_segment([a, b], Stroke::new(width, color)));
    }

    pub fn polyline(&mut self, pts: Vec<Pos2>, width: f32, color: Color32) {
        if pts.len() >= 2 {
            self.add(Shape::line(pts, Stroke::new(width, color)));
        }
    }

    pub fn dashed(&mut self, a: Pos2, b: Pos2, width: f32, color: Color32, dash: f32, gap: f32) {
        for s in Shape::dashed_line(&[a, b], Stroke::new(width, color), dash, gap) {
            self.add(s);
        }
    }

    pub fn rect_filled(&mut self, rect: Rect, color: Color32) {
        self.add(Shape::rect_filled(rect, 0.0, color));
    }

    pub fn rect_stroke(&mut self, rect: Rect, width: f32, color: Color32) {
        self.add(Shape::rect_stroke(rect, 0.0, Stroke::new(width, color), epaint::StrokeKind::Middle));
    }

    /// A marker of style `kind` (0 circle, 1 square, 2 triangle, 3 diamond, repeating).
    pub fn marker(&mut self, c: Pos2, kind: usize, r: f32, color: Color32) {
        let outline = Stroke::new(1.0, Color32::WHITE);
        match kind % 4 {
            0 => {
                self.add(Shape::circle_filled(c, r, color));
                self.add(Shape::circle_stroke(c, r, outline));
            }
            1 => self.add(Shape::rect_filled(Rect::from_center_size(c, Vec2::splat(1.8 * r)), 0.0, color)),
            2 => self.add(Shape::convex_polygon(
                vec![pos2(c.x, c.y - 1.2 * r), pos2(c.x + 1.1 * r, c.y + 0.8 * r), pos2(c.x - 1.1 * r, c.y + 0.8 * r)],
                color,
                outline,
            )),
            _ => self.add(Shape::convex_polygon(
                vec![pos2(c.x, c.y - 1.3 * r), pos2(c.x + 1.1 * r, c.y), pos2(c.x, c.y + 1.3 * r), pos2(c.x - 1.1 * r, c.y)],
                color,
                outline,
            )),
        }
    }

    /// A vertical color bar: `colors` from bottom (index 0) to top, drawn as one mesh.
    pub fn color_bar(&mut self, rect: Rect, colors: &[Color32]) {
        let mut mesh = epaint::Mesh::default();
        let n = colors.len();
        for (i, &c) in colors.iter().enumerate() {
            let y = rect.max.y - rect.height() * i as f32 / (n - 1) as f32;
            mesh.colored_vertex(pos2(rect.min.x, y), c);
            mesh.colored_vertex(pos2(rect.max.x, y), c);
            if i > 0 {
                let k = 2 * i as u32;
                mesh.add_triangle(k - 2, k - 1, k);
                mesh.add_triangle(k - 1, k + 1, k);
            }
        }
        self.add(Shape::mesh(mesh));
    }

    /// Tessellates everything drawn so far and snapshots the font atlas.
    pub fn finish(self) -> (Vec<epaint::ClippedPrimitive>, epaint::ColorImage) {
        let atlas = self.fonts.texture_atlas();
        let mut tess = epaint::Tessellator::new(
            self.scale,
            epaint::TessellationOptions { parallel_tessellation: false, ..Default::default() },
            atlas.size(),
            atlas.prepared_discs(),
        );
        let prims = tess.tessellate_shapes(self.shapes);
        let image = self.fonts.image();
        let _ = self.fonts.font_image_delta(); // the whole atlas is uploaded each frame
        (prims, image)
    }
}

/// A color with its alpha scaled (premultiplied, as epaint wants).
pub(crate) fn fade(c: Color32, a: f32) -> Color32 {
    c.gamma_multiply(a)
}

// ---------------------------------------------------------------- ticks and numbers

/// A "nice" step (1, 2 or 5 × 10^k) giving about `target` intervals over `span`.
pub(crate) fn nice_step(span: f64, target: usize) -> f64 {
    let raw = span / target.max(1) as f64;
    if !(raw.is_finite() && raw > 0.0) {
        return 1.0;
    }
    let mag = 10f64.powf(raw.log10().floor());
    let f = raw / mag;
    let nice = if f <= 1.0 {
        1.0
    } else if f <= 2.0 {
        2.0
    } else if f <= 5.0 {
        5.0
    } else {
        10.0
    };
    nice * mag
}

/// Ticks at multiples of a nice step inside [lo, hi].
pub(crate) fn linear_ticks(lo: f64, hi: f64, target: usize) -> (Vec<f64>, f64) {
    let step = nice_step(hi - lo, target);
    let first = (lo / step - 1e-9).ceil() as i64;
    let last = (hi / step + 1e-9).floor() as i64;
    ((first..=last).map(|k| k as f64 * step).collect(), step)
}

/// Formats a tick value given the tick step (enough decimals to tell ticks apart).
pub(crate) fn fmt_tick(v: f64, step: f64) -> String {
    if v == 0.0 {
        return "0".into();
    }
    let a = v.abs();
    if (1e-3..1e6).contains(&a) {
        let dec = (-(step.log10().floor())).max(0.0) as usize;
        format!("{:.*}", dec.min(6), v)
    } else {
        fmt_sci(v)
    }
}

/// "1e-5", "2.5e3": short scientific notation.
pub(crate) fn fmt_sci(v: f64) -> String {
    let s = format!("{:.1e}", v);
    s.replace(".0e", "e")
}

/// A compact value with 3 significant digits, for cells and color bars.
pub(crate) fn fmt_value(v: f64) -> String {
    let a = v.abs();
    if v == 0.0 {
        "0".into()
    } else if (1e-3..1e4).contains(&a) {
        let dec = (2 - a.log10().floor() as i32).max(0) as usize;
        format!("{:.*}", dec, v)
    } else {
        let s = format!("{:.2e}", v);
        s.replace(".00e", "e")
    }
}

/// Log-axis ticks between 10^lo_exp and 10^hi_exp: (value, label, major).
pub(crate) fn log_ticks(lo: f64, hi: f64, max_labels: usize) -> Vec<(f64, Option<String>)> {
    let e0 = lo.log10().floor() as i32;
    let e1 = hi.log10().ceil() as i32;
    let decades = (e1 - e0).max(1) as usize;
    let every = decades.div_ceil(max_labels.max(1)).max(1) as i32;
    // A range holding fewer than two powers of ten (e.g. 0.06 .. 0.7) would show a
    // single label: label 2× and 5× ticks too.
    let powers_inside = (e0..=e1).filter(|&e| {
        let v = 10f64.powi(e);
        v >= lo * (1.0 - 1e-9) && v <= hi * (1.0 + 1e-9)
    });
    let few_powers = decades <= 1 || (powers_inside.count() < 2 && decades <= 3);
    let mut out = Vec::new();
    for e in e0..=e1 {
        for m in 1..10 {
            let v = m as f64 * 10f64.powi(e);
            if v < lo * (1.0 - 1e-9) || v > hi * (1.0 + 1e-9) {
                continue;
            }
            let label = if m == 1 && (e - e0) % every == 0 {
                Some(fmt_pow10(e))
            } else if few_powers && (m == 2 || m == 5) {
                Some(fmt_tick(v, v))
            } else {
                None
            };
            if m == 1 || decades <= 6 {
                out.push((v, label));
            }
        }
    }
    out
}

fn fmt_pow10(e: i32) -> String {
    match e {
        -3..=-1 => format!("{}", 10f64.powi(e)),
        0..=4 => format!("{}", 10i64.pow(e as u32)),
        _ => format!("1e{e}"),
    }
}

// ---------------------------------------------------------------- axes

/// Maps data coordinates into a plot rectangle.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Mapping {
    pub rect: Rect,
    pub x: (f64, f64),
    pub y: (f64, f64),
    pub log_y: bool,
}

impl Mapping {
    pub fn px(&self, x: f64) -> f32 {
        let t = (x - self.x.0) / (self.x.1 - self.x.0);
        self.rect.min.x + (t as f32) * self.rect.width()
    }
    pub fn py(&self, y: f64) -> f32 {
        let (a, b, v) = if self.log_y { (self.y.0.log10(), self.y.1.log10(), y.log10()) } else { (self.y.0, self.y.1, y) };
        let t = (v - a) / (b - a);
        self.rect.max.y - (t as f32) * self.rect.height()
    }
    pub fn pos(&self, x: f64, y: f64) -> Pos2 {
        pos2(self.px(x), self.py(y))
    }
}

/// One legend row: a label drawn next to a swatch of `color` with `marker` style.
pub(crate) struct LegendEntry {
    pub label: String,
    pub color: Color32,
    pub marker: Option<usize>,
}

/// Width a legend of these entries needs.
pub(crate) fn legend_width(c: &mut Canvas, title: Option<&str>, entries: &[LegendEntry]) -> f32 {
    let mut w: f32 = title.map(|t| c.measure(t, LABEL_SIZE).x).unwrap_or(0.0);
    for e in entries {
        w = w.max(28.0 + c.measure(&e.label, TICK_SIZE + 0.5).x);
    }
    w + 16.0
}

/// Draws a legend box with its top-left at `at`; returns its rectangle.
pub(crate) fn draw_legend(c: &mut Canvas, at: Pos2, width: f32, title: Option<&str>, entries: &[LegendEntry]) -> Rect {
    let row = 18.0;
    let title_h = if title.is_some() { 20.0 } else { 0.0 };
    let rect = Rect::from_min_size(at, vec2(width, 8.0 + title_h + row * entries.len() as f32 + 4.0));
    c.rect_filled(rect, Color32::WHITE);
    c.rect_stroke(rect, 1.0, GRID);
    let mut y = at.y + 6.0;
    if let Some(t) = title {
        c.text(pos2(at.x + 8.0, y), Align2::LEFT_TOP, t, LABEL_SIZE, INK);
        y += title_h;
    }
    for e in entries {
        let cy = y + row / 2.0;
        c.line(pos2(at.x + 8.0, cy), pos2(at.x + 28.0, cy), 2.5, e.color);
        if let Some(m) = e.marker {
            c.marker(pos2(at.x + 18.0, cy), m, 3.5, e.color);
        }
        c.text(pos2(at.x + 34.0, cy), Align2::LEFT_CENTER, &e.label, TICK_SIZE + 0.5, INK);
        y += row;
    }
    rect
}

/// Draws the title centered at the top; returns the y where content can start.
pub(crate) fn draw_title(c: &mut Canvas, title: &str, subtitle: Option<&str>) -> f32 {
    let w = c.size.x;
    let r = c.text(pos2(w / 2.0, 10.0), Align2::CENTER_TOP, title, TITLE_SIZE, INK);
    let mut y = r.max.y;
    if let Some(s) = subtitle {
        let r = c.text(pos2(w / 2.0, y + 3.0), Align2::CENTER_TOP, s, TICK_SIZE, MUTED);
        y = r.max.y;
    }
    y + 12.0
}
