//! The visualizer's UI: the toolbar, the settings, the panels laid out for the space there is, the
//! status line and the questions. UI functions (`*_ui`) draw and push [`Action`]s; effects happen
//! in [`FlowAlignApp::apply`].

use std::path::PathBuf;
use std::sync::Arc;

use eframe::egui::{self, Color32, RichText, Ui, Vec2};

use super::app::{
    Action, FlowAlignApp, FrameStats, Shot, TargetChoice, count, duration, estimate_secs,
    prior_params,
};
use super::panels::{
    self, Badge, HeatTexture, LATENT_COLOUR, Overlay, PanelResponse, STALE_COLOUR, TARGET_COLOUR,
};
use super::worker::{MapKind, SLOW_GRID_MAX, Stage};
use crate::align::Reduction;
use crate::flow::solver::Solver;
use crate::grid::{Heatmap, Point, Range2};
use crate::toy::{LatentInit, Plateau, Preset, TargetKind, ToyConfig};

const GREEN: Color32 = Color32::from_rgb(80, 200, 120);
const RED: Color32 = Color32::from_rgb(255, 90, 90);

/// Height of a panel's title row.
pub const TITLE_HEIGHT: f32 = 20.0;
/// Space between panels.
pub const GAP: f32 = 8.0;
/// Height of the status line at the bottom of the window.
pub const STATUS_HEIGHT: f32 = 24.0;
/// Height of the line above the panels (colour scale, correlations).
const LEGEND_HEIGHT: f32 = 22.0;

/// Sizes of the central area's panels: square panels in a grid of `cols` columns beside a
/// column of curves `curves_width` wide.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Layout {
    pub square: f32,
    pub cols: usize,
    pub curves_width: f32,
}

/// Lays `squares` square panels (each under a title row) out in a grid beside the curves, as
/// large as `avail` allows: the heatmaps are the point, so they take the space there is.
pub fn layout(avail: Vec2, squares: usize) -> Layout {
    let curves_width = (avail.x * 0.28).clamp(220.0, 460.0);
    let width = avail.x - curves_width - GAP;
    let mut best = Layout {
        square: 0.0,
        cols: 1,
        curves_width,
    };
    for cols in 1..=squares.max(1) {
        let rows = squares.max(1).div_ceil(cols);
        let by_width = (width - GAP * (cols - 1) as f32) / cols as f32;
        let by_height = (avail.y - rows as f32 * (TITLE_HEIGHT + GAP)) / rows as f32;
        let square = by_width.min(by_height).floor();
        if square > best.square {
            best = Layout {
                square,
                cols,
                curves_width,
            };
        }
    }
    best.square = best.square.max(100.0);
    best
}

impl FlowAlignApp {
    /// The whole window; returns what the user asked for.
    pub(super) fn window_ui(&mut self, ui: &mut Ui) -> Vec<Action> {
        let mut actions = Vec::new();
        egui::Panel::top("controls").show(ui, |ui| self.controls_ui(ui, &mut actions));
        // Messages have a fixed place: a new one never moves a control.
        egui::Panel::bottom("status")
            .exact_size(STATUS_HEIGHT)
            .show(ui, |ui| self.status_ui(ui, &mut actions));
        egui::Panel::left("settings")
            .default_size(280.0)
            .show(ui, |ui| {
                egui::ScrollArea::vertical().show(ui, |ui| self.settings_ui(ui, &mut actions));
            });
        egui::CentralPanel::default().show(ui, |ui| self.landscapes_ui(ui, &mut actions));
        self.question_ui(ui.ctx(), &mut actions);
        actions
    }

    fn question_ui(&mut self, ctx: &egui::Context, actions: &mut Vec<Action>) {
        let Some(q) = &self.question else {
            return;
        };
        let response = egui::Modal::new(egui::Id::unique("flowalign-question")).show(ctx, |ui| {
            ui.set_max_width(420.0);
            ui.label(RichText::new("End the session?").strong());
            ui.add(egui::Label::new(&q.text).wrap());
            ui.add_space(6.0);
            ui.horizontal(|ui| {
                if ui.button(&q.yes).clicked() {
                    actions.push(Action::Confirm);
                }
                if ui.button("Keep the session").clicked() {
                    actions.push(Action::KeepSession);
                }
            });
        });
        if response.should_close() && actions.is_empty() {
            actions.push(Action::KeepSession);
        }
    }

