//! The report as a PDF: A4 pages, real text in embedded DejaVu fonts (subset by krilla, so it
//! stays selectable and searchable), charts as images, "page i of n" on every page.
//!
//! Layout is done here in two passes: [`Layout`] flows headings, paragraphs, tables (header
//! repeated on every page they span, cells wrapped), images and preformatted text onto pages as
//! a list of drawing operations; then every page is drawn with krilla, now that the page count
//! is known for the footers.

use crate::html::{environment, heal_sentence, layer_cells, run_facts, summary_cells, variant_sentence, LAYER_COLUMNS, SECTIONS, SUMMARY_COLUMNS};
use crate::model::Report;
use krilla::color::rgb;
use krilla::geom::{PathBuilder, Point, Rect, Size, Transform};
use krilla::image::Image;
use krilla::metadata::Metadata;
use krilla::page::PageSettings;
use krilla::paint::{Fill, Stroke};
use krilla::text::{Font, TextDirection};
use krilla::{Data, Document};
use skrifa::instance::{LocationRef, Size as FontSize};
use skrifa::MetadataProvider;

static REGULAR: &[u8] = include_bytes!("../fonts/DejaVuSans.ttf");
static BOLD: &[u8] = include_bytes!("../fonts/DejaVuSans-Bold.ttf");
static MONO: &[u8] = include_bytes!("../fonts/DejaVuSansMono.ttf");

const PAGE_W: f32 = 595.28;
const PAGE_H: f32 = 841.89;
const LEFT: f32 = 48.0;
const RIGHT: f32 = PAGE_W - 48.0;
const TOP: f32 = 52.0;
const BOTTOM: f32 = PAGE_H - 56.0;
const WIDTH: f32 = RIGHT - LEFT;

type Color = (u8, u8, u8);
const INK: Color = (29, 35, 48);
const MUTED: Color = (91, 100, 117);
const ACCENT: Color = (43, 95, 171);
const RULE: Color = (214, 218, 226);
const HEAD_BG: Color = (238, 241, 246);
const ORIG_BG: Color = (247, 248, 251);
const CODE_BG: Color = (246, 248, 250);
const WARN_BG: Color = (255, 244, 229);
const WARN_FG: Color = (122, 75, 0);

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Face {
    Regular,
    Bold,
    Mono,
}

impl Face {
    fn data(self) -> &'static [u8] {
        match self {
            Face::Regular => REGULAR,
            Face::Bold => BOLD,
            Face::Mono => MONO,
        }
    }

    /// Advance width of `text` at `size` points (no kerning: a slight over-estimate).
    fn width(self, text: &str, size: f32) -> f32 {
        let Ok(font) = skrifa::FontRef::new(self.data()) else { return text.chars().count() as f32 * size * 0.6 };
        let cmap = font.charmap();
        let gm = font.glyph_metrics(FontSize::new(size), LocationRef::default());
        text.chars().map(|c| gm.advance_width(cmap.map(c).unwrap_or_default()).unwrap_or(size * 0.6)).sum()
    }
}

enum Op {
    Text { x: f32, baseline: f32, size: f32, face: Face, text: String, color: Color },
    Rect { x: f32, y: f32, w: f32, h: f32, color: Color },
    Line { x1: f32, y1: f32, x2: f32, y2: f32, width: f32, color: Color },
    Image { x: f32, y: f32, w: f32, h: f32, chart: usize },
}

/// A table column: title, numeric (right-aligned).
struct Col<'a> {
    title: &'a str,
    numeric: bool,
}

struct TableStyle {
    size: f32,
    pad: f32,
    /// Faces per column (the first column of layer tables is monospace).
    faces: Vec<Face>,
    /// Row indices drawn bold on a tinted background.
    highlight: Vec<usize>,
}

struct Layout {
    pages: Vec<Vec<Op>>,
    /// Top of the free space on the current page.
    y: f32,
}

