//! Plots drawn with `plotters`, as SVG strings (for inlining in HTML reports) or PNG files.
//!
//! * [`LinePlot`]: curves such as loss vs step, or accuracy vs shots with error bars
//!   (± one standard deviation, drawn as whiskers).
//! * [`confusion_matrix_plot`]: heatmap of a [`ConfusionMatrix`], rows = true class (top to
//!   bottom), columns = predicted class, with counts (or row fractions) written in each cell.
//! * [`reliability_plot`]: reliability diagram (accuracy per confidence bin against the
//!   diagonal of perfect calibration; Guo et al. 2017, Fig. 1) with the ECE in the title.
//!
//! Text is rendered with the embedded DejaVu Sans Mono font (Bitstream Vera licence, see
//! `assets/DejaVu-LICENSE.txt`), so PNG output does not depend on system fonts. PNG files are
//! written atomically (temporary file in the same directory, then rename).

use std::path::Path;
use std::sync::OnceLock;

use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use plotters::style::FontStyle;

use crate::calibration::ReliabilityDiagram;
use crate::classification::ConfusionMatrix;
use crate::error::{EvalError, Result};

static FONT: &[u8] = include_bytes!("../assets/DejaVuSansMono.ttf");
const FONT_NAME: &str = "sans-serif";

fn ensure_font() -> Result<()> {
    static REGISTERED: OnceLock<std::result::Result<(), String>> = OnceLock::new();
    REGISTERED
        .get_or_init(|| {
            plotters::style::register_font(FONT_NAME, FontStyle::Normal, FONT)
                .map_err(|_| "embedded font could not be parsed".to_string())
        })
        .clone()
        .map_err(EvalError::Plot)
}

fn plot_err<E: std::fmt::Debug>(e: E) -> EvalError {
    EvalError::Plot(format!("{e:?}"))
}

/// Output size in pixels (default 720 x 480).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Size {
    /// Width.
    pub width: u32,
    /// Height.
    pub height: u32,
}

impl Default for Size {
    fn default() -> Self {
        Self {
            width: 720,
            height: 480,
        }
    }
}

/// Something that can be drawn onto any plotters backend.
pub trait Plot {
    /// Draws onto `area`.
    fn draw<DB: DrawingBackend>(&self, area: &DrawingArea<DB, Shift>) -> Result<()>;

    /// Renders to an SVG document string.
    fn to_svg(&self, size: Size) -> Result<String> {
        ensure_font()?;
        let mut out = String::new();
        {
            let area =
                SVGBackend::with_string(&mut out, (size.width, size.height)).into_drawing_area();
            area.fill(&WHITE).map_err(plot_err)?;
            self.draw(&area)?;
            area.present().map_err(plot_err)?;
        }
        Ok(out)
    }

    /// Renders to a PNG file, atomically.
    fn write_png(&self, path: &Path, size: Size) -> Result<()> {
        ensure_font()?;
        // medvlm-io's writer names the temporary `.NAME.tmp-PID.png`, so plotters still
        // encodes PNG; a drawing error is carried through and restored.
        let mut drawing_error = None;
        let written = medvlm_io::atomic::write_atomic_via(path, |tmp| {
            let area = BitMapBackend::new(tmp, (size.width, size.height)).into_drawing_area();
            let drawn = area
                .fill(&WHITE)
                .map_err(plot_err)
                .and_then(|()| self.draw(&area))
                .and_then(|()| area.present().map_err(plot_err));
            drawn.map_err(|e| {
                let msg = e.to_string();
                drawing_error = Some(e);
                std::io::Error::other(msg)
            })
        });
        match (written, drawing_error) {
            (Ok(()), _) => Ok(()),
            (Err(_), Some(e)) => Err(e),
            (Err(e), None) => Err(EvalError::Io {
                path: path.to_path_buf(),
                source: e.into_io(),
            }),
        }
    }

    /// Writes an SVG file atomically.
    fn write_svg(&self, path: &Path, size: Size) -> Result<()> {
        let svg = self.to_svg(size)?;
        crate::report::write_atomic(path, svg.as_bytes())
    }
}

