//! Plots render to SVG and PNG with their text, and the HTML report escapes text and inlines
//! the SVG figures.

use medvlm_eval::calibration::reliability_from_confidences;
use medvlm_eval::classification::ConfusionMatrix;
use medvlm_eval::plots::{confusion_matrix_plot, reliability_plot, LinePlot, Plot, Series, Size};
use medvlm_eval::report::{escape_html, Report};
use medvlm_eval::EvalError;

/// Width and height from a PNG's IHDR chunk.
fn png_size(bytes: &[u8]) -> (u32, u32) {
    assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n", "PNG signature");
    assert_eq!(&bytes[12..16], b"IHDR");
    let w = u32::from_be_bytes(bytes[16..20].try_into().unwrap());
    let h = u32::from_be_bytes(bytes[20..24].try_into().unwrap());
    (w, h)
}

/// Trimmed contents of every `<text>` element of an SVG document.
fn svg_texts(svg: &str) -> Vec<String> {
    svg.split("<text")
        .skip(1)
        .filter_map(|chunk| {
            let start = chunk.find('>')? + 1;
            let end = chunk.find("</text>")?;
            Some(chunk[start..end].trim().to_string())
        })
        .collect()
}

fn has_text(svg: &str, text: &str) -> bool {
    svg_texts(svg).iter().any(|t| t == text)
}

fn loss_plot() -> LinePlot {
    LinePlot::new("Training loss", "step", "loss")
        .series(Series::new(
            "train",
            (0..50)
                .map(|i| (i as f64, 2.0 / (1.0 + i as f64 * 0.1)))
                .collect(),
        ))
        .series(Series::new(
            "val",
            vec![(0.0, 2.1), (25.0, 1.0), (49.0, 0.7)],
        ))
}

#[test]
fn line_plot_svg_and_png() {
    let svg = loss_plot().to_svg(Size::default()).unwrap();
    assert!(
        svg.starts_with("<svg") || svg.contains("<svg"),
        "{}",
        &svg[..100]
    );
    for text in ["Training loss", "step", "loss", "train", "val"] {
        assert!(
            has_text(&svg, text),
            "missing text {text}: {:?}",
            svg_texts(&svg)
        );
    }
    let dir = tempfile::tempdir().unwrap();
    let png = dir.path().join("loss.png");
    loss_plot()
        .write_png(
            &png,
            Size {
                width: 400,
                height: 300,
            },
        )
        .unwrap();
    let bytes = std::fs::read(&png).unwrap();
    assert_eq!(png_size(&bytes), (400, 300));
    // Only the final file remains (temporary file renamed).
    let names: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, vec![std::ffi::OsString::from("loss.png")]);
}

#[test]
fn error_bars_and_bad_series() {
    let plot = LinePlot::new("Few-shot", "shots", "accuracy").series(
        Series::new("linear probe", vec![(1.0, 0.5), (4.0, 0.7), (16.0, 0.85)])
            .with_errors(vec![0.05, 0.03, 0.01]),
    );
    let svg = plot.to_svg(Size::default()).unwrap();
    // One vertical whisker and two caps per point: 9 extra polylines beyond the curve.
    assert!(
        svg.matches("<polyline").count() >= 10,
        "{}",
        svg.matches("<polyline").count()
    );
    let bad =
        LinePlot::new("x", "x", "y").series(Series::new("s", vec![(0.0, 1.0)]).with_errors(vec![]));
    assert!(matches!(
        bad.to_svg(Size::default()),
        Err(EvalError::LengthMismatch { .. })
    ));
    let empty = LinePlot::new("x", "x", "y");
    assert!(empty.to_svg(Size::default()).is_err());
    let nan = LinePlot::new("x", "x", "y").series(Series::new("s", vec![(0.0, f64::NAN)]));
    assert!(nan.to_svg(Size::default()).is_err());
}