impl Layout {
    fn new() -> Layout {
        Layout { pages: vec![Vec::new()], y: TOP }
    }

    fn page(&mut self) -> &mut Vec<Op> {
        self.pages.last_mut().unwrap()
    }

    fn new_page(&mut self) {
        self.pages.push(Vec::new());
        self.y = TOP;
    }

    /// Starts a new page unless `h` points still fit on this one.
    fn ensure(&mut self, h: f32) {
        if self.y + h > BOTTOM && self.y > TOP {
            self.new_page();
        }
    }

    fn text(&mut self, x: f32, top: f32, size: f32, face: Face, text: &str, color: Color) {
        if text.is_empty() {
            return;
        }
        let baseline = top + size * 0.93;
        self.page().push(Op::Text { x, baseline, size, face, text: text.to_string(), color });
    }

    fn space(&mut self, h: f32) {
        self.y += h;
    }

    /// A heading; `level` 1 is a section (with a rule under it), 2 a sub-section. Keeps at
    /// least `keep` points of what follows on the same page.
    fn heading(&mut self, text: &str, level: u8, keep: f32) {
        let (size, before) = if level == 1 { (15.0, 16.0) } else { (11.5, 10.0) };
        if self.y > TOP {
            self.space(before);
        }
        self.ensure(size * 1.6 + keep);
        let y = self.y;
        self.text(LEFT, y, size, Face::Bold, text, if level == 1 { INK } else { INK });
        self.y += size * 1.35;
        if level == 1 {
            let y = self.y;
            self.page().push(Op::Line { x1: LEFT, y1: y, x2: RIGHT, y2: y, width: 1.2, color: ACCENT });
            self.y += 6.0;
        }
    }

    /// A wrapped paragraph.
    fn para(&mut self, text: &str, size: f32, face: Face, color: Color) {
        let lh = size * 1.4;
        for line in wrap(text, face, size, WIDTH) {
            self.ensure(lh);
            let y = self.y;
            self.text(LEFT, y, size, face, &line, color);
            self.y += lh;
        }
        self.y += 3.0;
    }

    /// A highlighted notice (e.g. charts unavailable).
    fn notice(&mut self, text: &str) {
        let size = 8.5;
        let lh = size * 1.4;
        let lines = wrap(text, Face::Regular, size, WIDTH - 12.0);
        let h = lines.len() as f32 * lh + 8.0;
        self.ensure(h);
        let y0 = self.y;
        self.page().push(Op::Rect { x: LEFT, y: y0, w: WIDTH, h, color: WARN_BG });
        for (i, line) in lines.iter().enumerate() {
            self.text(LEFT + 6.0, y0 + 4.0 + i as f32 * lh, size, Face::Regular, line, WARN_FG);
        }
        self.y += h + 6.0;
    }

    /// Label/value pairs as a two-column list.
    fn facts(&mut self, facts: &[(String, String)], size: f32) {
        let label_w = facts.iter().map(|(k, _)| Face::Bold.width(k, size)).fold(0.0f32, f32::max) + 10.0;
        let lh = size * 1.4;
        for (k, v) in facts {
            let lines = wrap(v, Face::Regular, size, WIDTH - label_w);
            self.ensure(lh * lines.len() as f32);
            let y = self.y;
            self.text(LEFT, y, size, Face::Bold, k, MUTED);
            for (i, l) in lines.iter().enumerate() {
                self.text(LEFT + label_w, y + i as f32 * lh, size, Face::Regular, l, INK);
            }
            self.y += lh * lines.len() as f32;
        }
        self.y += 3.0;
    }

