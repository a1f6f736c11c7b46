//! The visualizer's plots: heatmaps with overlays, curves, velocity field and ODE samples.
//!
//! Each function draws one panel from plain data and reports what the user did in it. Every axis
//! gets ticks at 1, 2 or 5 times a power of ten, spaced for the panel's size, so no axis is left
//! with a single label.

use eframe::egui::{self, Color32, ColorImage, FontId, TextureHandle, TextureOptions, Ui};
use egui_plot::{
    Arrows, AxisHints, GridInput, GridMark, HPlacement, Legend, Line, MarkerShape, Plot, PlotImage,
    PlotPoint, PlotPoints, Points,
};

use crate::grid::Heatmap;
use crate::grid::Point;
use crate::report::viridis;
use crate::stats::moving_average;

pub const TARGET_COLOUR: Color32 = Color32::from_rgb(230, 230, 230);
pub const LATENT_COLOUR: Color32 = Color32::from_rgb(235, 64, 52);
pub const SAMPLE_COLOUR: Color32 = Color32::from_rgb(255, 170, 40);
pub const BLUE: Color32 = Color32::from_rgb(90, 160, 255);
/// A map computed from an older prior than the one training now.
pub const STALE_COLOUR: Color32 = Color32::from_rgb(255, 190, 70);

/// A heatmap turned into a texture, with the colour range it was drawn with.
pub struct HeatTexture {
    pub texture: TextureHandle,
    pub range: (f32, f32),
    /// The heatmap's extent and cell size, to place the image on the plot.
    pub extent: ((f32, f32), (f32, f32)),
    pub cell: (f32, f32),
}

/// Paints `map` with viridis over its 2nd-98th percentile range (the PNG figures' colours).
///
/// # Shapes
/// - `map.values`: `[ys.len() * xs.len()]`, row `iy` at `ys[iy]` (upwards); the image is top-down.
pub fn heat_texture(ctx: &egui::Context, name: &str, map: &Heatmap) -> HeatTexture {
    let (nx, ny) = (map.xs.len(), map.ys.len());
    let (lo, hi) = map.colour_range();
    let mut rgb = Vec::with_capacity(nx * ny * 3);
    for iy in (0..ny).rev() {
        for ix in 0..nx {
            let v = map.values[iy * nx + ix];
            rgb.extend(if v.is_finite() {
                viridis(v, lo, hi)
            } else {
                viridis(hi, lo, hi)
            });
        }
    }
    let image = ColorImage::from_rgb([nx, ny], &rgb);
    let extent = map.extent();
    let cell = (
        (extent.0.1 - extent.0.0) / (nx - 1).max(1) as f32,
        (extent.1.1 - extent.1.0) / (ny - 1).max(1) as f32,
    );
    HeatTexture {
        texture: ctx.load_texture(name, image, TextureOptions::NEAREST),
        range: (lo, hi),
        extent,
        cell,
    }
}

/// The value of `map` at the cell nearest `p`, if `p` lies on the grid.
pub fn value_at(map: &Heatmap, p: [f64; 2]) -> Option<f32> {
    let ((x0, x1), (y0, y1)) = map.extent();
    let (nx, ny) = (map.xs.len(), map.ys.len());
    let fx = (p[0] as f32 - x0) / (x1 - x0) * (nx - 1) as f32;
    let fy = (p[1] as f32 - y0) / (y1 - y0) * (ny - 1) as f32;
    let (ix, iy) = (fx.round(), fy.round());
    if ix < 0.0 || iy < 0.0 || ix as usize >= nx || iy as usize >= ny {
        return None;
    }
    Some(map.values[iy as usize * nx + ix as usize])
}

fn plot_points(points: &[Point]) -> PlotPoints<'static> {
    points
        .iter()
        .map(|p| [f64::from(p[0]), f64::from(p[1])])
        .collect::<Vec<_>>()
        .into()
}

