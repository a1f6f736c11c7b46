//! The window's panels as figures: the data on show drawn again with plotters (the headless
//! figures' library and font), with a title, labelled axes and a colour bar, at a chosen width, so
//! a panel can go into a slide or a paper.

use std::path::Path;

use plotters::coord::Shift;
use plotters::prelude::*;

use crate::error::{Error, Result};
use crate::grid::{Heatmap, Point, Range2};
use crate::report::{arrow_segments, heatmap_cells, save_png, viridis};
use crate::stats::moving_average;
use crate::toy::Curves;

type Area<'a> = DrawingArea<BitMapBackend<'a>, Shift>;

fn err(e: impl std::fmt::Display) -> Error {
    Error::Figure(e.to_string())
}

/// Sizes of text and marks at a figure's width: 1.0 at 800 pixels.
#[derive(Clone, Copy)]
struct Scale(f64);

impl Scale {
    fn px(self, base: f64) -> u32 {
        (base * self.0).round().max(1.0) as u32
    }
    fn font(self, base: f64) -> (&'static str, f64) {
        ("sans-serif", base * self.0)
    }
}

/// Points over a heatmap: label, points, colour, radius at 800 pixels.
pub struct Dots<'a> {
    pub label: &'a str,
    pub points: &'a [Point],
    pub colour: RGBColor,
    pub radius: f64,
}

pub const TARGET_DOTS: RGBColor = RGBColor(235, 235, 235);
pub const LATENT_DOTS: RGBColor = RGBColor(230, 40, 40);
const SAMPLE_DOTS: RGBColor = RGBColor(255, 140, 20);
const BLUE: RGBColor = RGBColor(31, 119, 180);
const RED: RGBColor = RGBColor(214, 39, 40);

/// One panel as plain data, ready to be drawn as a figure.
pub enum Figure<'a> {
    /// A heatmap with its colour bar (labelled `label`) and point overlays.
    Heat {
        title: String,
        map: &'a Heatmap,
        dots: Vec<Dots<'a>>,
        label: &'a str,
    },
    /// Velocity arrows over `range`.
    Arrows {
        title: String,
        range: Range2,
        arrows: &'a [(Point, Point)],
    },
    /// Target samples, prior samples and some of their ODE paths over `range`.
    Samples {
        title: String,
        range: Range2,
        target: &'a [Point],
        samples: &'a [Point],
        paths: &'a [Vec<Point>],
    },
    /// The prior's loss above L_align and the NLL of y, smoothed over `smoothing` steps.
    Curves {
        target: &'a str,
        curves: &'a Curves,
        smoothing: usize,
    },
}

/// Writes `figure` to `path`, `width` pixels wide (squares a little less tall, the curves square).
pub fn write(figure: &Figure, path: &Path, width: u32) -> Result<()> {
    let scale = Scale(f64::from(width) / 800.0);
    let square = (width, (f64::from(width) * 0.9) as u32);
    match figure {
        Figure::Heat {
            title,
            map,
            dots,
            label,
        } => save_png(path, square, |root| {
            heat_figure(root, title, map, dots, label, scale)
        }),
        Figure::Arrows {
            title,
            range,
            arrows,
        } => {
            let grid = (arrows.len() as f64).sqrt().max(2.0);
            save_png(path, square, |root| {
                arrows_figure(root, title, *range, arrows, grid, scale)
            })
        }
        Figure::Samples {
            title,
            range,
            target,
            samples,
            paths,
        } => save_png(path, square, |root| {
            samples_figure(root, title, *range, target, samples, paths, scale)
        }),
        Figure::Curves {
            target,
            curves,
            smoothing,
        } => save_png(path, (width, width), |root| {
            curves_figure(root, target, curves, *smoothing, scale)
        }),
    }
}