    /// A table that fills the width, with its header repeated on every page it spans.
    fn table(&mut self, cols: &[Col], rows: &[Vec<String>], st: &TableStyle) {
        let n = cols.len();
        let face = |c: usize| st.faces.get(c).copied().unwrap_or(Face::Regular);
        // natural widths, then fit to the page width
        let mut widths: Vec<f32> = (0..n)
            .map(|c| {
                let head = cols[c].title.split(' ').map(|w| Face::Bold.width(w, st.size)).fold(0.0f32, f32::max);
                let body = rows.iter().map(|r| face(c).width(&r[c], st.size)).fold(0.0f32, f32::max);
                head.max(body) + 2.0 * st.pad
            })
            .collect();
        let total: f32 = widths.iter().sum();
        if total <= WIDTH {
            let extra = (WIDTH - total) / n as f32;
            widths.iter_mut().for_each(|w| *w += extra);
        } else {
            // shrink the text columns, keep numbers whole
            let fixed: f32 = (0..n).filter(|&c| cols[c].numeric).map(|c| widths[c]).sum();
            let flex: f32 = total - fixed;
            let k = ((WIDTH - fixed) / flex).max(0.2);
            for c in 0..n {
                if !cols[c].numeric {
                    widths[c] *= k;
                }
            }
        }
        let xs: Vec<f32> = widths.iter().scan(LEFT, |x, w| {
            let here = *x;
            *x += w;
            Some(here)
        }).collect();
        let lh = st.size * 1.3;
        let cell_lines = |text: &str, c: usize, f: Face| wrap(text, f, st.size, widths[c] - 2.0 * st.pad);
        let head_lines: Vec<Vec<String>> = (0..n).map(|c| cell_lines(cols[c].title, c, Face::Bold)).collect();
        let head_h = head_lines.iter().map(|l| l.len()).max().unwrap_or(1) as f32 * lh + 2.0 * st.pad;

        let draw_row = |lay: &mut Layout, lines: &[Vec<String>], h: f32, bg: Option<Color>, bold: bool, header: bool| {
            let y = lay.y;
            if let Some(bg) = bg {
                lay.page().push(Op::Rect { x: LEFT, y, w: WIDTH, h, color: bg });
            }
            for c in 0..n {
                let fc = if header || bold { if face(c) == Face::Mono && !header { Face::Mono } else { Face::Bold } } else { face(c) };
                for (i, l) in lines[c].iter().enumerate() {
                    let w = fc.width(l, st.size);
                    let x = if cols[c].numeric { xs[c] + widths[c] - st.pad - w } else { xs[c] + st.pad };
                    lay.text(x, y + st.pad + i as f32 * lh, st.size, fc, l, INK);
                }
            }
            lay.page().push(Op::Line { x1: LEFT, y1: y + h, x2: RIGHT, y2: y + h, width: if header { 0.8 } else { 0.4 }, color: RULE });
            lay.y += h;
        };
        let header = |lay: &mut Layout| {
            let y = lay.y;
            lay.page().push(Op::Line { x1: LEFT, y1: y, x2: RIGHT, y2: y, width: 0.8, color: RULE });
            draw_row(lay, &head_lines, head_h, Some(HEAD_BG), true, true);
        };

        let first_h = rows.first().map(|r| (0..n).map(|c| cell_lines(&r[c], c, face(c)).len()).max().unwrap_or(1) as f32 * lh + 2.0 * st.pad).unwrap_or(0.0);
        self.ensure(head_h + first_h);
        header(self);
        for (i, r) in rows.iter().enumerate() {
            let hl = st.highlight.contains(&i);
            let lines: Vec<Vec<String>> = (0..n).map(|c| cell_lines(&r[c], c, if hl { Face::Bold } else { face(c) })).collect();
            let h = lines.iter().map(|l| l.len()).max().unwrap_or(1) as f32 * lh + 2.0 * st.pad;
            if self.y + h > BOTTOM {
                self.new_page();
                header(self);
            }
            draw_row(self, &lines, h, hl.then_some(ORIG_BG), hl, false);
        }
        self.y += 6.0;
    }

