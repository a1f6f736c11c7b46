//! Figures of headless runs from plain data: PNG panels drawn with plotters (bundled font), image
//! grids, all written atomically.

use std::path::Path;
use std::sync::Once;

use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::colors::colormaps::ViridisRGB;

use crate::error::{Error, Result};
use crate::files::write_atomic;
use crate::grid::{Heatmap, Point};

fn register_font() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // The font ships with the crate, so plots render the same on every machine.
        let bytes: &'static [u8] = include_bytes!("../assets/DejaVuSans.ttf");
        if plotters::style::register_font("sans-serif", FontStyle::Normal, bytes).is_err() {
            tracing::warn!("could not register the bundled font; plot text may be missing");
        }
    });
}

type Area<'a> = DrawingArea<BitMapBackend<'a>, Shift>;

fn plot_err(e: impl std::fmt::Display) -> Error {
    Error::Figure(e.to_string())
}

/// Renders a PNG of `size` pixels with `draw`, writing it atomically to `path`.
pub fn save_png(
    path: &Path,
    size: (u32, u32),
    draw: impl FnOnce(&Area) -> Result<()>,
) -> Result<()> {
    register_font();
    let mut buf = vec![0u8; size.0 as usize * size.1 as usize * 3];
    {
        let area = BitMapBackend::with_buffer(&mut buf, size).into_drawing_area();
        area.fill(&WHITE).map_err(plot_err)?;
        draw(&area)?;
        area.present().map_err(plot_err)?;
    }
    write_png_rgb(path, &buf, size)
}

/// Writes `text` in a strip of `height` pixels along the bottom of `area` (a figure's budget or
/// caption) and returns the area above it.
pub fn with_footer<'a>(area: &Area<'a>, text: &str, height: u32) -> Result<Area<'a>> {
    let (w, h) = area.dim_in_pixel();
    let (upper, lower) = area.split_vertically(h.saturating_sub(height));
    let style = TextStyle::from(("sans-serif", 16)).color(&BLACK);
    // Long captions are cut at the figure's width rather than drawn off it.
    let max_chars = (w as usize / 9).max(10);
    let line: String = text.chars().take(max_chars).collect();
    lower
        .draw_text(&line, &style, (10, (height as i32 - 15) / 2))
        .map_err(plot_err)?;
    Ok(upper)
}

/// The viridis colour of `v` on the range `[lo, hi]` (clamped), as RGB bytes.
pub fn viridis(v: f32, lo: f32, hi: f32) -> [u8; 3] {
    let c = ViridisRGB::get_color_normalized(v.clamp(lo, hi), lo, hi);
    [c.0, c.1, c.2]
}

/// The cells of `map` as filled rectangles in data coordinates, each coloured by `colour` of its
/// value: what every heatmap figure draws.
pub fn heatmap_cells<'a>(
    map: &'a Heatmap,
    colour: impl Fn(f32) -> RGBColor + 'a,
) -> impl Iterator<Item = Rectangle<(f32, f32)>> + 'a {
    let ((x0, x1), (y0, y1)) = map.extent();
    let (nx, ny) = (map.xs.len(), map.ys.len());
    let dx = (x1 - x0) / (nx - 1).max(1) as f32;
    let dy = (y1 - y0) / (ny - 1).max(1) as f32;
    (0..ny)
        .flat_map(move |iy| (0..nx).map(move |ix| (ix, iy)))
        .map(move |(ix, iy)| {
            let (cx, cy) = (map.xs[ix], map.ys[iy]);
            Rectangle::new(
                [
                    (cx - dx / 2.0, cy - dy / 2.0),
                    (cx + dx / 2.0, cy + dy / 2.0),
                ],
                colour(map.values[iy * nx + ix]).filled(),
            )
        })
}

/// Writes `rgb` (row-major, 3 bytes a pixel) as a PNG of `size` pixels, atomically.
pub fn write_png_rgb(path: &Path, rgb: &[u8], size: (u32, u32)) -> Result<()> {
    let mut png = Vec::new();
    encode_png(&mut png, rgb, size)?;
    write_atomic(path, &png)
}