/// One curve of a [`LinePlot`].
#[derive(Debug, Clone, PartialEq)]
pub struct Series {
    /// Legend label (empty: no legend entry).
    pub label: String,
    /// `(x, y)` points, drawn in order.
    pub points: Vec<(f64, f64)>,
    /// Optional ± error per point (e.g. standard deviation over seeds).
    pub errors: Option<Vec<f64>>,
}

impl Series {
    /// A curve without error bars.
    pub fn new(label: impl Into<String>, points: Vec<(f64, f64)>) -> Self {
        Self {
            label: label.into(),
            points,
            errors: None,
        }
    }

    /// Adds ± error bars (one value per point).
    pub fn with_errors(mut self, errors: Vec<f64>) -> Self {
        self.errors = Some(errors);
        self
    }
}

/// Line chart of one or more series.
#[derive(Debug, Clone, PartialEq)]
pub struct LinePlot {
    /// Title.
    pub title: String,
    /// X-axis label.
    pub x_label: String,
    /// Y-axis label.
    pub y_label: String,
    /// Curves.
    pub series: Vec<Series>,
}

impl LinePlot {
    /// An empty plot.
    pub fn new(
        title: impl Into<String>,
        x_label: impl Into<String>,
        y_label: impl Into<String>,
    ) -> Self {
        Self {
            title: title.into(),
            x_label: x_label.into(),
            y_label: y_label.into(),
            series: Vec::new(),
        }
    }

    /// Adds a series.
    pub fn series(mut self, s: Series) -> Self {
        self.series.push(s);
        self
    }

    fn ranges(&self) -> Result<((f64, f64), (f64, f64))> {
        let mut xs = (f64::INFINITY, f64::NEG_INFINITY);
        let mut ys = (f64::INFINITY, f64::NEG_INFINITY);
        for s in &self.series {
            if let Some(e) = &s.errors {
                if e.len() != s.points.len() {
                    return Err(EvalError::LengthMismatch {
                        what: "series errors",
                        got: e.len(),
                        expected: s.points.len(),
                    });
                }
            }
            for (i, &(x, y)) in s.points.iter().enumerate() {
                let e = s.errors.as_ref().map_or(0.0, |e| e[i].abs());
                if !(x.is_finite() && y.is_finite() && e.is_finite()) {
                    return Err(EvalError::InvalidParameter {
                        name: "series",
                        reason: format!("series {:?} has a non-finite point {i}", s.label),
                    });
                }
                xs = (xs.0.min(x), xs.1.max(x));
                ys = (ys.0.min(y - e), ys.1.max(y + e));
            }
        }
        if !xs.0.is_finite() {
            return Err(EvalError::Empty("line plot has no points"));
        }
        let pad = |(lo, hi): (f64, f64)| {
            let span = if hi > lo { hi - lo } else { lo.abs().max(1.0) };
            (lo - 0.05 * span, hi + 0.05 * span)
        };
        Ok((pad(xs), pad(ys)))
    }
}

impl Plot for LinePlot {
    fn draw<DB: DrawingBackend>(&self, area: &DrawingArea<DB, Shift>) -> Result<()> {
        let ((x0, x1), (y0, y1)) = self.ranges()?;
        let mut chart = ChartBuilder::on(area)
            .caption(&self.title, (FONT_NAME, 20))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(60)
            .build_cartesian_2d(x0..x1, y0..y1)
            .map_err(plot_err)?;
        chart
            .configure_mesh()
            .x_desc(&self.x_label)
            .y_desc(&self.y_label)
            .label_style((FONT_NAME, 13))
            .axis_desc_style((FONT_NAME, 14))
            .draw()
            .map_err(plot_err)?;
        let mut legend = false;
        for (k, s) in self.series.iter().enumerate() {
            let color = Palette99::pick(k).to_rgba();
            let drawn = chart
                .draw_series(LineSeries::new(
                    s.points.iter().copied(),
                    color.stroke_width(2),
                ))
                .map_err(plot_err)?;
            if !s.label.is_empty() {
                legend = true;
                drawn.label(s.label.clone()).legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2))
                });
            }
            if s.points.len() <= 64 {
                chart
                    .draw_series(s.points.iter().map(|&p| Circle::new(p, 3, color.filled())))
                    .map_err(plot_err)?;
            }
            if let Some(errors) = &s.errors {
                let cap = 0.01 * (x1 - x0);
                for (&(x, y), &e) in s.points.iter().zip(errors) {
                    let e = e.abs();
                    let lines = [
                        vec![(x, y - e), (x, y + e)],
                        vec![(x - cap, y - e), (x + cap, y - e)],
                        vec![(x - cap, y + e), (x + cap, y + e)],
                    ];
                    chart
                        .draw_series(
                            lines
                                .into_iter()
                                .map(|l| PathElement::new(l, color.stroke_width(1))),
                        )
                        .map_err(plot_err)?;
                }
            }
        }
        if legend {
            chart
                .configure_series_labels()
                .label_font((FONT_NAME, 13))
                .background_style(WHITE.mix(0.8))
                .border_style(BLACK)
                .draw()
                .map_err(plot_err)?;
        }
        Ok(())
    }
}