    /// A chart scaled to the width (or to what is left of an empty page), with its caption.
    fn image(&mut self, chart: usize, px_w: u32, px_h: u32, title: &str, caption: &str) {
        let mut w = WIDTH;
        let mut h = w * px_h as f32 / px_w as f32;
        let cap_size = 8.0;
        let cap = wrap(&format!("{title}. {caption}"), Face::Regular, cap_size, WIDTH);
        let cap_h = cap.len() as f32 * cap_size * 1.4 + 4.0;
        let room = BOTTOM - TOP - cap_h - 10.0;
        if h > room {
            h = room;
            w = h * px_w as f32 / px_h as f32;
        }
        self.ensure(h + cap_h + 8.0);
        let y = self.y;
        let x = LEFT + (WIDTH - w) / 2.0;
        self.page().push(Op::Image { x, y, w, h, chart });
        self.page().push(Op::Line { x1: x, y1: y, x2: x + w, y2: y, width: 0.4, color: RULE });
        self.page().push(Op::Line { x1: x, y1: y + h, x2: x + w, y2: y + h, width: 0.4, color: RULE });
        self.y += h + 4.0;
        for l in cap {
            let y = self.y;
            self.text(LEFT, y, cap_size, Face::Regular, &l, MUTED);
            self.y += cap_size * 1.4;
        }
        self.y += 10.0;
    }

    /// Preformatted monospace text on a tinted band; long lines wrap.
    fn pre(&mut self, text: &str) {
        let size = 7.0;
        let lh = size * 1.3;
        let pad = 5.0;
        let lines: Vec<String> = text.lines().flat_map(|l| wrap_chars(l, Face::Mono, size, WIDTH - 2.0 * pad)).collect();
        self.ensure(lh * 3.0 + 2.0 * pad);
        self.y += pad;
        for l in lines {
            if self.y + lh + pad > BOTTOM {
                self.new_page();
                self.y += pad;
            }
            let y = self.y;
            self.page().push(Op::Rect { x: LEFT, y: y - pad.min(2.0), w: WIDTH, h: lh + pad.min(2.0), color: CODE_BG });
            self.text(LEFT + pad, y, size, Face::Mono, &l, INK);
            self.y += lh;
        }
        self.y += pad + 4.0;
    }
}

/// Splits `text` into lines no wider than `width` at spaces; words wider than a line are cut
/// between characters. Newlines in `text` are kept.
fn wrap(text: &str, face: Face, size: f32, width: f32) -> Vec<String> {
    let mut out = Vec::new();
    for para in text.split('\n') {
        let mut line = String::new();
        for word in para.split(' ') {
            let candidate = if line.is_empty() { word.to_string() } else { format!("{line} {word}") };
            if face.width(&candidate, size) <= width || line.is_empty() && face.width(word, size) <= width {
                line = candidate;
                continue;
            }
            if !line.is_empty() {
                out.push(std::mem::take(&mut line));
            }
            if face.width(word, size) <= width {
                line = word.to_string();
            } else {
                let mut pieces = wrap_chars(word, face, size, width);
                line = pieces.pop().unwrap_or_default();
                out.extend(pieces);
            }
        }
        out.push(line);
    }
    if out.is_empty() {
        out.push(String::new());
    }
    out
}

/// Cuts `text` between characters into lines no wider than `width`.
fn wrap_chars(text: &str, face: Face, size: f32, width: f32) -> Vec<String> {
    let mut out = Vec::new();
    let mut line = String::new();
    let mut w = 0.0;
    for c in text.chars() {
        let cw = face.width(c.encode_utf8(&mut [0u8; 4]), size);
        if w + cw > width && !line.is_empty() {
            out.push(std::mem::take(&mut line));
            w = 0.0;
        }
        line.push(c);
        w += cw;
    }
    out.push(line);
    out
}