/// The smallest of 1, 2, 5 times a power of ten that is at least `raw`.
pub fn nice_step(raw: f64) -> f64 {
    if !raw.is_finite() || raw <= 0.0 {
        return 1.0;
    }
    let p = 10f64.powf(raw.log10().floor());
    [1.0, 2.0, 5.0, 10.0]
        .into_iter()
        .map(|m| m * p)
        .find(|&s| s >= raw * (1.0 - 1e-9))
        .unwrap_or(10.0 * p)
}

/// The grid spacing (points) egui_plot is told about, so a spacer can turn its input back into
/// values per point.
const GRID_MIN: f32 = 8.0;

/// Tick marks every `step` over `bounds` (at most a few hundred).
fn marks(bounds: (f64, f64), step: f64) -> Vec<GridMark> {
    let (lo, hi) = bounds;
    let (first, last) = ((lo / step).ceil(), (hi / step).floor());
    if !(first.is_finite() && last.is_finite()) || last - first > 500.0 {
        return Vec::new();
    }
    (first as i64..=last as i64)
        .map(|k| GridMark {
            value: k as f64 * step,
            step_size: step,
        })
        .collect()
}

/// Ticks at 1, 2 or 5 times a power of ten, at least `px` points apart.
fn nice_spacer(px: f64) -> impl Fn(GridInput) -> Vec<GridMark> {
    move |input: GridInput| {
        let per_point = input.base_step_size / f64::from(GRID_MIN);
        marks(input.bounds, nice_step(per_point * px))
    }
}

/// Ticks of a log10-step axis: whole decades (every 2 or 5 decades when they are narrow), plus 2
/// and 5 within a decade when a decade is wide.
fn log_steps_spacer(px: f64) -> impl Fn(GridInput) -> Vec<GridMark> {
    move |input: GridInput| {
        let per_point = input.base_step_size / f64::from(GRID_MIN);
        let decade = nice_step(per_point * px).max(1.0);
        let mut out = marks(input.bounds, decade);
        if decade == 1.0 && 0.3 / per_point >= px {
            let (lo, hi) = input.bounds;
            for d in (lo.floor() as i64)..=(hi.ceil() as i64) {
                for m in [2f64, 5.0] {
                    let v = d as f64 + m.log10();
                    if v >= lo && v <= hi {
                        out.push(GridMark {
                            value: v,
                            step_size: 0.3,
                        });
                    }
                }
            }
            out.sort_by(|a, b| a.value.total_cmp(&b.value));
        }
        out
    }
}

/// A tick label with as many decimals as its step needs.
fn tick_label(mark: GridMark) -> String {
    let decimals = (-mark.step_size.log10().floor()).max(0.0) as usize;
    let v = if mark.value.abs() < mark.step_size * 1e-6 {
        0.0
    } else {
        mark.value
    };
    format!("{v:.decimals$}")
}

/// A step count for a log10-step axis: 1, 2, 5, 10, ..., 1k, 10k.
fn step_label(mark: GridMark) -> String {
    let v = 10f64.powf(mark.value).round();
    if v >= 1e6 {
        format!("{}M", v / 1e6)
    } else if v >= 1e3 {
        format!("{}k", v / 1e3)
    } else {
        format!("{v}")
    }
}

const X_TICK_PX: f64 = 60.0;
const Y_TICK_PX: f64 = 30.0;

fn x_axis(label: &str) -> AxisHints<'static> {
    AxisHints::new_x()
        .label(label.to_string())
        .label_spacing(40.0..=55.0)
        .formatter(|m, _| tick_label(m))
}

fn y_axis(label: &str) -> AxisHints<'static> {
    AxisHints::new_y()
        .label(label.to_string())
        .label_spacing(18.0..=26.0)
        .formatter(|m, _| tick_label(m))
}

/// Point clouds drawn over a heatmap.
pub struct Overlay<'a> {
    pub name: &'a str,
    pub points: &'a [Point],
    pub colour: Color32,
    pub radius: f32,
}

/// What happened in a 2D panel this frame.
pub struct PanelResponse {
    /// The pointer's position in data coordinates, when it hovers the panel.
    pub hover: Option<[f64; 2]>,
    /// The pointer's position while the primary button drags in the panel.
    pub drag: Option<[f64; 2]>,
    /// The panel's rectangle on screen (points).
    pub rect: egui::Rect,
}