/// Heatmap of a confusion matrix; see [`confusion_matrix_plot`].
#[derive(Debug, Clone, PartialEq)]
pub struct ConfusionPlot {
    /// Title.
    pub title: String,
    /// Class names, one per class.
    pub class_names: Vec<String>,
    /// Raw counts.
    pub counts: Vec<Vec<u64>>,
    /// Colour and annotate by row fraction instead of count.
    pub normalise: bool,
}

/// Builds a confusion-matrix heatmap. `class_names` must have one entry per class.
pub fn confusion_matrix_plot(
    title: impl Into<String>,
    cm: &ConfusionMatrix,
    class_names: &[String],
    normalise: bool,
) -> Result<ConfusionPlot> {
    if class_names.len() != cm.num_classes {
        return Err(EvalError::LengthMismatch {
            what: "class_names",
            got: class_names.len(),
            expected: cm.num_classes,
        });
    }
    Ok(ConfusionPlot {
        title: title.into(),
        class_names: class_names.to_vec(),
        counts: cm.counts.clone(),
        normalise,
    })
}

impl Plot for ConfusionPlot {
    // Cells are addressed by (true, predicted) index into two parallel matrices.
    #[allow(clippy::needless_range_loop)]
    fn draw<DB: DrawingBackend>(&self, area: &DrawingArea<DB, Shift>) -> Result<()> {
        let n = self.class_names.len();
        if n == 0 {
            return Err(EvalError::Empty("confusion matrix has no classes"));
        }
        let cm = ConfusionMatrix {
            num_classes: n,
            counts: self.counts.clone(),
        };
        let fractions = cm.row_normalised();
        let max_count = self
            .counts
            .iter()
            .flatten()
            .copied()
            .max()
            .unwrap_or(0)
            .max(1) as f64;
        let size = n as f64;
        let mut chart = ChartBuilder::on(area)
            .caption(&self.title, (FONT_NAME, 20))
            .margin(12)
            .x_label_area_size(50)
            .y_label_area_size(100)
            .build_cartesian_2d(0f64..size, 0f64..size)
            .map_err(plot_err)?;
        chart
            .configure_mesh()
            .disable_mesh()
            .x_labels(0)
            .y_labels(0)
            .x_desc("predicted")
            .y_desc("true")
            .axis_desc_style((FONT_NAME, 14))
            .draw()
            .map_err(plot_err)?;
        let centred = (FONT_NAME, 13)
            .into_font()
            .into_text_style(area)
            .pos(Pos::new(HPos::Center, VPos::Center));
        for t in 0..n {
            // Row 0 (first true class) at the top.
            let y = (n - 1 - t) as f64;
            for p in 0..n {
                let x = p as f64;
                let value = if self.normalise {
                    fractions[t][p]
                } else {
                    self.counts[t][p] as f64 / max_count
                };
                let shade = (255.0 * (1.0 - 0.85 * value)).round() as u8;
                chart
                    .draw_series(std::iter::once(Rectangle::new(
                        [(x, y), (x + 1.0, y + 1.0)],
                        RGBColor(shade, shade, 255).filled(),
                    )))
                    .map_err(plot_err)?;
                let label = if self.normalise {
                    format!("{:.2}", fractions[t][p])
                } else {
                    self.counts[t][p].to_string()
                };
                let color = if value > 0.6 { WHITE } else { BLACK };
                chart
                    .draw_series(std::iter::once(Text::new(
                        label,
                        (x + 0.5, y + 0.5),
                        centred.clone().color(&color),
                    )))
                    .map_err(plot_err)?;
            }
        }
        // Class names next to the axes, in pixels relative to `area`.
        let (bx, by) = area.get_base_pixel();
        let below = (FONT_NAME, 12)
            .into_font()
            .into_text_style(area)
            .pos(Pos::new(HPos::Center, VPos::Top));
        let left = (FONT_NAME, 12)
            .into_font()
            .into_text_style(area)
            .pos(Pos::new(HPos::Right, VPos::Center));
        for (i, name) in self.class_names.iter().enumerate() {
            let (px, py) = chart.backend_coord(&(i as f64 + 0.5, 0.0));
            area.draw(&Text::new(
                name.clone(),
                (px - bx, py - by + 6),
                below.clone(),
            ))
            .map_err(plot_err)?;
            let (px, py) = chart.backend_coord(&(0.0, (n - 1 - i) as f64 + 0.5));
            area.draw(&Text::new(
                name.clone(),
                (px - bx - 6, py - by),
                left.clone(),
            ))
            .map_err(plot_err)?;
        }
        Ok(())
    }
}

