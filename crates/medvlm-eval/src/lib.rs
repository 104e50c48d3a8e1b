//! medvlm-eval: model-independent evaluation for medvlm.
//!
//! Metrics are plain Rust over `&[f32]` / `&[usize]` slices (row-major matrices where a matrix
//! is needed) and return serde-serialisable structs; plots are drawn with `plotters` (SVG and
//! PNG); [`report::Report`] assembles a self-contained HTML report.
//!
//! * [`classification`]: accuracy, balanced accuracy, macro-F1, confusion matrix.
//! * [`anomaly`]: pixel AUROC and AUPRO of anomaly maps (MVTec AD procedure).
//! * [`auroc`]: exact (Mann-Whitney) AUROC, one-vs-rest and multi-label.
//! * [`multilabel`]: macro/micro F1 at a threshold, average precision.
//! * [`calibration`]: expected calibration error and reliability diagrams.
//! * [`temperature`]: temperature scaling of multi-class probabilities (fit and apply).
//! * [`conformal`]: split-conformal APS and RAPS prediction sets.
//! * [`conformal_multilabel`]: conformal risk control of the false-negative rate of
//!   multi-label sets.
//! * [`retrieval`]: image-text recall@K.
//! * [`report_metrics`]: BLEU-1..4, ROUGE-L and CIDEr-D of generated reports, as pycocoevalcap
//!   computes them.
//! * [`report_labeller`]: a negation- and hedge-aware rule labeller of findings in reports,
//!   and finding-level clinical efficacy (precision, recall, F1; micro and macro).
//! * [`detection`]: COCO-style box AP (mAP@[.5:.95], @.5, @.75; macro and micro) as
//!   pycocotools computes it, and phrase-grounding Acc@0.5 / mIoU.
//! * [`segmentation`]: Dice, IoU, Hausdorff distance (HD, HD95) and average surface distance
//!   of 2-D binary masks (MONAI conventions), with per-label summaries.
//! * [`registration`]: end-point error, folding (non-positive Jacobian determinant) and Dice
//!   of warped masks for deformable registration, with the field algebra they need.
//! * [`image_quality`]: PSNR and SSIM with BasicSR's conventions (8-bit scale, border crop).
//! * [`generative`]: FID and KID of generated images on given features (medvlm computes
//!   them in the VLM's image-feature space), with a Jacobi symmetric eigendecomposition.
//! * [`fewshot_table`]: mean ± std tables over seeds.
//! * [`latency`]: nearest-rank percentiles (p50/p99) of measured times.
//! * [`plots`]: line plots, confusion-matrix heatmaps, reliability diagrams (SVG/PNG).
//! * [`report`]: self-contained HTML reports.
//! * [`evaluation`]: every metric of one test evaluation, multi-class ([`evaluation::evaluate`])
//!   or multi-label ([`evaluation::evaluate_multilabel`]), as `medvlm adapt` reports it.

//!
//! ```
//! use medvlm_eval::evaluation::evaluate;
//! use medvlm_eval::conformal::ConformalConfig;
//! // Softmax probabilities of 4 test images over 2 classes (row-major) and their labels.
//! let probs = [0.9, 0.1, 0.3, 0.7, 0.6, 0.4, 0.2, 0.8];
//! let labels = [0, 1, 1, 1];
//! let m = evaluate(&probs, &labels, 2, None, ConformalConfig::default()).unwrap();
//! assert_eq!(m.accuracy, 0.75); // image 3 is called class 0
//! assert_eq!(m.balanced_accuracy, (1.0 + 2.0 / 3.0) / 2.0);
//! assert_eq!(m.macro_auroc, Some(1.0)); // every class-1 image outscores the class-0 one
//! ```

pub mod anomaly;
pub mod auroc;
pub mod calibration;
pub mod classification;
pub mod conformal;
pub mod conformal_multilabel;
pub mod detection;
pub mod error;
pub mod evaluation;
pub mod fewshot_table;
pub mod generative;
pub mod image_quality;
pub mod latency;
pub mod multilabel;
pub mod plots;
pub mod registration;
pub mod report;
pub mod report_labeller;
pub mod report_metrics;
pub mod retrieval;
pub mod segmentation;
pub mod temperature;

pub use error::{EvalError, Result};