/// The text in a panel's corner that says which prior a map shows, so an old map is never taken
/// for a new one; painted inside the plot, where no title or neighbour can clip it.
#[derive(Debug, Clone)]
pub struct Badge {
    pub text: String,
    pub colour: Color32,
}

/// Paints `badge` in the bottom-left corner inside `frame`.
pub fn paint_badge(ui: &Ui, frame: egui::Rect, badge: &Badge) {
    let painter = ui.painter().with_clip_rect(frame);
    let font = FontId::proportional(12.0);
    let galley = painter.layout_no_wrap(badge.text.clone(), font, badge.colour);
    let pos = frame.left_bottom() + egui::vec2(4.0, -4.0 - galley.size().y);
    let bg = egui::Rect::from_min_size(pos, galley.size()).expand(2.0);
    painter.rect_filled(bg, 3.0, Color32::from_black_alpha(190));
    painter.galley(pos, galley, badge.colour);
}

/// A square, equal-aspect plot of `size` points showing at least `range`, with readable ticks.
fn square_plot(id: &str, range: ((f32, f32), (f32, f32)), size: f32) -> Plot<'static> {
    let ((x0, x1), (y0, y1)) = range;
    Plot::new(id)
        .width(size)
        .height(size)
        .data_aspect(1.0)
        .show_grid(false)
        .grid_spacing(GRID_MIN..=300.0)
        .x_grid_spacer(nice_spacer(X_TICK_PX))
        .y_grid_spacer(nice_spacer(Y_TICK_PX))
        .custom_x_axes(vec![x_axis("")])
        .custom_y_axes(vec![y_axis("")])
        .include_x(x0)
        .include_x(x1)
        .include_y(y0)
        .include_y(y1)
}

/// A square 2D plot over `range` with a heatmap image and point overlays.
#[allow(clippy::too_many_arguments)]
pub fn heatmap_plot(
    ui: &mut Ui,
    id: &str,
    heat: Option<&HeatTexture>,
    overlays: &[Overlay],
    range: ((f32, f32), (f32, f32)),
    size: f32,
    drawing: bool,
    badge: Option<&Badge>,
) -> PanelResponse {
    let plot = square_plot(id, range, size)
        .allow_drag(!drawing)
        .allow_zoom(!drawing)
        .allow_scroll(false)
        .allow_boxed_zoom(false);
    let plot = if overlays.iter().any(|o| !o.points.is_empty()) {
        plot.legend(Legend::default().position(egui_plot::Corner::RightTop))
    } else {
        plot
    };
    let response = plot.show(ui, |plot_ui| {
        if let Some(h) = heat {
            let ((hx0, hx1), (hy0, hy1)) = h.extent;
            let centre = PlotPoint::new((hx0 + hx1) / 2.0, (hy0 + hy1) / 2.0);
            let size = egui::vec2(hx1 - hx0 + h.cell.0, hy1 - hy0 + h.cell.1);
            plot_ui.image(PlotImage::new("", &h.texture, centre, size));
        }
        for o in overlays.iter().filter(|o| !o.points.is_empty()) {
            plot_ui.points(
                Points::new(o.name, plot_points(o.points))
                    .color(o.colour)
                    .radius(o.radius)
                    .shape(MarkerShape::Circle)
                    .filled(true)
                    .allow_hover(false),
            );
        }
        plot_ui.pointer_coordinate().map(|p| [p.x, p.y])
    });
    if let Some(b) = badge {
        paint_badge(ui, *response.transform.frame(), b);
    }
    // With panning off, the pointer's own position (not the pan-corrected one) is where to draw.
    let r = &response.response;
    let down = r.is_pointer_button_down_on() || r.dragged_by(egui::PointerButton::Primary);
    let drag = r
        .interact_pointer_pos()
        .filter(|_| drawing && down)
        .map(|pos| {
            let p = response.transform.value_from_position(pos);
            [p.x, p.y]
        });
    PanelResponse {
        hover: response.inner.filter(|_| r.hovered()),
        drag,
        rect: r.rect,
    }
}