    fn controls_ui(&mut self, ui: &mut Ui, actions: &mut Vec<Action>) {
        let s = &self.state;
        ui.horizontal(|ui| {
            ui.heading("flowalign");
            ui.separator();
            match s.stage {
                Stage::Idle => {
                    let (prior, align) = estimate_secs(&self.settings.cfg, &self.settings.speed);
                    if ui
                        .button(RichText::new("Start").strong())
                        .on_hover_text("train the prior, then align the latents (space)")
                        .clicked()
                    {
                        actions.push(Action::Start);
                    }
                    ui.label(format!(
                        "a session takes about {} on this machine",
                        duration(prior + align)
                    ));
                }
                _ => {
                    if s.stage != Stage::Done {
                        if s.paused {
                            if ui.button("Resume").on_hover_text("space").clicked() {
                                actions.push(Action::Resume);
                            }
                        } else if ui.button("Pause").on_hover_text("space").clicked() {
                            actions.push(Action::Pause);
                        }
                    }
                    let label = if s.stage == Stage::Prior {
                        "Align now"
                    } else {
                        "Restart alignment"
                    };
                    if ui
                        .button(label)
                        .on_hover_text(
                            "freeze the prior as trained so far and align the latents with the current alignment settings",
                        )
                        .clicked()
                    {
                        actions.push(Action::Align);
                    }
                    if ui.button("Reset").on_hover_text("R").clicked() {
                        actions.push(Action::Reset);
                    }
                    ui.separator();
                    ui.label(RichText::new(self.stage_text()).strong().color(GREEN));
                    ui.add(egui::Label::new(self.progress_text()).truncate());
                }
            }
            ui.with_layout(egui::Layout::right_to_left(egui::Align::Center), |ui| {
                if ui
                    .button("Window PNG")
                    .on_hover_text("save a screenshot of the window")
                    .clicked()
                {
                    actions.push(Action::Screenshot(Shot::Window));
                }
            });
        });
    }

    fn stage_text(&self) -> String {
        let s = &self.state;
        let paused = if s.paused { " (paused)" } else { "" };
        match s.stage {
            Stage::Idle => "idle".into(),
            Stage::Prior => format!(
                "prior {}/{}{paused}",
                count(s.prior_step()),
                count(s.prior_total)
            ),
            Stage::Align => format!(
                "align {}/{}{paused}",
                count(s.align_step()),
                count(s.align_total)
            ),
            Stage::Done => format!(
                "done: align {}/{}",
                count(s.align_step()),
                count(s.align_total)
            ),
        }
    }

    /// The losses, the rate and what is left of the stage.
    fn progress_text(&self) -> String {
        let s = &self.state;
        let rate =
            |r: Option<f64>| r.map_or("- steps/s".to_string(), |r| format!("{r:.0} steps/s"));
        match s.stage {
            Stage::Prior => {
                let Some(&(_, loss, lr)) = s.curves.prior.last() else {
                    return String::new();
                };
                let r = s.prior_rate.per_sec();
                let mut text = format!("loss {loss:.3}  lr {lr:.1e}  {}", rate(r));
                if let Some(r) = r {
                    let left = s.prior_total.saturating_sub(s.prior_step()) as f64 / r;
                    let flat = s
                        .session_cfg
                        .as_ref()
                        .is_some_and(|c| c.prior.stop_when_flat.is_some());
                    text.push_str(&format!(
                        "  {}{} left",
                        if flat { "at most " } else { "" },
                        duration(left)
                    ));
                    if let Some(cfg) = &s.session_cfg {
                        let (_, align) = estimate_secs(cfg, &self.settings.speed);
                        text.push_str(&format!(", then about {} to align", duration(align)));
                    }
                }
                text
            }
            Stage::Align | Stage::Done => {
                let (Some(l), Some(n)) = (s.curves.align.last(), s.curves.nll.last()) else {
                    return String::new();
                };
                let r = s.align_rate.per_sec();
                let mut text = format!("L_align {:.3}  NLL(y) {:.3}  {}", l.1, n.1, rate(r));
                if let (Some(r), Stage::Align) = (r, s.stage) {
                    let left = s.align_total.saturating_sub(s.align_step()) as f64 / r;
                    text.push_str(&format!("  {} left", duration(left)));
                }
                text
            }
            Stage::Idle => String::new(),
        }
    }

    fn status_ui(&mut self, ui: &mut Ui, actions: &mut Vec<Action>) {
        ui.with_layout(egui::Layout::right_to_left(egui::Align::Center), |ui| {
            // The debug corner: frame times.
            ui.label(
                RichText::new(format!(
                    "frame {:.1} ms (p95 {:.1})",
                    FrameStats::quantile(&self.frames.cpu_ms, 0.5),
                    FrameStats::quantile(&self.frames.cpu_ms, 0.95)
                ))
                .small()
                .weak(),
            )
            .on_hover_text("CPU time of the UI pass, median and 95th percentile");
            if let Some(text) = self.hover_text() {
                ui.separator();
                ui.label(RichText::new(text).monospace().small());
            }
            ui.with_layout(egui::Layout::left_to_right(egui::Align::Center), |ui| {
                let message = match (&self.status.error, &self.status.notice) {
                    (Some(e), _) => Some(RichText::new(format!("error: {e}")).color(RED)),
                    (None, Some(n)) => Some(RichText::new(n).italics()),
                    (None, None) => None,
                };
                if message.is_some()
                    && ui
                        .small_button("dismiss")
                        .on_hover_text("clear the message")
                        .clicked()
                {
                    actions.push(Action::DismissMessage);
                }
                if let Some(what) = self.undo_available()
                    && ui
                        .small_button("Undo")
                        .on_hover_text(format!("put back {what} (Ctrl+Z)"))
                        .clicked()
                {
                    actions.push(Action::Undo);
                }
                if let Some(m) = message {
                    ui.add(egui::Label::new(m).truncate());
                }
            });
        });
    }