/// Lays the report out and draws it: the PDF's bytes.
pub fn render_pdf(r: &Report) -> Result<Vec<u8>, String> {
    let mut lay = Layout::new();

    // title block
    let y = lay.y;
    lay.text(LEFT, y, 20.0, Face::Bold, &r.title, INK);
    lay.y += 28.0;
    lay.para("The original model and its compressed variants, measured on the same text.", 9.5, Face::Regular, MUTED);
    lay.facts(&run_facts(r), 8.5);

    // summary
    lay.heading(SECTIONS[0], 1, 60.0);
    let cols: Vec<Col> = SUMMARY_COLUMNS.iter().map(|(t, _, num)| Col { title: t, numeric: *num }).collect();
    let rows: Vec<Vec<String>> = r.rows.iter().map(|row| summary_cells(row).to_vec()).collect();
    lay.table(&cols, &rows, &TableStyle { size: 7.5, pad: 3.5, faces: vec![], highlight: vec![0] });
    lay.para(
        "Δppl: perplexity change against the original. Decode speed: decode tokens/s as a multiple of the original's. Mean layer error: mean of ‖W − Ŵ‖_F / ‖W‖_F over the compressed layers. Bytes: size of the model files on disk.",
        7.5,
        Face::Regular,
        MUTED,
    );

    // charts
    lay.heading(SECTIONS[1], 1, 120.0);
    for u in &r.charts.unavailable {
        lay.notice(u);
    }
    for (i, c) in r.charts.images.iter().enumerate() {
        lay.image(i, c.width, c.height, &c.title, &c.caption);
    }

    // per-layer tables
    lay.new_page();
    lay.heading(SECTIONS[2], 1, 80.0);
    let cols: Vec<Col> = LAYER_COLUMNS.iter().map(|(t, num)| Col { title: t, numeric: *num }).collect();
    for v in &r.variants {
        lay.heading(&format!("{} ({})", v.result.name, v.result.method), 2, 70.0);
        lay.para(&variant_sentence(v), 8.0, Face::Regular, INK);
        if let Some(s) = heal_sentence(v) {
            lay.para(&s, 8.0, Face::Regular, INK);
        }
        let rows: Vec<Vec<String>> = layer_cells(v).into_iter().map(|c| c.to_vec()).collect();
        lay.table(&cols, &rows, &TableStyle { size: 7.0, pad: 2.2, faces: vec![Face::Mono], highlight: vec![] });
    }

    // plans
    lay.heading(SECTIONS[3], 1, 60.0);
    lay.para("The plan each variant was compressed with, as stored in its compactor.json.", 8.0, Face::Regular, MUTED);
    for v in &r.variants {
        lay.heading(&v.result.name, 2, 40.0);
        lay.pre(&v.manifest.plan.to_json());
    }

    // environment
    lay.heading(SECTIONS[4], 1, 60.0);
    let rows: Vec<Vec<String>> = environment(r).into_iter().map(|(k, v)| vec![k, v]).collect();
    lay.table(&[Col { title: "Item", numeric: false }, Col { title: "Value", numeric: false }], &rows, &TableStyle { size: 8.0, pad: 3.0, faces: vec![Face::Bold], highlight: vec![] });

    draw(r, &lay.pages)
}

