//! A small, dependency-free HTML report builder. Every text is HTML-escaped; SVG plots from
//! [`crate::plots`] are inlined, so the report is a single self-contained file.
//!
//! ```no_run
//! # use medvlm_eval::report::Report;
//! Report::new("Quickstart")
//!     .section("Training")
//!     .paragraph("Loss decreased from 2.1 to 0.4.")
//!     .metrics_table(&[("accuracy", 0.91), ("macro-F1", 0.88)])
//!     .write_atomic(std::path::Path::new("report.html"))
//!     .unwrap();
//! ```

use std::path::Path;

use crate::error::{EvalError, Result};

/// Escapes `&`, `<`, `>`, `"` and `'` for use in HTML text and attribute values.
pub fn escape_html(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// Writes `bytes` to `path` atomically (medvlm-io's writer: temporary file in the same
/// directory, fsync, rename, fsync of the directory).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    medvlm_io::atomic::write_atomic(path, bytes).map_err(|e| EvalError::Io {
        path: path.to_path_buf(),
        source: e.into_io(),
    })
}

#[derive(Debug, Clone)]
enum Block {
    Section(String),
    Paragraph(String),
    Table {
        headers: Vec<String>,
        rows: Vec<Vec<String>>,
    },
    Svg {
        svg: String,
        caption: String,
    },
    Preformatted(String),
    Gallery(Vec<(String, String)>),
}

const PNG_SIGNATURE: &[u8] = b"\x89PNG\r\n\x1a\n";

fn png_data_uri(png: &[u8]) -> Result<String> {
    use base64::Engine;
    if !png.starts_with(PNG_SIGNATURE) {
        return Err(EvalError::InvalidParameter {
            name: "png",
            reason: "bytes are not a PNG image (missing PNG signature)".into(),
        });
    }
    Ok(format!(
        "data:image/png;base64,{}",
        base64::engine::general_purpose::STANDARD.encode(png)
    ))
}

/// An HTML report under construction.
#[derive(Debug, Clone)]
pub struct Report {
    title: String,
    blocks: Vec<Block>,
}

impl Report {
    /// A report with a title.
    pub fn new(title: impl Into<String>) -> Self {
        Self {
            title: title.into(),
            blocks: Vec::new(),
        }
    }

    /// Starts a section with a heading.
    pub fn section(mut self, heading: impl Into<String>) -> Self {
        self.blocks.push(Block::Section(heading.into()));
        self
    }

    /// A paragraph of text.
    pub fn paragraph(mut self, text: impl Into<String>) -> Self {
        self.blocks.push(Block::Paragraph(text.into()));
        self
    }

    /// A two-column table of named metric values (4 significant decimals).
    pub fn metrics_table(mut self, metrics: &[(&str, f64)]) -> Self {
        self.blocks.push(Block::Table {
            headers: vec!["metric".into(), "value".into()],
            rows: metrics
                .iter()
                .map(|(k, v)| vec![k.to_string(), format!("{v:.4}")])
                .collect(),
        });
        self
    }

    /// A table with arbitrary headers and string cells.
    pub fn table(mut self, headers: &[&str], rows: Vec<Vec<String>>) -> Self {
        self.blocks.push(Block::Table {
            headers: headers.iter().map(|s| s.to_string()).collect(),
            rows,
        });
        self
    }

    /// An inline SVG figure (a document produced by [`crate::plots::Plot::to_svg`]; the XML
    /// declaration, if any, is dropped) with a caption.
    pub fn image_svg(mut self, svg: impl Into<String>, caption: impl Into<String>) -> Self {
        self.blocks.push(Block::Svg {
            svg: svg.into(),
            caption: caption.into(),
        });
        self
    }

    /// An inline PNG image (embedded as a base64 data URI) with a caption; errors if the bytes
    /// are not a PNG.
    pub fn image_png(self, png: &[u8], caption: impl Into<String>) -> Result<Self> {
        self.gallery(&[(png, caption.into())])
    }

    /// A row of small PNG images with captions, e.g. retrieval examples (query and its top
    /// matches); errors if any item is not a PNG.
    pub fn gallery(mut self, items: &[(&[u8], String)]) -> Result<Self> {
        let mut out = Vec::with_capacity(items.len());
        for (png, caption) in items {
            out.push((png_data_uri(png)?, caption.clone()));
        }
        self.blocks.push(Block::Gallery(out));
        Ok(self)
    }

    /// Preformatted text (e.g. a Markdown table or a JSON snippet).
    pub fn preformatted(mut self, text: impl Into<String>) -> Self {
        self.blocks.push(Block::Preformatted(text.into()));
        self
    }

    /// Renders the whole document.
    pub fn to_html(&self) -> String {
        let mut h = String::new();
        h.push_str("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n");
        h.push_str(&format!("<title>{}</title>\n", escape_html(&self.title)));
        h.push_str(
            "<style>body{font-family:sans-serif;max-width:1000px;margin:2em auto;padding:0 1em;color:#222}\
table{border-collapse:collapse;margin:1em 0}th,td{border:1px solid #bbb;padding:4px 10px;text-align:left}\
th{background:#eee}figure{margin:1em 0}figcaption{color:#555;font-size:90%}pre{background:#f6f6f6;padding:1em;overflow-x:auto}\
.gallery{display:flex;flex-wrap:wrap;gap:12px}.gallery figure{margin:0;max-width:180px}.gallery img{max-width:180px;image-rendering:pixelated}</style>\n",
        );
        h.push_str("</head>\n<body>\n");
        h.push_str(&format!("<h1>{}</h1>\n", escape_html(&self.title)));
        for b in &self.blocks {
            match b {
                Block::Section(s) => h.push_str(&format!("<h2>{}</h2>\n", escape_html(s))),
                Block::Paragraph(p) => h.push_str(&format!("<p>{}</p>\n", escape_html(p))),
                Block::Table { headers, rows } => {
                    h.push_str("<table>\n<tr>");
                    for c in headers {
                        h.push_str(&format!("<th>{}</th>", escape_html(c)));
                    }
                    h.push_str("</tr>\n");
                    for r in rows {
                        h.push_str("<tr>");
                        for c in r {
                            h.push_str(&format!("<td>{}</td>", escape_html(c)));
                        }
                        h.push_str("</tr>\n");
                    }
                    h.push_str("</table>\n");
                }
                Block::Svg { svg, caption } => {
                    let body = match svg.find("<svg") {
                        Some(i) => &svg[i..],
                        None => svg.as_str(),
                    };
                    h.push_str("<figure>\n");
                    h.push_str(body);
                    h.push_str(&format!(
                        "\n<figcaption>{}</figcaption>\n</figure>\n",
                        escape_html(caption)
                    ));
                }
                Block::Preformatted(t) => h.push_str(&format!("<pre>{}</pre>\n", escape_html(t))),
                Block::Gallery(items) => {
                    h.push_str("<div class=\"gallery\">\n");
                    for (uri, caption) in items {
                        h.push_str(&format!(
                            "<figure><img src=\"{uri}\" alt=\"{c}\"><figcaption>{c}</figcaption></figure>\n",
                            c = escape_html(caption)
                        ));
                    }
                    h.push_str("</div>\n");
                }
            }
        }
        h.push_str("</body>\n</html>\n");
        h
    }

    /// Writes the report to `path` atomically.
    pub fn write_atomic(&self, path: &Path) -> Result<()> {
        write_atomic(path, self.to_html().as_bytes())
    }
}