/// The response of a panel that is only looked at: where the pointer hovers, no drawing.
fn view_only(
    ui: &Ui,
    response: egui_plot::PlotResponse<Option<[f64; 2]>>,
    badge: Option<&Badge>,
) -> PanelResponse {
    if let Some(b) = badge {
        paint_badge(ui, *response.transform.frame(), b);
    }
    PanelResponse {
        hover: response.inner.filter(|_| response.response.hovered()),
        drag: None,
        rect: response.response.rect,
    }
}

/// A framed empty panel of `size` with `text` in the middle, where a plot will appear; the
/// closure may add widgets (a button) below the text.
pub fn placeholder(
    ui: &mut Ui,
    size: egui::Vec2,
    text: &str,
    extra: impl FnOnce(&mut Ui),
) -> PanelResponse {
    let (rect, response) = ui.allocate_exact_size(size, egui::Sense::hover());
    ui.painter().rect_stroke(
        rect,
        4.0,
        egui::Stroke::new(1.0, ui.visuals().widgets.noninteractive.bg_stroke.color),
        egui::StrokeKind::Inside,
    );
    let inner = rect.shrink(12.0);
    ui.scope_builder(
        egui::UiBuilder::new()
            .max_rect(inner)
            .layout(egui::Layout::top_down(egui::Align::Center)),
        |ui| {
            ui.add_space((inner.height() / 2.0 - 40.0).max(0.0));
            ui.add(egui::Label::new(egui::RichText::new(text).weak()).wrap());
            extra(ui);
        },
    );
    PanelResponse {
        hover: None,
        drag: None,
        rect: response.rect,
    }
}

/// The prior's velocity field at one time: arrows scaled so the longest spans about one cell.
#[allow(clippy::too_many_arguments)]
pub fn velocity_plot(
    ui: &mut Ui,
    arrows: &[(Point, Point)],
    t: f32,
    range: ((f32, f32), (f32, f32)),
    grid: usize,
    size: f32,
    badge: Option<&Badge>,
) -> PanelResponse {
    let ((x0, x1), _) = range;
    let vmax = arrows
        .iter()
        .map(|(_, v)| v[0].hypot(v[1]))
        .fold(0.0f32, f32::max)
        .max(1e-6);
    let scale = 0.9 * (x1 - x0) / grid.max(2) as f32 / vmax;
    let origins: Vec<Point> = arrows.iter().map(|(z, _)| *z).collect();
    let tips: Vec<Point> = arrows
        .iter()
        .map(|(z, v)| [z[0] + scale * v[0], z[1] + scale * v[1]])
        .collect();
    let response = square_plot("velocity", range, size)
        .legend(Legend::default().position(egui_plot::Corner::RightTop))
        .show(ui, |plot_ui| {
            plot_ui.arrows(
                Arrows::new(
                    format!("v(z, {t:.2})"),
                    plot_points(&origins),
                    plot_points(&tips),
                )
                .tip_length(4.0)
                .color(BLUE)
                .allow_hover(false),
            );
            plot_ui.pointer_coordinate().map(|p| [p.x, p.y])
        });
    view_only(ui, response, badge)
}

/// ODE samples of the prior over the target's samples, with some sample paths.
pub fn samples_plot(
    ui: &mut Ui,
    target: &[Point],
    samples: &[Point],
    paths: &[Vec<Point>],
    range: ((f32, f32), (f32, f32)),
    size: f32,
    badge: Option<&Badge>,
) -> PanelResponse {
    let response = square_plot("samples", range, size)
        .legend(Legend::default().position(egui_plot::Corner::RightTop))
        .show(ui, |plot_ui| {
            plot_ui.points(
                Points::new("target", plot_points(target))
                    .color(Color32::from_gray(150))
                    .radius(1.0)
                    .allow_hover(false),
            );
            for (k, path) in paths.iter().enumerate() {
                let name = if k == 0 { "ODE paths" } else { "" };
                plot_ui.line(
                    Line::new(name, plot_points(path))
                        .color(Color32::from_rgba_unmultiplied(90, 160, 255, 150))
                        .width(1.0)
                        .allow_hover(false),
                );
            }
            plot_ui.points(
                Points::new("prior samples", plot_points(samples))
                    .color(SAMPLE_COLOUR)
                    .radius(1.5)
                    .allow_hover(false),
            );
            plot_ui.pointer_coordinate().map(|p| [p.x, p.y])
        });
    view_only(ui, response, badge)
}