fn draw(r: &Report, pages: &[Vec<Op>]) -> Result<Vec<u8>, String> {
    let font = |face: Face| Font::new(Data::from(face.data()), 0).ok_or_else(|| format!("the embedded {face:?} font does not load"));
    let (regular, bold, mono) = (font(Face::Regular)?, font(Face::Bold)?, font(Face::Mono)?);
    let pick = |face: Face| match face {
        Face::Regular => regular.clone(),
        Face::Bold => bold.clone(),
        Face::Mono => mono.clone(),
    };
    let mut images = Vec::new();
    for c in &r.charts.images {
        images.push(Image::from_png(Data::from(c.png.clone()), true).map_err(|e| format!("chart {}: {e}", c.id))?);
    }
    let fill = |c: Color| Some(Fill { paint: rgb::Color::new(c.0, c.1, c.2).into(), ..Default::default() });

    let mut doc = Document::new();
    doc.set_metadata(Metadata::new().title(r.title.clone()).creator(r.generator.clone()).producer(r.generator.clone()));
    let total = pages.len();
    for (i, ops) in pages.iter().enumerate() {
        let mut page = doc.start_page_with(PageSettings::from_wh(PAGE_W, PAGE_H).ok_or("bad page size")?);
        let mut s = page.surface();
        for op in ops {
            match op {
                Op::Text { x, baseline, size, face, text, color } => {
                    s.set_stroke(None);
                    s.set_fill(fill(*color));
                    s.draw_text(Point::from_xy(*x, *baseline), pick(*face), *size, text, false, TextDirection::Auto);
                }
                Op::Rect { x, y, w, h, color } => {
                    if let Some(rect) = Rect::from_xywh(*x, *y, *w, *h) {
                        let mut pb = PathBuilder::new();
                        pb.push_rect(rect);
                        if let Some(p) = pb.finish() {
                            s.set_stroke(None);
                            s.set_fill(fill(*color));
                            s.draw_path(&p);
                        }
                    }
                }
                Op::Line { x1, y1, x2, y2, width, color } => {
                    let mut pb = PathBuilder::new();
                    pb.move_to(*x1, *y1);
                    pb.line_to(*x2, *y2);
                    if let Some(p) = pb.finish() {
                        s.set_fill(None);
                        s.set_stroke(Some(Stroke { paint: rgb::Color::new(color.0, color.1, color.2).into(), width: *width, ..Default::default() }));
                        s.draw_path(&p);
                    }
                }
                Op::Image { x, y, w, h, chart } => {
                    if let Some(size) = Size::from_wh(*w, *h) {
                        s.push_transform(&Transform::from_translate(*x, *y));
                        s.draw_image(images[*chart].clone(), size);
                        s.pop();
                    }
                }
            }
        }
        // footer: title left, page number right
        let size = 7.5;
        let fy = PAGE_H - 34.0;
        let mut pb = PathBuilder::new();
        pb.move_to(LEFT, fy - 10.0);
        pb.line_to(RIGHT, fy - 10.0);
        if let Some(p) = pb.finish() {
            s.set_fill(None);
            s.set_stroke(Some(Stroke { paint: rgb::Color::new(RULE.0, RULE.1, RULE.2).into(), width: 0.5, ..Default::default() }));
            s.draw_path(&p);
        }
        s.set_stroke(None);
        s.set_fill(fill(MUTED));
        s.draw_text(Point::from_xy(LEFT, fy), regular.clone(), size, &r.title, false, TextDirection::Auto);
        let label = format!("Page {} of {}", i + 1, total);
        let w = Face::Regular.width(&label, size);
        s.draw_text(Point::from_xy(RIGHT - w, fy), regular.clone(), size, &label, false, TextDirection::Auto);
        s.finish();
        page.finish();
    }
    doc.finish().map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wrap_keeps_lines_within_width() {
        let text = "the quick brown fox jumps over the lazy dog and a_very_long_identifier_without_spaces_that_must_be_cut";
        for l in wrap(text, Face::Regular, 10.0, 120.0) {
            assert!(Face::Regular.width(&l, 10.0) <= 120.0 + 1e-3, "{l:?} too wide");
        }
        assert_eq!(wrap("a\nb", Face::Regular, 10.0, 100.0), vec!["a", "b"]);
    }

    #[test]
    fn widths_grow_with_text_and_size() {
        assert!(Face::Regular.width("WWW", 10.0) > Face::Regular.width("iii", 10.0));
        assert!((Face::Mono.width("abc", 20.0) - 2.0 * Face::Mono.width("abc", 10.0)).abs() < 1e-3);
    }
}