#[test]
fn confusion_heatmap_shows_names_and_counts() {
    let cm = ConfusionMatrix::new(&[0, 0, 1, 1, 1, 2], &[0, 1, 1, 1, 1, 0], 3).unwrap();
    let names = vec![
        "normal".to_string(),
        "nodule<3mm".to_string(),
        "mass".to_string(),
    ];
    let plot = confusion_matrix_plot("Confusion", &cm, &names, false).unwrap();
    let svg = plot
        .to_svg(Size {
            width: 500,
            height: 500,
        })
        .unwrap();
    assert!(
        has_text(&svg, "normal") && has_text(&svg, "mass"),
        "{:?}",
        svg_texts(&svg)
    );
    assert!(
        has_text(&svg, "nodule&lt;3mm"),
        "class names are escaped in SVG"
    );
    assert!(
        has_text(&svg, "3"),
        "the count 3 (class 1 predicted 1) is written"
    );
    let normalised = confusion_matrix_plot("Confusion", &cm, &names, true).unwrap();
    assert!(has_text(
        &normalised.to_svg(Size::default()).unwrap(),
        "0.50"
    ));
    assert!(confusion_matrix_plot("c", &cm, &names[..2], false).is_err());
    let dir = tempfile::tempdir().unwrap();
    plot.write_png(
        &dir.path().join("cm.png"),
        Size {
            width: 300,
            height: 300,
        },
    )
    .unwrap();
    assert_eq!(
        png_size(&std::fs::read(dir.path().join("cm.png")).unwrap()),
        (300, 300)
    );
}

#[test]
fn reliability_diagram_plot() {
    let d = reliability_from_confidences(&[0.2, 0.4, 0.6, 0.9], &[false, true, true, false], 2)
        .unwrap();
    let svg = reliability_plot("Calibration", &d)
        .to_svg(Size::default())
        .unwrap();
    assert!(
        has_text(&svg, "Calibration (ECE = 0.225)"),
        "ECE shown in the title"
    );
    assert!(has_text(&svg, "confidence") && has_text(&svg, "accuracy"));
    let dir = tempfile::tempdir().unwrap();
    reliability_plot("Calibration", &d)
        .write_svg(&dir.path().join("rel.svg"), Size::default())
        .unwrap();
    assert!(std::fs::read_to_string(dir.path().join("rel.svg"))
        .unwrap()
        .contains("ECE"));
}

#[test]
fn report_escapes_and_inlines() {
    assert_eq!(
        escape_html("<a href=\"x\">&'</a>"),
        "&lt;a href=&quot;x&quot;&gt;&amp;&#39;&lt;/a&gt;"
    );
    let svg = loss_plot().to_svg(Size::default()).unwrap();
    let report = Report::new("Run <1>")
        .section("Training & evaluation")
        .paragraph("loss < 1 after 10 steps")
        .metrics_table(&[("accuracy", 0.912345), ("macro-F1", 0.5)])
        .table(
            &["method", "K=1"],
            vec![vec!["<script>".into(), "50.0 ± 1.0".into()]],
        )
        .image_svg(format!("<?xml version=\"1.0\"?>\n{svg}"), "Loss curve")
        .preformatted("| a | b |");
    let html = report.to_html();
    assert!(html.contains("<title>Run &lt;1&gt;</title>"));
    assert!(html.contains("<h2>Training &amp; evaluation</h2>"));
    assert!(html.contains("<p>loss &lt; 1 after 10 steps</p>"));
    assert!(html.contains("<td>accuracy</td><td>0.9123</td>"));
    assert!(html.contains("<td>&lt;script&gt;</td>"));
    assert!(!html.contains("<script>"));
    assert!(
        !html.contains("<?xml"),
        "XML declaration dropped when inlining"
    );
    assert!(html.contains("<figcaption>Loss curve</figcaption>"));
    assert_eq!(html.matches("<svg").count(), 1);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("report.html");
    report.write_atomic(&path).unwrap();
    assert_eq!(std::fs::read_to_string(&path).unwrap(), html);
    assert_eq!(
        std::fs::read_dir(dir.path()).unwrap().count(),
        1,
        "no temporary file left"
    );
    let err = report
        .write_atomic(&dir.path().join("missing-dir/report.html"))
        .unwrap_err();
    assert!(err.to_string().contains("missing-dir"), "{err}");
}

#[test]
fn report_inlines_png_images() {
    let dir = tempfile::tempdir().unwrap();
    let png_path = dir.path().join("p.png");
    loss_plot()
        .write_png(
            &png_path,
            Size {
                width: 64,
                height: 48,
            },
        )
        .unwrap();
    let png = std::fs::read(&png_path).unwrap();
    let report = Report::new("r")
        .gallery(&[
            (&png[..], "query: \"nodule\"".to_string()),
            (&png[..], "top-1 <match>".to_string()),
        ])
        .unwrap();
    let html = report.to_html();
    assert_eq!(
        html.matches("<img src=\"data:image/png;base64,iVBORw0KGgo")
            .count(),
        2
    );
    assert!(html.contains("<figcaption>top-1 &lt;match&gt;</figcaption>"));
    assert!(html.contains("alt=\"query: &quot;nodule&quot;\""));
    let err = Report::new("r").image_png(b"GIF89a", "x").unwrap_err();
    assert!(err.to_string().contains("not a PNG"), "{err}");
}