/// How the curves are drawn.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct CurveStyle {
    /// Steps on a log10 axis.
    pub log_steps: bool,
    /// Moving-average window (1 = raw).
    pub smoothing: usize,
}

impl Default for CurveStyle {
    fn default() -> Self {
        CurveStyle {
            log_steps: true,
            smoothing: 17,
        }
    }
}

/// `(step, value)` pairs smoothed by `style` and placed on its step axis.
pub fn curve(points: &[[f64; 2]], style: CurveStyle) -> Vec<[f64; 2]> {
    let ys: Vec<f32> = points.iter().map(|p| p[1] as f32).collect();
    let smooth = moving_average(&ys, style.smoothing.max(1));
    points
        .iter()
        .zip(smooth)
        .filter(|(p, _)| !style.log_steps || p[0] > 0.0)
        .map(|(p, y)| {
            let x = if style.log_steps { p[0].log10() } else { p[0] };
            [x, f64::from(y)]
        })
        .collect()
}

/// A curve plot of `size` with the step axis of `style` and readable ticks on every axis.
fn curve_plot(id: &str, style: CurveStyle, size: egui::Vec2) -> Plot<'static> {
    let plot = Plot::new(id)
        .width(size.x)
        .height(size.y)
        .grid_spacing(GRID_MIN..=300.0)
        .y_grid_spacer(nice_spacer(Y_TICK_PX))
        .legend(Legend::default().position(egui_plot::Corner::RightTop));
    if style.log_steps {
        plot.x_grid_spacer(log_steps_spacer(X_TICK_PX))
            .custom_x_axes(vec![x_axis("step").formatter(|m, _| step_label(m))])
    } else {
        plot.x_grid_spacer(nice_spacer(X_TICK_PX))
            .custom_x_axes(vec![x_axis("step")])
    }
}

/// The prior's flow-matching loss per step.
pub fn prior_curve_plot(
    ui: &mut Ui,
    loss: &[[f64; 2]],
    style: CurveStyle,
    size: egui::Vec2,
) -> egui::Rect {
    curve_plot("prior_curve", style, size)
        .custom_y_axes(vec![y_axis("FM loss")])
        .show(ui, |plot_ui| {
            plot_ui
                .line(Line::new("prior FM loss", PlotPoints::from(curve(loss, style))).color(BLUE));
        })
        .response
        .rect
}

/// The span of the second coordinate of `v` (a unit span around a single value).
fn span(v: &[[f64; 2]]) -> (f64, f64) {
    let lo = v.iter().map(|p| p[1]).fold(f64::INFINITY, f64::min);
    let hi = v.iter().map(|p| p[1]).fold(f64::NEG_INFINITY, f64::max);
    if lo.is_finite() && hi > lo {
        (lo, hi)
    } else if lo.is_finite() {
        (lo - 0.5, lo + 0.5)
    } else {
        (0.0, 1.0)
    }
}