/// A heatmap with its colour bar (labelled `label`) and point overlays.
fn heat_figure(
    root: &Area,
    title: &str,
    map: &Heatmap,
    dots: &[Dots],
    label: &str,
    scale: Scale,
) -> Result<()> {
    let (w, _) = root.dim_in_pixel();
    let (main, bar) = root.split_horizontally(w - scale.px(120.0).min(w / 3));
    let ((x0, x1), (y0, y1)) = map.extent();
    let mut chart = ChartBuilder::on(&main)
        .caption(title, scale.font(20.0))
        .margin(scale.px(10.0))
        .x_label_area_size(scale.px(44.0))
        .y_label_area_size(scale.px(54.0))
        .build_cartesian_2d(x0..x1, y0..y1)
        .map_err(err)?;
    chart
        .configure_mesh()
        .disable_mesh()
        .x_desc("x (normalised)")
        .y_desc("y (normalised)")
        .label_style(scale.font(15.0))
        .axis_desc_style(scale.font(16.0))
        .draw()
        .map_err(err)?;
    let (lo, hi) = map.colour_range();
    let cells = heatmap_cells(map, move |v| {
        let [r, g, b] = viridis(if v.is_finite() { v } else { hi }, lo, hi);
        RGBColor(r, g, b)
    });
    chart.draw_series(cells).map_err(err)?;
    let inside = |p: &&Point| p[0] >= x0 && p[0] <= x1 && p[1] >= y0 && p[1] <= y1;
    for d in dots.iter().filter(|d| !d.points.is_empty()) {
        let r = scale.px(d.radius);
        let colour = d.colour;
        chart
            .draw_series(
                d.points
                    .iter()
                    .filter(inside)
                    .map(|p| Circle::new((p[0], p[1]), r, colour.filled())),
            )
            .map_err(err)?
            .label(d.label)
            .legend(move |(x, y)| Circle::new((x, y), r + 2, colour.filled()));
    }
    if dots.iter().any(|d| !d.points.is_empty()) {
        legend(&mut chart, scale)?;
    }
    colour_bar(&bar, lo, hi, label, scale)
}

/// A vertical viridis bar over `[lo, hi]` with its ticks and `label` on the right.
fn colour_bar(area: &Area, lo: f32, hi: f32, label: &str, scale: Scale) -> Result<()> {
    let mut chart = ChartBuilder::on(area)
        .margin_top(scale.px(48.0))
        .margin_bottom(scale.px(54.0))
        .margin_left(scale.px(6.0))
        .set_label_area_size(LabelAreaPosition::Right, scale.px(80.0))
        .build_cartesian_2d(0f32..1f32, lo..hi)
        .map_err(err)?;
    chart
        .configure_mesh()
        .disable_mesh()
        .disable_x_axis()
        .y_desc(label)
        .y_labels(6)
        .label_style(scale.font(14.0))
        .axis_desc_style(scale.font(15.0))
        .draw()
        .map_err(err)?;
    let n = 128;
    let step = (hi - lo) / n as f32;
    chart
        .draw_series((0..n).map(|i| {
            let v = lo + i as f32 * step;
            let [r, g, b] = viridis(v + step / 2.0, lo, hi);
            Rectangle::new([(0.0, v), (1.0, v + step)], RGBColor(r, g, b).filled())
        }))
        .map_err(err)?;
    Ok(())
}

fn square_chart<'a, 'b>(
    area: &'a Area<'b>,
    title: &str,
    range: Range2,
    scale: Scale,
) -> Result<
    ChartContext<
        'a,
        BitMapBackend<'b>,
        Cartesian2d<plotters::coord::types::RangedCoordf32, plotters::coord::types::RangedCoordf32>,
    >,