    fn hover_text(&self) -> Option<String> {
        let p = self.hover?;
        let mut text = format!("({:.2}, {:.2})", p[0], p[1]);
        let a = self.state.shown_analysis();
        let maps: [(&str, Option<&Heatmap>); 4] = [
            ("NLL", self.state.target_map.as_deref()),
            (
                "L_align",
                a.and_then(|a| a.align.as_ref()).map(|m| &*m.value),
            ),
            (
                "prior NLL",
                a.and_then(|a| a.prior_nll.as_ref()).map(|m| &*m.value),
            ),
            (
                "-estimate",
                a.and_then(|a| a.neg_bound.as_ref()).map(|m| &*m.value),
            ),
        ];
        for (name, map) in maps {
            if let Some(v) = map.and_then(|m| panels::value_at(m, p)) {
                text.push_str(&format!("  {name} {v:.3}"));
            }
        }
        Some(text)
    }

    fn settings_ui(&mut self, ui: &mut Ui, actions: &mut Vec<Action>) {
        let session = self.state.stage != Stage::Idle;
        egui::CollapsingHeader::new("Target")
            .default_open(true)
            .show(ui, |ui| self.target_ui(ui, actions));
        egui::CollapsingHeader::new("Prior")
            .default_open(true)
            .show(ui, |ui| {
                let cfg = &self.settings.cfg;
                ui.horizontal(|ui| {
                    for preset in [Preset::Interactive, Preset::Paper] {
                        let base = ToyConfig::preset(preset, cfg.target);
                        let (p, a) = estimate_secs(&base, &self.settings.speed);
                        let name = format!("{preset:?}").to_lowercase();
                        if ui
                            .selectable_label(cfg.preset == preset, &name)
                            .on_hover_text(format!(
                                "fill in the preset's values (METHOD.md section 5): {} prior steps at width {}, about {} on this machine",
                                count(base.prior.steps),
                                base.prior.width,
                                duration(p + a)
                            ))
                            .clicked()
                        {
                            actions.push(Action::SetPreset(preset));
                        }
                    }
                });
                let cfg = &mut self.settings.cfg;
                ui.add_enabled_ui(!session, |ui| {
                    let p = &mut cfg.prior;
                    egui::Grid::new("prior_grid").num_columns(2).show(ui, |ui| {
                        field(ui, "width", egui::DragValue::new(&mut p.width).range(4..=2048));
                        field(ui, "depth", egui::DragValue::new(&mut p.depth).range(1..=16));
                        field(ui, "batch", egui::DragValue::new(&mut p.batch).range(8..=65536));
                        field(
                            ui,
                            "prior lr",
                            egui::DragValue::new(&mut p.lr)
                                .range(1e-6..=10.0)
                                .speed(1e-4)
                                .max_decimals(6),
                        );
                        field(
                            ui,
                            "prior steps",
                            egui::DragValue::new(&mut p.steps).range(1..=1_000_000),
                        );
                        field(
                            ui,
                            "EMA",
                            egui::DragValue::new(&mut p.ema).range(0.0..=0.9999).speed(1e-3),
                        );
                        field(ui, "seed", egui::DragValue::new(&mut cfg.seed));
                    });
                    let mut flat = cfg.prior.stop_when_flat.is_some();
                    if ui
                        .checkbox(&mut flat, "stop when the loss is flat")
                        .on_hover_text(
                            "freeze the prior early once its loss stops falling: the mean over the last 250 steps is less than 0.5 % below the 250 before (suits a constant learning rate; a cosine schedule still gains as it decays)",
                        )
                        .changed()
                    {
                        cfg.prior.stop_when_flat = flat.then(Plateau::default);
                    }
                });
                let cfg = &self.settings.cfg;
                let (p, a) = estimate_secs(cfg, &self.settings.speed);
                ui.label(
                    RichText::new(format!(
                        "{} prior steps x {} samples, {} parameters: about {} to train, {} to align here",
                        count(cfg.prior.steps),
                        count(cfg.prior.batch),
                        count(prior_params(cfg.prior.width, cfg.prior.depth)),
                        duration(p),
                        duration(a)
                    ))
                    .small(),
                );
                if session {
                    ui.label(RichText::new("fixed while a session runs (Reset to edit)").small());
                }
            });
        egui::CollapsingHeader::new("Alignment")
            .default_open(true)
            .show(ui, |ui| {
                let a = &mut self.settings.cfg.align;
                egui::Grid::new("align_grid").num_columns(2).show(ui, |ui| {
                    field(
                        ui,
                        "latents",
                        egui::DragValue::new(&mut a.n_latents).range(1..=100_000),
                    );
                    field(
                        ui,
                        "align steps",
                        egui::DragValue::new(&mut a.steps).range(1..=1_000_000),
                    );
                    field(
                        ui,
                        "align lr",
                        egui::DragValue::new(&mut a.lr)
                            .range(1e-6..=10.0)
                            .speed(1e-3)
                            .max_decimals(6),
                    );
                    field(
                        ui,
                        "mc samples",
                        egui::DragValue::new(&mut a.mc).range(1..=256),
                    );
                    let l = ui.label("reduction");
                    egui::ComboBox::from_id_salt("reduction")
                        .selected_text(format!("{:?}", a.reduction).to_lowercase())
                        .show_ui(ui, |ui| {
                            ui.selectable_value(&mut a.reduction, Reduction::Sum, "sum");
                            ui.selectable_value(&mut a.reduction, Reduction::Mean, "mean");
                        })
                        .response
                        .labelled_by(l.id);
                    ui.end_row();
                    let l = ui.label("init");
                    egui::ComboBox::from_id_salt("init")
                        .selected_text(format!("{:?}", a.init).to_lowercase())
                        .show_ui(ui, |ui| {
                            ui.selectable_value(&mut a.init, LatentInit::Normal, "normal N(0, I)");
                            ui.selectable_value(&mut a.init, LatentInit::Box, "uniform box");
                            ui.selectable_value(&mut a.init, LatentInit::Corner, "corner cluster");
                        })
                        .response
                        .labelled_by(l.id);
                    ui.end_row();
                });
                ui.label(RichText::new("applied by Align now / Restart alignment").small());
            });
        egui::CollapsingHeader::new("Landscapes")
            .default_open(true)
            .show(ui, |ui| {
                let v = &mut self.settings.view;
                let e = &mut self.settings.cfg.eval;
                ui.add(egui::Slider::new(&mut e.grid, 10..=150).text("heatmap grid"));
                ui.add(egui::Slider::new(&mut e.t_values, 1..=50).text("t values"))
                    .on_hover_text("L_align averages over t in linspace(0.1, 0.9, n)");
                ui.checkbox(&mut v.prior_nll, "prior's exact NLL (ODE)")
                    .on_hover_text(format!(
                        "slow: at most {SLOW_GRID_MAX} x {SLOW_GRID_MAX}, computed a slice at a time"
                    ));
                ui.checkbox(&mut v.bound, "paper's estimate -(C(y) - L_align)")
                    .on_hover_text(
                        "the quantity the paper calls a bound on log p; it is not one (METHOD.md \
                         section 3). On the NLL scale; 16 draws per cell",
                    );
                ui.add(egui::Slider::new(&mut v.velocity_t, 0.0..=1.0).text("velocity t"));
                ui.add(egui::Slider::new(&mut v.velocity_grid, 5..=40).text("arrows"));
                egui::ComboBox::from_label("solver")
                    .selected_text(format!("{:?}", v.solver))
                    .show_ui(ui, |ui| {
                        ui.selectable_value(&mut v.solver, Solver::Euler, "Euler");
                        ui.selectable_value(&mut v.solver, Solver::Rk4, "Rk4");
                    });
                ui.add(egui::Slider::new(&mut v.sample_steps, 1..=500).text("ODE steps"));
                ui.add(egui::Slider::new(&mut v.samples, 10..=5000).text("samples"));
                ui.add(egui::Slider::new(&mut v.paths, 0..=200).text("paths"));
                ui.add(
                    egui::Slider::new(&mut v.refresh_secs, 0.2..=10.0)
                        .text("refresh (s)")
                        .logarithmic(true),
                )
                .on_hover_text("seconds between refreshes of each map while the prior trains");
            });
        egui::CollapsingHeader::new("Curves")
            .default_open(false)
            .show(ui, |ui| {
                let c = &mut self.settings.curves;
                ui.checkbox(&mut c.log_steps, "log-scale steps");
                ui.add(egui::Slider::new(&mut c.smoothing, 1..=201).text("smoothing"));
                ui.add(egui::Slider::new(&mut self.settings.max_fps, 5.0..=60.0).text("max fps"))
                    .on_hover_text(
                        "repaints per second while training; fewer leave more CPU to training",
                    );
            });
        egui::CollapsingHeader::new("Export")
            .default_open(true)
            .show(ui, |ui| {
                let mut dir = self.settings.export_dir.display().to_string();
                ui.horizontal(|ui| {
                    let l = ui.label("export folder");
                    if ui
                        .text_edit_singleline(&mut dir)
                        .labelled_by(l.id)
                        .changed()
                    {
                        self.settings.export_dir = PathBuf::from(dir.trim());
                    }
                });
                ui.add(
                    egui::Slider::new(&mut self.settings.figure_width, 400..=4000)
                        .text("figure width (px)"),
                )
                .on_hover_text("the width of a panel saved with its PNG button");
                ui.horizontal(|ui| {
                    if ui.button("Curves CSV").clicked() {
                        actions.push(Action::ExportCurves);
                    }
                    if ui.button("Session TOML").clicked() {
                        actions.push(Action::ExportSession);
                    }
                });
                ui.label(
                    RichText::new("a session TOML loads here and in `flowalign toy --config`")
                        .small(),
                );
            });
    }