fn encode_png(out: &mut Vec<u8>, rgb: &[u8], (w, h): (u32, u32)) -> Result<()> {
    let mut encoder = png::Encoder::new(out, w, h);
    encoder.set_color(png::ColorType::Rgb);
    encoder.set_depth(png::BitDepth::Eight);
    let mut writer = encoder.write_header().map_err(plot_err)?;
    writer.write_image_data(rgb).map_err(plot_err)
}

/// Writes a two-row image grid PNG (e.g. originals over reconstructions): `top` and `bottom` are
/// `[n, 3, size, size]` images in [-1, 1].
pub fn write_image_grid(path: &Path, top: &[f32], bottom: &[f32], size: usize) -> Result<()> {
    let px = 3 * size * size;
    let n = (top.len() / px).min(bottom.len() / px).max(1);
    let (w, h) = (n * size, 2 * size);
    let mut rgb = vec![0u8; w * h * 3];
    for (row, src) in [top, bottom].iter().enumerate() {
        for i in 0..(src.len() / px).min(n) {
            for y in 0..size {
                for x in 0..size {
                    for c in 0..3 {
                        let v = src[((i * 3 + c) * size + y) * size + x];
                        let byte = ((v + 1.0) * 127.5).round().clamp(0.0, 255.0) as u8;
                        rgb[((row * size + y) * w + i * size + x) * 3 + c] = byte;
                    }
                }
            }
        }
    }
    write_png_rgb(path, &rgb, (w as u32, h as u32))
}

/// A point overlay on a heatmap: points, colour, radius in pixels.
pub struct Overlay<'a> {
    pub points: &'a [Point],
    pub colour: RGBColor,
    pub radius: u32,
}

/// Draws `map` with viridis colours, a colour bar and the overlays, titled `title`.
pub fn heatmap_panel(area: &Area, title: &str, map: &Heatmap, overlays: &[Overlay]) -> Result<()> {
    let (main, bar) =
        area.split_horizontally(area.dim_in_pixel().0.saturating_sub(COLOUR_BAR_WIDTH));
    let ((x0, x1), (y0, y1)) = map.extent();
    let mut chart = ChartBuilder::on(&main)
        .caption(title, ("sans-serif", 20))
        .margin(6)
        .x_label_area_size(32)
        .y_label_area_size(44)
        .build_cartesian_2d(x0..x1, y0..y1)
        .map_err(plot_err)?;
    chart
        .configure_mesh()
        .disable_mesh()
        .label_style(("sans-serif", 14))
        .draw()
        .map_err(plot_err)?;
    let (lo, hi) = map.colour_range();
    let cells = heatmap_cells(map, move |v| {
        let c = ViridisRGB::get_color_normalized(v.clamp(lo, hi), lo, hi);
        RGBColor(c.0, c.1, c.2)
    });
    chart.draw_series(cells).map_err(plot_err)?;
    for o in overlays {
        let inside = o
            .points
            .iter()
            .filter(|p| p[0] >= x0 && p[0] <= x1 && p[1] >= y0 && p[1] <= y1);
        chart
            .draw_series(inside.map(|p| Circle::new((p[0], p[1]), o.radius, o.colour.filled())))
            .map_err(plot_err)?;
    }
    colour_bar(&bar, lo, hi)
}

/// Pixels a heatmap panel gives its colour bar: the bar and room for labels such as `-12.35`.
const COLOUR_BAR_WIDTH: u32 = 90;

/// A short tick label: three or four significant digits, never more than six characters
/// (`-12.35`, `0.125`, `1234`), so a colour bar's labels fit beside it.
pub fn tick_label(v: f32) -> String {
    let a = v.abs();
    if a >= 100.0 || v == 0.0 {
        format!("{v:.0}")
    } else if a >= 10.0 {
        format!("{v:.1}")
    } else if a >= 1.0 {
        format!("{v:.2}")
    } else if a >= 0.01 {
        format!("{v:.3}")
    } else {
        format!("{v:.0e}")
    }
}