> {
    let ((x0, x1), (y0, y1)) = range;
    let mut chart = ChartBuilder::on(area)
        .caption(title, scale.font(20.0))
        .margin(scale.px(10.0))
        .x_label_area_size(scale.px(44.0))
        .y_label_area_size(scale.px(54.0))
        .build_cartesian_2d(x0..x1, y0..y1)
        .map_err(err)?;
    chart
        .configure_mesh()
        .light_line_style(WHITE)
        .x_desc("x (normalised)")
        .y_desc("y (normalised)")
        .label_style(scale.font(15.0))
        .axis_desc_style(scale.font(16.0))
        .draw()
        .map_err(err)?;
    Ok(chart)
}

/// Velocity arrows scaled so the longest spans about one grid cell.
fn arrows_figure(
    root: &Area,
    title: &str,
    range: Range2,
    arrows: &[(Point, Point)],
    grid: f64,
    scale: Scale,
) -> Result<()> {
    let mut chart = square_chart(root, title, range, scale)?;
    let ((x0, x1), _) = range;
    chart
        .draw_series(arrow_segments(
            arrows,
            0.9 * (x1 - x0) / grid as f32,
            scale.px(1.5),
        ))
        .map_err(err)?;
    Ok(())
}

/// Target samples, prior samples and some ODE paths.
fn samples_figure(
    root: &Area,
    title: &str,
    range: Range2,
    target: &[Point],
    samples: &[Point],
    paths: &[Vec<Point>],
    scale: Scale,
) -> Result<()> {
    let mut chart = square_chart(root, title, range, scale)?;
    let ((x0, x1), (y0, y1)) = range;
    let inside = |p: &&Point| p[0] >= x0 && p[0] <= x1 && p[1] >= y0 && p[1] <= y1;
    let grey = RGBColor(150, 150, 150);
    let r = scale.px(1.5);
    chart
        .draw_series(
            target
                .iter()
                .filter(inside)
                .map(|p| Circle::new((p[0], p[1]), r, grey.filled())),
        )
        .map_err(err)?
        .label("target samples")
        .legend(move |(x, y)| Circle::new((x, y), r + 2, grey.filled()));
    let path_colour = RGBColor(90, 160, 255).mix(0.6);
    for (k, path) in paths.iter().enumerate() {
        let series = chart
            .draw_series(LineSeries::new(
                path.iter().map(|p| (p[0], p[1])),
                path_colour.stroke_width(scale.px(1.0)),
            ))
            .map_err(err)?;
        if k == 0 {
            series.label("ODE paths").legend(move |(x, y)| {
                PathElement::new(vec![(x - 8, y), (x + 8, y)], path_colour.stroke_width(2))
            });
        }
    }
    let r = scale.px(2.0);
    chart
        .draw_series(
            samples
                .iter()
                .filter(inside)
                .map(|p| Circle::new((p[0], p[1]), r, SAMPLE_DOTS.filled())),
        )
        .map_err(err)?
        .label("prior samples")
        .legend(move |(x, y)| Circle::new((x, y), r + 2, SAMPLE_DOTS.filled()));
    legend(&mut chart, scale)?;
    Ok(())
}

/// The legend of every figure here: upper right, on a light box.
fn legend<'a, DB: DrawingBackend + 'a, CT: CoordTranslate>(
    chart: &mut ChartContext<'a, DB, CT>,
    scale: Scale,
) -> Result<()> {
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font(scale.font(14.0))
        .draw()
        .map_err(err)
}

/// The lowest and highest finite value, padded by 5 %.
fn padded(values: impl Iterator<Item = f32>) -> (f32, f32) {
    let (lo, hi) = values
        .filter(|v| v.is_finite())
        .fold((f32::INFINITY, f32::NEG_INFINITY), |(a, b), v| {
            (a.min(v), b.max(v))
        });
    if !lo.is_finite() {
        (0.0, 1.0)
    } else if hi > lo {
        (lo - 0.05 * (hi - lo), hi + 0.05 * (hi - lo))
    } else {
        (lo - 0.5, lo + 0.5)
    }
}