    fn target_ui(&mut self, ui: &mut Ui, actions: &mut Vec<Action>) {
        let cfg = &self.settings.cfg;
        let custom = cfg.points.is_some();
        let current = if custom { "custom" } else { cfg.target.name() };
        egui::ComboBox::from_label("target")
            .selected_text(current)
            .show_ui(ui, |ui| {
                for kind in TargetKind::ALL {
                    if ui
                        .selectable_label(!custom && cfg.target == kind, kind.name())
                        .clicked()
                    {
                        actions.push(Action::SetTarget(TargetChoice::Builtin(kind)));
                    }
                }
                if ui.selectable_label(custom, "custom").clicked() && !custom {
                    actions.push(Action::SetTarget(TargetChoice::Custom));
                }
            });
        let mut drawing = self.drawing;
        if ui
            .checkbox(&mut drawing, "draw on panel (a)")
            .on_hover_text("drag on the NLL panel to add target points")
            .changed()
        {
            actions.push(Action::SetDrawing(drawing));
        }
        ui.add(egui::Slider::new(&mut self.settings.brush, 0.05..=1.5).text("brush"));
        ui.add(egui::Slider::new(&mut self.settings.brush_rate, 1..=20).text("points/frame"));
        ui.horizontal(|ui| {
            let text = if self.settings.cfg.points.is_some() {
                self.points_description()
            } else {
                "no points of your own".into()
            };
            ui.label(text);
            if ui
                .add_enabled(
                    self.settings
                        .cfg
                        .points
                        .as_ref()
                        .is_some_and(|p| !p.is_empty()),
                    egui::Button::new("Clear"),
                )
                .on_hover_text("remove the points (Undo puts them back)")
                .clicked()
            {
                actions.push(Action::ClearDrawing);
            }
        });
        ui.horizontal(|ui| {
            ui.add(
                egui::TextEdit::singleline(&mut self.settings.file_path)
                    .hint_text("points.csv or session.toml")
                    .desired_width(140.0),
            );
            if ui.button("Load").clicked() {
                actions.push(Action::Load(PathBuf::from(self.settings.file_path.trim())));
            }
            if ui.button("Browse").clicked() {
                actions.push(Action::Browse);
            }
        });
        ui.label(RichText::new("or drop a CSV / TOML onto the window").small());
    }

