//! The visualizer's plots: heatmaps with overlays, curves, velocity field and ODE samples.
//!
//! Each function draws one panel from plain data and reports what the user did in it.

use eframe::egui::{self, Color32, ColorImage, TextureHandle, TextureOptions, Ui};
use egui_plot::{
    Arrows, AxisHints, HPlacement, Legend, Line, MarkerShape, Plot, PlotImage, PlotPoint,
    PlotPoints, Points,
};

use crate::grid::Heatmap;
use crate::grid::Point;
use crate::report::viridis;
use crate::stats::moving_average;

pub const TARGET_COLOUR: Color32 = Color32::from_rgb(230, 230, 230);
pub const LATENT_COLOUR: Color32 = Color32::from_rgb(235, 64, 52);
pub const SAMPLE_COLOUR: Color32 = Color32::from_rgb(255, 170, 40);

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

/// A square, equal-aspect plot of `size` points showing at least `range`.
fn square_plot(id: &str, range: ((f32, f32), (f32, f32)), size: f32) -> Plot<'static> {
    let ((x0, x1), (y0, y1)) = range;
    Plot::new(id)
        .width(size)
        .height(size)
        .data_aspect(1.0)
        .show_grid(false)
        .include_x(x0)
        .include_x(x1)
        .include_y(y0)
        .include_y(y1)
}

/// A square 2D plot over `range` with a heatmap image and point overlays.
pub fn heatmap_plot(
    ui: &mut Ui,
    id: &str,
    heat: Option<&HeatTexture>,
    overlays: &[Overlay],
    range: ((f32, f32), (f32, f32)),
    size: f32,
    drawing: bool,
) -> PanelResponse {
    let plot = square_plot(id, range, size)
        .allow_drag(!drawing)
        .allow_zoom(!drawing)
        .allow_scroll(false)
        .allow_boxed_zoom(false);
    let plot = if overlays.is_empty() {
        plot
    } else {
        plot.legend(Legend::default().position(egui_plot::Corner::RightTop))
    };
    let response = plot.show(ui, |plot_ui| {
        if let Some(h) = heat {
            let ((hx0, hx1), (hy0, hy1)) = h.extent;
            let centre = PlotPoint::new((hx0 + hx1) / 2.0, (hy0 + hy1) / 2.0);
            let size = egui::vec2(hx1 - hx0 + h.cell.0, hy1 - hy0 + h.cell.1);
            plot_ui.image(PlotImage::new("", &h.texture, centre, size));
        }
        for o in overlays {
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
fn view_only(response: egui_plot::PlotResponse<Option<[f64; 2]>>) -> PanelResponse {
    PanelResponse {
        hover: response.inner.filter(|_| response.response.hovered()),
        drag: None,
        rect: response.response.rect,
    }
}

/// The prior's velocity field at one time: arrows scaled so the longest spans about one cell.
pub fn velocity_plot(
    ui: &mut Ui,
    arrows: &[(Point, Point)],
    t: f32,
    range: ((f32, f32), (f32, f32)),
    grid: usize,
    size: f32,
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
                .color(Color32::from_rgb(90, 160, 255))
                .allow_hover(false),
            );
            plot_ui.pointer_coordinate().map(|p| [p.x, p.y])
        });
    view_only(response)
}

/// ODE samples of the prior over the target's samples, with some sample paths.
pub fn samples_plot(
    ui: &mut Ui,
    target: &[Point],
    samples: &[Point],
    paths: &[Vec<Point>],
    range: ((f32, f32), (f32, f32)),
    size: f32,
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
    view_only(response)
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

fn curve(points: &[[f64; 2]], style: CurveStyle) -> Vec<[f64; 2]> {
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

fn step_axis(style: CurveStyle) -> AxisHints<'static> {
    let hints = AxisHints::new_x().label("step");
    if style.log_steps {
        hints.formatter(|mark, _| format!("{:.0}", 10f64.powf(mark.value)))
    } else {
        hints
    }
}

/// The prior's flow-matching loss per step.
pub fn prior_curve_plot(
    ui: &mut Ui,
    loss: &[[f64; 2]],
    style: CurveStyle,
    size: egui::Vec2,
) -> egui::Rect {
    Plot::new("prior_curve")
        .width(size.x)
        .height(size.y)
        .custom_x_axes(vec![step_axis(style)])
        .legend(Legend::default().position(egui_plot::Corner::RightTop))
        .show(ui, |plot_ui| {
            plot_ui.line(
                Line::new("prior FM loss", PlotPoints::from(curve(loss, style)))
                    .color(Color32::from_rgb(90, 160, 255)),
            );
        })
        .response
        .rect
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
    let span = |v: &[[f64; 2]]| {
        let lo = v.iter().map(|p| p[1]).fold(f64::INFINITY, f64::min);
        let hi = v.iter().map(|p| p[1]).fold(f64::NEG_INFINITY, f64::max);
        if lo.is_finite() && hi > lo {
            (lo, hi)
        } else {
            (lo.min(0.0), lo.max(0.0) + 1.0)
        }
    };
    let (l0, l1) = span(&loss);
    let (n0, n1) = span(&nll);
    // nll -> axis: a * nll + b, so that [n0, n1] covers [l0, l1].
    let a = (l1 - l0) / (n1 - n0);
    let b = l0 - a * n0;
    let mapped: Vec<[f64; 2]> = nll.iter().map(|p| [p[0], a * p[1] + b]).collect();
    let red = LATENT_COLOUR;
    let blue = Color32::from_rgb(90, 160, 255);
    Plot::new("align_curve")
        .width(size.x)
        .height(size.y)
        .custom_x_axes(vec![step_axis(style)])
        .custom_y_axes(vec![
            AxisHints::new_y().label("L_align").tick_label_color(blue),
            AxisHints::new_y()
                .label("NLL(y)")
                .placement(HPlacement::Right)
                .tick_label_color(red)
                .formatter(move |mark, _| format!("{:.2}", (mark.value - b) / a)),
        ])
        .legend(Legend::default().position(egui_plot::Corner::RightTop))
        .show(ui, |plot_ui| {
            plot_ui.line(Line::new("L_align", PlotPoints::from(loss)).color(blue));
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

/// A viridis strip with the value range of each map drawn with it.
pub fn colour_legend(ui: &mut Ui, ranges: &[(&str, (f32, f32))]) {
    ui.horizontal(|ui| {
        ui.label("low");
        let (rect, _) = ui.allocate_exact_size(egui::vec2(160.0, 12.0), egui::Sense::hover());
        let painter = ui.painter_at(rect);
        let n = 64;
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
        for (name, (lo, hi)) in ranges {
            ui.separator();
            ui.label(format!("{name}: {lo:.2} .. {hi:.2}"));
        }
    });
}