/// The prior's loss above L_align and the NLL of y (twin axes), both over log-scale steps.
fn curves_figure(
    root: &Area,
    target: &str,
    curves: &Curves,
    smoothing: usize,
    scale: Scale,
) -> Result<()> {
    let (top, bottom) = root.split_vertically(root.dim_in_pixel().1 / 2);
    let smooth = |v: Vec<f32>| moving_average(&v, smoothing.max(1));
    let prior_loss = smooth(curves.prior.iter().map(|p| p.1).collect());
    let prior: Vec<(f64, f32)> = curves
        .prior
        .iter()
        .zip(prior_loss)
        .map(|(p, l)| (p.0.max(1) as f64, l))
        .collect();
    let n = prior.last().map_or(2.0, |p| p.0.max(2.0));
    let (l0, l1) = padded(prior.iter().map(|p| p.1));
    let mut chart = ChartBuilder::on(&top)
        .caption(
            format!("{target}: the prior's flow-matching loss"),
            scale.font(20.0),
        )
        .margin(scale.px(10.0))
        .x_label_area_size(scale.px(44.0))
        .y_label_area_size(scale.px(62.0))
        .build_cartesian_2d((1f64..n).log_scale(), l0..l1)
        .map_err(err)?;
    chart
        .configure_mesh()
        .x_desc("prior step")
        .y_desc(format!("FM loss (moving average {smoothing})"))
        .label_style(scale.font(15.0))
        .axis_desc_style(scale.font(16.0))
        .draw()
        .map_err(err)?;
    chart
        .draw_series(LineSeries::new(prior, BLUE.stroke_width(scale.px(2.0))))
        .map_err(err)?;

    let align_loss = smooth(curves.align.iter().map(|p| p.1).collect());
    let align: Vec<(f64, f32)> = curves
        .align
        .iter()
        .zip(align_loss)
        .map(|(p, l)| (p.0.max(1) as f64, l))
        .collect();
    let nll: Vec<(f64, f32)> = curves
        .nll
        .iter()
        .map(|p| (p.0.max(1) as f64, p.1))
        .collect();
    let n = align.iter().chain(&nll).map(|p| p.0).fold(2.0f64, f64::max);
    let (a0, a1) = padded(align.iter().map(|p| p.1));
    let (n0, n1) = padded(nll.iter().map(|p| p.1));
    let mut chart = ChartBuilder::on(&bottom)
        .caption(
            format!("{target}: L_align and the NLL of y"),
            scale.font(20.0),
        )
        .margin(scale.px(10.0))
        .x_label_area_size(scale.px(44.0))
        .y_label_area_size(scale.px(62.0))
        .right_y_label_area_size(scale.px(62.0))
        .build_cartesian_2d((1f64..n).log_scale(), a0..a1)
        .map_err(err)?
        .set_secondary_coord((1f64..n).log_scale(), n0..n1);
    chart
        .configure_mesh()
        .x_desc("alignment step")
        .y_desc(format!("L_align (moving average {smoothing})"))
        .label_style(scale.font(15.0))
        .axis_desc_style(scale.font(16.0))
        .draw()
        .map_err(err)?;
    chart
        .configure_secondary_axes()
        .y_desc("NLL of y")
        .label_style(scale.font(15.0))
        .axis_desc_style(scale.font(16.0))
        .draw()
        .map_err(err)?;
    let w = scale.px(2.0);
    chart
        .draw_series(LineSeries::new(align, BLUE.stroke_width(w)))
        .map_err(err)?
        .label("L_align")
        .legend(move |(x, y)| PathElement::new(vec![(x - 8, y), (x + 8, y)], BLUE.stroke_width(2)));
    chart
        .draw_secondary_series(LineSeries::new(nll, RED.stroke_width(w)))
        .map_err(err)?
        .label("NLL of y")
        .legend(move |(x, y)| PathElement::new(vec![(x - 8, y), (x + 8, y)], RED.stroke_width(2)));
    legend(&mut *chart, scale)?;
    Ok(())
}