/// Reliability diagram; see [`reliability_plot`].
#[derive(Debug, Clone, PartialEq)]
pub struct ReliabilityPlot {
    /// Title (the ECE is appended).
    pub title: String,
    /// The binned data.
    pub diagram: ReliabilityDiagram,
}

/// Builds a reliability-diagram plot from [`ReliabilityDiagram`] data.
pub fn reliability_plot(title: impl Into<String>, diagram: &ReliabilityDiagram) -> ReliabilityPlot {
    ReliabilityPlot {
        title: title.into(),
        diagram: diagram.clone(),
    }
}

impl Plot for ReliabilityPlot {
    fn draw<DB: DrawingBackend>(&self, area: &DrawingArea<DB, Shift>) -> Result<()> {
        let caption = format!("{} (ECE = {:.3})", self.title, self.diagram.ece);
        let mut chart = ChartBuilder::on(area)
            .caption(caption, (FONT_NAME, 20))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(50)
            .build_cartesian_2d(0f64..1f64, 0f64..1f64)
            .map_err(plot_err)?;
        chart
            .configure_mesh()
            .x_desc("confidence")
            .y_desc("accuracy")
            .label_style((FONT_NAME, 13))
            .axis_desc_style((FONT_NAME, 14))
            .draw()
            .map_err(plot_err)?;
        let bar = RGBColor(70, 110, 200);
        let gap = RGBColor(220, 80, 80);
        for b in self.diagram.bins.iter().filter(|b| b.count > 0) {
            chart
                .draw_series(std::iter::once(Rectangle::new(
                    [(b.lower, 0.0), (b.upper, b.accuracy)],
                    bar.mix(0.8).filled(),
                )))
                .map_err(plot_err)?;
            let (lo, hi) = if b.accuracy < b.mean_confidence {
                (b.accuracy, b.mean_confidence)
            } else {
                (b.mean_confidence, b.accuracy)
            };
            chart
                .draw_series(std::iter::once(Rectangle::new(
                    [(b.lower, lo), (b.upper, hi)],
                    gap.mix(0.35).filled(),
                )))
                .map_err(plot_err)?;
        }
        chart
            .draw_series(std::iter::once(PathElement::new(
                vec![(0.0, 0.0), (1.0, 1.0)],
                BLACK.stroke_width(1),
            )))
            .map_err(plot_err)?
            .label("perfect calibration")
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], BLACK));
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperLeft)
            .label_font((FONT_NAME, 13))
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()
            .map_err(plot_err)?;
        Ok(())
    }
}