    /// Makes sure the heatmap textures show the maps on display.
    fn update_textures(&mut self, ctx: &egui::Context) {
        let a = self.state.shown_analysis().cloned();
        let maps: [(&'static str, Option<Arc<Heatmap>>); 4] = [
            ("nll", self.state.target_map.clone()),
            (
                "align",
                a.as_ref()
                    .and_then(|a| a.align.as_ref())
                    .map(|m| m.value.clone()),
            ),
            (
                "prior_nll",
                a.as_ref()
                    .and_then(|a| a.prior_nll.as_ref())
                    .map(|m| m.value.clone()),
            ),
            (
                "bound",
                a.as_ref()
                    .and_then(|a| a.neg_bound.as_ref())
                    .map(|m| m.value.clone()),
            ),
        ];
        for (name, map) in maps {
            let Some(map) = map else {
                self.textures.retain(|t| t.0 != name);
                continue;
            };
            let key = Arc::as_ptr(&map) as usize;
            if self.textures.iter().any(|t| t.0 == name && t.1 == key) {
                continue;
            }
            self.textures.retain(|t| t.0 != name);
            self.textures
                .push((name, key, panels::heat_texture(ctx, name, &map)));
        }
    }

    /// The badge of a map computed from the prior at `step` (amber when the prior has moved on
    /// by more than a tenth since), with the progress of its next refresh.
    fn badge(&self, kind: MapKind, step: Option<usize>) -> Option<Badge> {
        let s = &self.state;
        let done = s.progress.iter().find(|p| p.0 == kind).map(|p| 100.0 * p.2);
        let progress = done.map(|d| format!(" · next {d:.0} %"));
        let Some(step) = step else {
            return done.map(|d| Badge {
                text: format!("{d:.0} % done"),
                colour: Color32::LIGHT_GRAY,
            });
        };
        let now = s.prior_step();
        let behind = s.stage == Stage::Prior && now > step + step / 10 + 1;
        let mut text = format!("prior step {}", count(step));
        if s.stage == Stage::Prior && now > step {
            text.push_str(&format!(" of {}", count(now)));
        }
        text.push_str(&progress.unwrap_or_default());
        Some(Badge {
            text,
            colour: if behind {
                STALE_COLOUR
            } else {
                Color32::LIGHT_GRAY
            },
        })
    }

    fn landscapes_ui(&mut self, ui: &mut Ui, actions: &mut Vec<Action>) {
        let ctx = ui.ctx().clone();
        self.update_textures(&ctx);
        ui.spacing_mut().item_spacing = egui::vec2(GAP, 4.0);
        let drawing = self.drawing;
        let idle = self.state.stage == Stage::Idle;
        let custom_canvas = drawing || (idle && self.state.target_samples.is_empty());
        let range: Range2 = if custom_canvas {
            ((-3.0, 3.0), (-3.0, 3.0))
        } else {
            self.state.range
        };
        let analysis = self.state.shown_analysis().cloned();
        let latents = self
            .state
            .shown_latents()
            .map(|(_, y)| y.clone())
            .unwrap_or_default();
        let target: Vec<Point> = if custom_canvas {
            self.settings.cfg.points.clone().unwrap_or_default()
        } else {
            self.state.target_samples.clone()
        };
        let textures = std::mem::take(&mut self.textures);
        let tex = |name: &str| textures.iter().find(|t| t.0 == name).map(|t| &t.2);

        // The colour scale and the correlations, on one line of fixed height.
        ui.allocate_ui_with_layout(
            egui::vec2(ui.available_width(), LEGEND_HEIGHT),
            egui::Layout::left_to_right(egui::Align::Center),
            |ui| {
                panels::colour_strip(ui);
                let mut text = String::new();
                for (name, label) in [
                    ("nll", "NLL"),
                    ("align", "L_align"),
                    ("prior_nll", "prior NLL"),
                    ("bound", "-bound"),
                ] {
                    if let Some(t) = tex(name) {
                        text.push_str(&format!("   {label} {:.2} .. {:.2}", t.range.0, t.range.1));
                    }
                }
                if let Some((p, s)) = analysis.as_ref().and_then(|a| a.correlation) {
                    text.push_str(&format!(
                        "   NLL vs L_align: Pearson {p:.3}  Spearman {s:.3}"
                    ));
                }
                ui.add(egui::Label::new(RichText::new(text)).truncate())
                    .on_hover_text(
                        "colour ranges of the maps; correlation of (a) and (b) over the grid",
                    );
            },
        );

        let view = self.settings.view.clone();
        let mut names: Vec<&'static str> = vec!["nll", "align"];
        if view.prior_nll {
            names.push("prior_nll");
        }
        if view.bound {
            names.push("bound");
        }
        names.extend(["velocity", "samples"]);
        let avail = ui.available_size();
        let lay = layout(avail, names.len());
        let size = lay.square;

        let mut frame = PanelFrame {
            actions,
            rects: Vec::new(),
            hover: None,
            drag: None,
            width: size,
        };
        let mut curve_actions = Vec::new();
        ui.horizontal_top(|ui| {
            ui.vertical(|ui| {
                for row in names.chunks(lay.cols) {
                    ui.horizontal_top(|ui| {
                        for &name in row {
                            self.panel_ui(
                                ui,
                                &mut frame,
                                name,
                                size,
                                range,
                                &target,
                                &latents,
                                analysis.as_deref(),
                                &tex,
                            );
                        }
                    });
                }
            });
            ui.vertical(|ui| {
                self.curves_ui(
                    ui,
                    egui::vec2(lay.curves_width, avail.y),
                    &mut curve_actions,
                )
            });
        });
        let PanelFrame {
            rects, hover, drag, ..
        } = frame;
        actions.extend(curve_actions);
        self.textures = textures;
        self.panel_rects = rects;
        self.hover = hover.or(self.hover);
        if let Some(p) = drag {
            self.add_drawn_points(p);
            ctx.request_repaint();
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn panel_ui<'t>(
        &self,
        ui: &mut Ui,
        frame: &mut PanelFrame,
        name: &'static str,
        size: f32,
        range: Range2,
        target: &[Point],
        latents: &[Point],
        analysis: Option<&super::app::Analysis>,
        tex: &dyn Fn(&str) -> Option<&'t HeatTexture>,
    ) {
        let drawing = self.drawing;
        let idle = self.state.stage == Stage::Idle;
        let square = egui::vec2(size, size);
        let exportable = |ready: bool| ready.then_some(name);
        match name {
            "nll" => {
                let title = if drawing {
                    "(a) draw the target: drag here".to_string()
                } else if self.state.target_name.is_empty() {
                    "(a) NLL of the target".to_string()
                } else {
                    format!("(a) NLL of {}, samples, y (red)", self.state.target_name)
                };
                let ready = self.state.target_map.is_some() && !drawing;
                frame.panel(ui, name, &title, exportable(ready), |ui| {
                    if !drawing && target.is_empty() && self.state.target_map.is_none() {
                        let text = if self.settings.cfg.points.is_some() {
                            "draw at least 2 points (tick \"draw on panel (a)\") or load a CSV"
                        } else {
                            "computing the target's NLL"
                        };
                        return panels::placeholder(ui, square, text, |_| {});
                    }
                    let overlays = [
                        Overlay {
                            name: if drawing { "your points" } else { "target" },
                            points: target,
                            colour: TARGET_COLOUR,
                            radius: 1.0,
                        },
                        Overlay {
                            name: "y",
                            points: latents,
                            colour: LATENT_COLOUR,
                            radius: 1.8,
                        },
                    ];
                    let heat = if drawing { None } else { tex("nll") };
                    let badge = self.state.shown_latents().map(|(step, _)| Badge {
                        text: format!("y at step {}", count(*step)),
                        colour: Color32::LIGHT_GRAY,
                    });
                    panels::heatmap_plot(
                        ui,
                        "nll",
                        heat,
                        &overlays,
                        range,
                        size,
                        drawing,
                        badge.as_ref(),
                    )
                });
            }
            "align" | "prior_nll" | "bound" => {
                let (kind, title, stamp) = match name {
                    "align" => (
                        MapKind::Align,
                        "(b) L_align of the prior",
                        analysis.and_then(|a| a.align.as_ref()),
                    ),
                    "prior_nll" => (
                        MapKind::PriorNll,
                        "(c) the prior's exact NLL (ODE)",
                        analysis.and_then(|a| a.prior_nll.as_ref()),
                    ),
                    _ => (
                        MapKind::Bound,
                        if self.settings.view.prior_nll {
                            "(d) -(C - L_align), the paper's 'bound'"
                        } else {
                            "(c) -(C - L_align), the paper's 'bound'"
                        },
                        analysis.and_then(|a| a.neg_bound.as_ref()),
                    ),
                };
                let badge = self.badge(kind, stamp.map(|m| m.prior_step));
                let mut start = false;
                frame.panel(ui, name, title, exportable(stamp.is_some()), |ui| {
                    match (tex(name), stamp) {
                        (Some(t), Some(_)) => panels::heatmap_plot(
                            ui,
                            name,
                            Some(t),
                            &[],
                            range,
                            size,
                            false,
                            badge.as_ref(),
                        ),
                        _ if idle && name == "align" => start_prompt(ui, square, &mut start),
                        _ if idle => panels::placeholder(
                            ui,
                            square,
                            "this map of the prior appears after Start",
                            |_| {},
                        ),
                        _ => {
                            let text = match &badge {
                                Some(b) => format!("computing this map ({})", b.text),
                                None => "computing this map".into(),
                            };
                            panels::placeholder(ui, square, &text, |_| {})
                        }
                    }
                });
                if start {
                    frame.actions.push(Action::Start);
                }
            }
            "velocity" => {
                let stamp = analysis.and_then(|a| a.velocity.as_ref());
                let title = match stamp {
                    Some(v) => format!("velocity field at t = {:.2}", v.value.t),
                    None => "velocity field".into(),
                };
                let badge = self.badge(MapKind::Velocity, stamp.map(|m| m.prior_step));
                frame.panel(
                    ui,
                    name,
                    &title,
                    exportable(stamp.is_some()),
                    |ui| match stamp {
                        Some(v) => panels::velocity_plot(
                            ui,
                            &v.value.arrows,
                            v.value.t,
                            range,
                            self.settings.view.velocity_grid,
                            size,
                            badge.as_ref(),
                        ),
                        None => panels::placeholder(
                            ui,
                            square,
                            if idle {
                                "the prior's velocity field appears here after Start"
                            } else {
                                "computing the velocity field"
                            },
                            |_| {},
                        ),
                    },
                );
            }
            _ => {
                let stamp = analysis.and_then(|a| a.samples.as_ref());
                let badge = self.badge(MapKind::Samples, stamp.map(|m| m.prior_step));
                frame.panel(
                    ui,
                    name,
                    "ODE samples and paths of the prior",
                    exportable(stamp.is_some()),
                    |ui| match stamp {
                        Some(s) => panels::samples_plot(
                            ui,
                            target,
                            &s.value.samples,
                            &s.value.paths,
                            range,
                            size,
                            badge.as_ref(),
                        ),
                        None => panels::placeholder(
                            ui,
                            square,
                            if idle {
                                "samples of the prior appear here after Start"
                            } else {
                                "computing samples of the prior"
                            },
                            |_| {},
                        ),
                    },
                );
            }
        }
    }

    fn curves_ui(&mut self, ui: &mut Ui, space: Vec2, actions: &mut Vec<Action>) {
        let style = self.settings.curves;
        let w = space.x;
        // Two plots share what the titles and the scrubbers leave.
        let h = ((space.y - 2.0 * (TITLE_HEIGHT + 4.0) - 3.0 * 26.0 - 12.0) / 2.0).max(60.0);
        let plot = egui::vec2(w, h);
        let s = &mut self.state;
        ui.horizontal(|ui| {
            ui.set_width(w);
            ui.label(RichText::new("prior loss").strong());
            ui.with_layout(egui::Layout::right_to_left(egui::Align::Center), |ui| {
                if ui
                    .add_enabled(!s.curves.prior.is_empty(), egui::Button::new("PNG").small())
                    .on_hover_text("save both curves as a figure")
                    .clicked()
                {
                    actions.push(Action::ExportFigure("curves"));
                }
            });
        });
        if s.curves.prior.is_empty() {
            let text = if s.stage == Stage::Idle {
                "the prior's flow-matching loss appears here after Start"
            } else {
                "no prior steps in this session"
            };
            panels::placeholder(ui, plot, text, |_| {});
        } else {
            let prior: Vec<[f64; 2]> = s
                .curves
                .prior
                .iter()
                .map(|p| [p.0 as f64, f64::from(p.1)])
                .collect();
            panels::prior_curve_plot(ui, &prior, style, plot);
        }
        ui.label(RichText::new("L_align (left) and NLL of y (right)").strong());
        if s.curves.align.is_empty() {
            panels::placeholder(
                ui,
                plot,
                "L_align and the NLL of the latents appear here once alignment starts",
                |_| {},
            );
        } else {
            let marker = s
                .replay_index
                .and_then(|i| s.history.steps.get(i))
                .map(|(step, _)| *step as f64);
            let pairs = |v: &[(usize, f32)]| -> Vec<[f64; 2]> {
                v.iter().map(|p| [p.0 as f64, f64::from(p.1)]).collect()
            };
            panels::align_curve_plot(
                ui,
                &pairs(&s.curves.align),
                &pairs(&s.curves.nll),
                style,
                plot,
                marker,
            );
        }
        // The time scrubber over the recorded latents and the prior's checkpoints.
        let n = s.history.steps.len();
        ui.horizontal(|ui| {
            ui.set_width(w);
            let play = if s.replay_playing { "Stop" } else { "Play" };
            if ui.add_enabled(n > 1, egui::Button::new(play)).clicked() {
                s.replay_playing = !s.replay_playing;
                if s.replay_playing && s.replay_index.is_none() {
                    s.replay_index = Some(0);
                }
            }
            let mut idx = s.replay_index.unwrap_or(n.saturating_sub(1));
            let step = s.history.steps.get(idx).map_or(0, |h| h.0);
            if ui
                .add_enabled(
                    n > 1,
                    egui::Slider::new(&mut idx, 0..=n.saturating_sub(1))
                        .show_value(false)
                        .text(format!("y at step {step}")),
                )
                .changed()
            {
                s.replay_index = (idx + 1 < n).then_some(idx);
                s.replay_playing = false;
            }
            if s.replay_index.is_some() && ui.small_button("live").clicked() {
                s.replay_index = None;
            }
        });
        let m = s.analyses.len();
        ui.horizontal(|ui| {
            ui.set_width(w);
            let mut idx = s.checkpoint.unwrap_or(m.saturating_sub(1));
            let step = s
                .analyses
                .get(idx)
                .and_then(|a| a.prior_step())
                .unwrap_or(0);
            if ui
                .add_enabled(
                    m > 1,
                    egui::Slider::new(&mut idx, 0..=m.saturating_sub(1))
                        .show_value(false)
                        .text(format!("prior at step {step}")),
                )
                .changed()
            {
                s.checkpoint = (idx + 1 < m).then_some(idx);
            }
            if s.checkpoint.is_some() && ui.small_button("latest").clicked() {
                s.checkpoint = None;
            }
        });
        if ui.small_button("curves CSV").clicked() {
            actions.push(Action::ExportCurves);
        }
    }
}

/// The Start prompt where the prior's landscapes will appear; sets `clicked` when pressed.
fn start_prompt(ui: &mut Ui, size: Vec2, clicked: &mut bool) -> PanelResponse {
    panels::placeholder(
        ui,
        size,
        "The prior's L_align landscape appears here once it trains.",
        |ui| {
            ui.add_space(8.0);
            *clicked = ui
                .add(egui::Button::new(RichText::new("Start (space)").heading()))
                .on_hover_text("train the prior, then align the latents")
                .clicked();
        },
    )
}

/// One labelled row of a settings grid (the label names the widget for screen readers and tests).
fn field(ui: &mut Ui, label: &str, widget: impl egui::Widget) {
    let l = ui.label(label);
    ui.add(widget).labelled_by(l.id);
    ui.end_row();
}

/// Collects what the 2D panels report while they are drawn.
struct PanelFrame<'a> {
    actions: &'a mut Vec<Action>,
    rects: Vec<(&'static str, egui::Rect)>,
    hover: Option<[f64; 2]>,
    drag: Option<[f64; 2]>,
    /// The panels' width.
    width: f32,
}

impl PanelFrame<'_> {
    /// A titled panel with a PNG button (a figure of the panel) when `export` names it.
    fn panel(
        &mut self,
        ui: &mut Ui,
        name: &'static str,
        title: &str,
        export: Option<&'static str>,
        body: impl FnOnce(&mut Ui) -> PanelResponse,
    ) {
        let width = self.width;
        ui.vertical(|ui| {
            ui.allocate_ui_with_layout(
                egui::vec2(width, TITLE_HEIGHT),
                egui::Layout::right_to_left(egui::Align::Center),
                |ui| {
                    if let Some(panel) = export
                        && ui
                            .small_button("PNG")
                            .on_hover_text("save this panel as a figure (title, axes, colour bar)")
                            .clicked()
                    {
                        self.actions.push(Action::ExportFigure(panel));
                    }
                    ui.with_layout(egui::Layout::left_to_right(egui::Align::Center), |ui| {
                        ui.add(egui::Label::new(RichText::new(title).strong()).truncate());
                    });
                },
            );
            let r = body(ui);
            self.hover = r.hover.or(self.hover);
            self.drag = r.drag.or(self.drag);
            self.rects.push((name, r.rect));
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_layout_fits_the_window_and_grows_the_squares() {
        // The default window's central area and the 1000 x 700 one, with 4 and 6 panels.
        for avail in [egui::vec2(1180.0, 860.0), egui::vec2(690.0, 600.0)] {
            for n in [4, 5, 6] {
                let l = layout(avail, n);
                let rows = n.div_ceil(l.cols) as f32;
                let width =
                    l.cols as f32 * l.square + (l.cols - 1) as f32 * GAP + GAP + l.curves_width;
                let height = rows * (l.square + TITLE_HEIGHT + GAP);
                assert!(
                    width <= avail.x + 0.5,
                    "{avail:?} {n}: {l:?} is {width} wide"
                );
                assert!(
                    height <= avail.y + 0.5,
                    "{avail:?} {n}: {l:?} is {height} high"
                );
            }
        }
        // At the default size two maps, the velocity field and the samples make a 2 x 2 grid of
        // squares larger than the old fixed 260 points.
        let l = layout(egui::vec2(1180.0, 860.0), 4);
        assert_eq!(l.cols, 2);
        assert!(l.square > 380.0, "{l:?}");
    }
}