fn colour_bar(area: &Area, lo: f32, hi: f32) -> Result<()> {
    // The labels stand left of an 18-pixel bar; the label area is sized for six characters at
    // 14 px, so they are never cut (the bar is drawn after the labels and would cover them).
    let mut chart = ChartBuilder::on(area)
        .margin_top(34)
        .margin_bottom(34)
        .margin_right(6)
        .y_label_area_size(COLOUR_BAR_WIDTH - 24)
        .build_cartesian_2d(0f32..1f32, lo..hi)
        .map_err(plot_err)?;
    chart
        .configure_mesh()
        .disable_mesh()
        .disable_x_axis()
        .label_style(("sans-serif", 14))
        .y_labels(6)
        // A trailing space keeps the right-aligned label off the bar's edge.
        .y_label_formatter(&|v| format!("{} ", tick_label(*v)))
        .draw()
        .map_err(plot_err)?;
    let n = 100;
    let step = (hi - lo) / n as f32;
    chart
        .draw_series((0..n).map(|i| {
            let v = lo + i as f32 * step;
            let c = ViridisRGB::get_color_normalized(v, lo, hi);
            Rectangle::new([(0.0, v), (1.0, v + step)], c.filled())
        }))
        .map_err(plot_err)?;
    Ok(())
}

/// L_align (smoothed) and the NLL of y on twin axes over a log-scale step axis (paper Fig. 3c).
///
/// `loss[i]` belongs to step `i + 1`; `nll` holds `(step, mean NLL)` pairs.
pub fn curves_panel(area: &Area, title: &str, loss: &[f32], nll: &[(usize, f32)]) -> Result<()> {
    let loss: Vec<(f64, f32)> = loss
        .iter()
        .enumerate()
        .map(|(i, &v)| ((i + 1) as f64, v))
        .collect();
    let nll: Vec<(f64, f32)> = nll.iter().map(|&(s, v)| (s.max(1) as f64, v)).collect();
    twin_curves_panel(
        area,
        title,
        ("L_align (smoothed)", "L_align", &loss),
        ("NLL of y", "NLL of y", &nll),
    )
}

/// Two curves over log-scale steps on twin y axes: `(axis label, legend, points)` for each side.
pub fn twin_curves_panel(
    area: &Area,
    title: &str,
    left: (&str, &str, &[(f64, f32)]),
    right: (&str, &str, &[(f64, f32)]),
) -> Result<()> {
    let n = left
        .2
        .iter()
        .chain(right.2)
        .map(|p| p.0)
        .fold(2.0f64, f64::max);
    let finite = |v: &mut dyn Iterator<Item = f32>| {
        v.filter(|x| x.is_finite())
            .fold((f32::INFINITY, f32::NEG_INFINITY), |(a, b), x| {
                (a.min(x), b.max(x))
            })
    };
    let (l0, l1) = finite(&mut left.2.iter().map(|p| p.1));
    let (n0, n1) = finite(&mut right.2.iter().map(|p| p.1));
    let pad = |(a, b): (f32, f32)| {
        if a.is_finite() && b > a {
            (a - 0.05 * (b - a), b + 0.05 * (b - a))
        } else if a.is_finite() {
            (a - 0.5, a + 0.5)
        } else {
            (0.0, 1.0)
        }
    };
    let (l0, l1) = pad((l0, l1));
    let (n0, n1) = pad((n0, n1));
    let mut chart = ChartBuilder::on(area)
        .caption(title, ("sans-serif", 20))
        .margin(8)
        .x_label_area_size(32)
        .y_label_area_size(58)
        .right_y_label_area_size(58)
        .build_cartesian_2d((1f64..n).log_scale(), l0..l1)
        .map_err(plot_err)?
        .set_secondary_coord((1f64..n).log_scale(), n0..n1);
    chart
        .configure_mesh()
        .x_desc("step")
        .y_desc(left.0)
        .label_style(("sans-serif", 14))
        .y_label_formatter(&|v| tick_label(*v))
        .x_label_formatter(&|v| format!("{v:.0}"))
        .draw()
        .map_err(plot_err)?;
    chart
        .configure_secondary_axes()
        .y_desc(right.0)
        .label_style(("sans-serif", 14))
        .y_label_formatter(&|v| tick_label(*v))
        .draw()
        .map_err(plot_err)?;
    let blue = RGBColor(31, 119, 180);
    let orange = RGBColor(255, 127, 14);
    chart
        .draw_series(LineSeries::new(
            left.2.iter().copied(),
            blue.stroke_width(2),
        ))
        .map_err(plot_err)?
        .label(left.1)
        .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], blue.stroke_width(2)));
    chart
        .draw_secondary_series(LineSeries::new(
            right.2.iter().copied(),
            orange.stroke_width(2),
        ))
        .map_err(plot_err)?
        .label(right.1)
        .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 16, y)], orange.stroke_width(2)));
    chart
        .configure_series_labels()
        .border_style(BLACK)
        .background_style(WHITE.mix(0.8))
        .label_font(("sans-serif", 14))
        .draw()
        .map_err(plot_err)?;
    Ok(())
}