/// L_align (left axis) and the NLL of y (right axis) per alignment step: the NLL is mapped onto the
/// L_align axis linearly and its own axis labels undo the map.
pub fn align_curve_plot(
    ui: &mut Ui,
    loss: &[[f64; 2]],
    nll: &[[f64; 2]],
    style: CurveStyle,
    size: egui::Vec2,
    marker: Option<f64>,
) -> egui::Rect {
    let loss = curve(loss, style);
    let nll = curve(
        nll,
        CurveStyle {
            smoothing: 1,
            ..style
        },
    );
    let (l0, l1) = span(&loss);
    let (n0, n1) = span(&nll);
    // nll -> axis: a * nll + b, so that [n0, n1] covers [l0, l1].
    let a = (l1 - l0) / (n1 - n0);
    let b = l0 - a * n0;
    let mapped: Vec<[f64; 2]> = nll.iter().map(|p| [p[0], a * p[1] + b]).collect();
    let red = LATENT_COLOUR;
    curve_plot("align_curve", style, size)
        .custom_y_axes(vec![
            y_axis("L_align").tick_label_color(BLUE),
            y_axis("NLL(y)")
                .placement(HPlacement::Right)
                .tick_label_color(red)
                .formatter(move |mark, _| {
                    // The NLL at this L_align tick, with the decimals of the NLL's own step.
                    let value = (mark.value - b) / a;
                    let step = (mark.step_size / a).abs();
                    tick_label(GridMark {
                        value,
                        step_size: nice_step(step) / 10.0,
                    })
                }),
        ])
        .show(ui, |plot_ui| {
            plot_ui.line(Line::new("L_align", PlotPoints::from(loss)).color(BLUE));
            plot_ui.line(Line::new("NLL(y)", PlotPoints::from(mapped)).color(red));
            if let Some(step) = marker {
                let x = if style.log_steps {
                    step.max(1.0).log10()
                } else {
                    step
                };
                plot_ui.vline(egui_plot::VLine::new("replay", x).color(Color32::GRAY));
            }
        })
        .response
        .rect
}

/// A small viridis strip labelled low .. high.
pub fn colour_strip(ui: &mut Ui) {
    ui.label("low");
    let (rect, _) = ui.allocate_exact_size(egui::vec2(120.0, 12.0), egui::Sense::hover());
    let painter = ui.painter_at(rect);
    let n = 48;
    for i in 0..n {
        let [r, g, b] = viridis(i as f32, 0.0, (n - 1) as f32);
        let x0 = rect.left() + rect.width() * i as f32 / n as f32;
        let x1 = rect.left() + rect.width() * (i + 1) as f32 / n as f32;
        painter.rect_filled(
            egui::Rect::from_min_max(egui::pos2(x0, rect.top()), egui::pos2(x1, rect.bottom())),
            0.0,
            Color32::from_rgb(r, g, b),
        );
    }
    ui.label("high");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nice_steps_are_one_two_five() {
        assert_eq!(nice_step(0.7), 1.0);
        assert_eq!(nice_step(1.0), 1.0);
        assert_eq!(nice_step(1.3), 2.0);
        assert_eq!(nice_step(3.0), 5.0);
        assert_eq!(nice_step(0.031), 0.05);
        assert_eq!(nice_step(600.0), 1000.0);
    }

    #[test]
    fn every_axis_length_gets_at_least_two_labelled_ticks() {
        // A heatmap axis of 5 units (mog, rings, moons in normalised units) over 150 to 600
        // points, and a loss axis of 0.8 over 60 to 300 points.
        for (span, px, tick_px) in [(5.0, 150.0, X_TICK_PX), (0.8, 60.0, Y_TICK_PX)] {
            for scale in [1.0, 1.7, 2.5, 4.0] {
                let points = px * scale;
                let per_point = span / points;
                let input = GridInput {
                    bounds: (-span / 2.0 + 0.1, span / 2.0 + 0.1),
                    base_step_size: per_point * f64::from(GRID_MIN),
                };
                let ticks = nice_spacer(tick_px)(input);
                assert!(ticks.len() >= 2, "{span} over {points} px: {ticks:?}");
                let spacing = ticks[0].step_size / per_point;
                assert!(spacing >= tick_px, "{spacing}");
            }
        }
    }

    #[test]
    fn tick_labels_show_the_decimals_of_their_step() {
        let m = |value, step_size| tick_label(GridMark { value, step_size });
        assert_eq!(m(0.5, 0.5), "0.5");
        assert_eq!(m(-1.0, 0.5), "-1.0");
        assert_eq!(m(2.0, 2.0), "2");
        assert_eq!(m(1e-17, 0.2), "0.0");
        let s = |v: f64| {
            step_label(GridMark {
                value: v.log10(),
                step_size: 1.0,
            })
        };
        assert_eq!(
            (s(1.0), s(100.0), s(2000.0)),
            ("1".into(), "100".into(), "2k".into())
        );
    }
}