/// A scatter of points in a square view.
pub fn scatter_panel(
    area: &Area,
    title: &str,
    range: ((f32, f32), (f32, f32)),
    points: &[Point],
    colour: RGBColor,
) -> Result<()> {
    let ((x0, x1), (y0, y1)) = range;
    let mut chart = ChartBuilder::on(area)
        .caption(title, ("sans-serif", 20))
        .margin(6)
        .x_label_area_size(32)
        .y_label_area_size(44)
        .build_cartesian_2d(x0..x1, y0..y1)
        .map_err(plot_err)?;
    chart
        .configure_mesh()
        .label_style(("sans-serif", 14))
        .light_line_style(WHITE)
        .draw()
        .map_err(plot_err)?;
    chart
        .draw_series(
            points
                .iter()
                .filter(|p| p[0] >= x0 && p[0] <= x1 && p[1] >= y0 && p[1] <= y1)
                .map(|p| Circle::new((p[0], p[1]), 2, colour.mix(0.6).filled())),
        )
        .map_err(plot_err)?;
    Ok(())
}

/// Velocity arrows `(position, velocity)` drawn with a common scale so the longest is one grid cell.
pub fn arrows_panel(
    area: &Area,
    title: &str,
    range: ((f32, f32), (f32, f32)),
    arrows: &[(Point, Point)],
    cell: f32,
) -> Result<()> {
    let ((x0, x1), (y0, y1)) = range;
    let mut chart = ChartBuilder::on(area)
        .caption(title, ("sans-serif", 20))
        .margin(6)
        .x_label_area_size(32)
        .y_label_area_size(44)
        .build_cartesian_2d(x0..x1, y0..y1)
        .map_err(plot_err)?;
    chart
        .configure_mesh()
        .label_style(("sans-serif", 14))
        .light_line_style(WHITE)
        .draw()
        .map_err(plot_err)?;
    chart
        .draw_series(arrow_segments(arrows, 0.9 * cell, 1))
        .map_err(plot_err)?;
    Ok(())
}

/// Velocity arrows `(position, velocity)` as strokes in data coordinates: shafts on one scale
/// that makes the fastest `longest` long, heads of two strokes back from the tip at +-25 degrees,
/// coloured by speed on viridis. What the headless and the window's velocity figures draw.
pub fn arrow_segments(
    arrows: &[(Point, Point)],
    longest: f32,
    stroke: u32,
) -> Vec<PathElement<(f32, f32)>> {
    let speed = |v: &Point| v[0].hypot(v[1]);
    let vmax = arrows
        .iter()
        .map(|(_, v)| speed(v))
        .fold(0.0f32, f32::max)
        .max(1e-12);
    let k = longest / vmax;
    let (c25, s25) = (0.906f32, 0.423f32);
    arrows
        .iter()
        .flat_map(|(p, v)| {
            let tip = (p[0] + v[0] * k, p[1] + v[1] * k);
            let [r, g, b] = viridis(speed(v), 0.0, vmax);
            let style = RGBColor(r, g, b).stroke_width(stroke);
            let (dx, dy) = (tip.0 - p[0], tip.1 - p[1]);
            let len = dx.hypot(dy).max(1e-12);
            let (ux, uy) = (dx / len, dy / len);
            let h = 0.35 * len;
            let left = (
                tip.0 - h * (ux * c25 - uy * s25),
                tip.1 - h * (uy * c25 + ux * s25),
            );
            let right = (
                tip.0 - h * (ux * c25 + uy * s25),
                tip.1 - h * (uy * c25 - ux * s25),
            );
            [
                PathElement::new(vec![(p[0], p[1]), tip], style),
                PathElement::new(vec![left, tip, right], style),
            ]
        })
        .collect()
}
