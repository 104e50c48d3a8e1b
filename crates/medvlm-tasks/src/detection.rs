//! Open-vocabulary detection and phrase grounding on a frozen VLM image tower, after OWL-ViT
//! (Minderer et al., ECCV 2022, "Simple Open-Vocabulary Object Detection with Vision
//! Transformers"): every patch token of the frozen tower is a box proposal.
//!
//! - **Boxes**: a 3-layer MLP (width `width`, GELU) maps each token (layer-normalised) to 4
//!   numbers; `sigmoid(mlp + prior)` is the box `(cx, cy, w, h)` as fractions of the image,
//!   where the prior is OWL-ViT's box bias: the inverse sigmoid of the token's cell centre and
//!   of the cell size. The MLP's last layer starts at zero, so an untrained head proposes the
//!   token's own cell ([`DetectionHead::forward`] at initialisation).
//! - **Class logits**: each token is projected to the text space (a linear layer), both it and
//!   the query's text embedding are L2-normalised, and the cosine is shifted and scaled per
//!   token by learnt linear maps: `(cos + shift(x)) * (elu(scale(x)) + 1)` (OWL-ViT's
//!   `logit_shift` and `logit_scale`). The query is any text embedding, so a class is a prompt.
//! - **Matching and loss** (DETR, Carion et al., ECCV 2020; the sigmoid focal form of
//!   Deformable DETR, Zhu et al., ICLR 2021, which OWL-ViT follows): each (image, query) pair's
//!   true boxes are matched one-to-one to tokens by the Hungarian algorithm
//!   ([`hungarian_match`], `pathfinding`'s `kuhn_munkres_min`) on the cost
//!   `2 * focal + 5 * L1 + 2 * (-GIoU)`, where the focal cost is Deformable DETR's
//!   `alpha (1-p)^gamma (-log p) - (1-alpha) p^gamma (-log(1-p))`. The loss is
//!   `2 * focal + 5 * L1 + 2 * (1 - GIoU)` ([`DetLossWeights::default`]): sigmoid focal loss
//!   (Lin et al., ICCV 2017; alpha 0.25, gamma 2) over every token, target 1 on matched tokens,
//!   plus L1 on `(cx, cy, w, h)` and generalised IoU (Rezatofighi et al., CVPR 2019) over the
//!   matched ones, each summed and divided by the number of true boxes in the batch (at least
//!   one). A query whose finding is absent has no box: all its tokens are negatives.
//! - **Grounding** a phrase (MedRPG's task, Chen et al., 2023): the box of the token that
//!   scores highest for the phrase's text embedding ([`ground`]).
//! - **Detection**: every token's box with its sigmoid score, greedy non-maximum suppression
//!   at IoU 0.5, at most 100 per (image, query) ([`detect`]).
//!
//! Baselines without training: the **heatmap** box ([`heatmap_box`]: patch-text cosine map
//! thresholded, box of the largest 4-connected region of cells above the threshold) and the
//! **centre** box ([`centre_box`]).
//!
//! Defaults ([`DetHeadConfig::new`]): width 64, AdamW lr 1e-2, weight decay 1e-4, 1500 steps
//! of batch 64, seed 0 (on the phantom benchmark lr 1e-3 and 600 or 1200 steps of batch 32
//! left the focal term far from converged; docs/detection.md). Only the head trains; the towers stay frozen, so their features are
//! computed once ([`DetSample`]).

use candle_core::{DType, Device, Module, Tensor, D};
use candle_nn::{Linear, VarBuilder, VarMap};
// medvlm's layer norm: candle-nn's fused one passes no gradient to its weight and bias.
use medvlm_models::transformer::LayerNorm;
use pathfinding::prelude::{kuhn_munkres_min, Matrix};
use serde::{Deserialize, Serialize};

use medvlm_train::init::{self, Init};
use medvlm_train::minibatch::{adamw, ShuffledEpochs};
use medvlm_train::optim::{Gradients, NamedVar};

/// Errors of the detection head.
#[derive(Debug, thiserror::Error)]
pub enum DetError {
    /// Tensor error.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    /// Optimiser error.
    #[error(transparent)]
    Optim(#[from] medvlm_train::optim::OptimError),
    /// Inputs or settings that cannot work (the message says which).
    #[error("{0}")]
    Invalid(String),
}

/// Result of this module.
pub type Result<T> = std::result::Result<T, DetError>;

/// A box `[x0, y0, x1, y1]` (fractions of the image unless said otherwise).
pub type Bbox = [f64; 4];

/// Weights of the matching cost and of the loss (the same weights for both, as DETR).
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq)]
pub struct DetLossWeights {
    /// Weight of the focal classification term (Deformable DETR: 2).
    pub class: f64,
    /// Weight of the L1 box term on `(cx, cy, w, h)` (DETR: 5).
    pub l1: f64,
    /// Weight of the GIoU term (DETR: 2).
    pub giou: f64,
    /// Focal loss alpha (Lin et al.: 0.25).
    pub focal_alpha: f64,
    /// Focal loss gamma (Lin et al.: 2).
    pub focal_gamma: f64,
}

impl Default for DetLossWeights {
    /// Class 2, L1 5, GIoU 2, alpha 0.25, gamma 2 (Deformable DETR's weights, DETR's box
    /// weights).
    fn default() -> Self {
        Self {
            class: 2.0,
            l1: 5.0,
            giou: 2.0,
            focal_alpha: 0.25,
            focal_gamma: 2.0,
        }
    }
}

/// Shape and training settings of the head.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct DetHeadConfig {
    /// Hidden width of the box MLP.
    pub width: usize,
    /// Width of the image tower's patch tokens.
    pub feature_dim: usize,
    /// Width of the text embeddings.
    pub text_dim: usize,
    /// Patch grid `(rows, cols)` of the image tower (tokens are row-major over it).
    pub grid: (usize, usize),
    /// Optimiser steps.
    pub steps: usize,
    /// (image, query) samples per step.
    pub batch: usize,
    /// AdamW learning rate.
    pub lr: f64,
    /// AdamW weight decay.
    pub weight_decay: f64,
    /// Matching and loss weights.
    pub loss: DetLossWeights,
    /// IoU above which a lower-scored detection is suppressed.
    pub nms_iou: f64,
    /// Detections kept per (image, query) after suppression (COCO: 100).
    pub max_detections: usize,
    /// Seed of the initialisation and the sample order.
    pub seed: u64,
}

impl DetHeadConfig {
    /// Defaults (see the module doc) for a tower with these sizes.
    pub fn new(feature_dim: usize, text_dim: usize, grid: (usize, usize)) -> Self {
        Self {
            width: 64,
            feature_dim,
            text_dim,
            grid,
            steps: 1500,
            batch: 64,
            lr: 1e-2,
            weight_decay: 1e-4,
            loss: DetLossWeights::default(),
            nms_iou: 0.5,
            max_detections: 100,
            seed: 0,
        }
    }

    /// Checks the sizes: a grid of at least 2x2 cells (a single token has no spatial
    /// information to place a box with), non-zero widths and batch.
    pub fn validate(&self) -> Result<()> {
        let (gh, gw) = self.grid;
        if gh < 2 || gw < 2 {
            return Err(DetError::Invalid(format!(
                "a {gh}x{gw} patch grid has no spatial features to place boxes with (at least 2x2 needed)"
            )));
        }
        if self.width == 0 || self.feature_dim == 0 || self.text_dim == 0 || self.batch == 0 {
            return Err(DetError::Invalid(
                "width, feature_dim, text_dim and batch must be at least 1".into(),
            ));
        }
        Ok(())
    }
}

fn inverse_sigmoid(p: f64) -> f64 {
    let p = p.clamp(1e-4, 1.0 - 1e-4);
    (p / (1.0 - p)).ln()
}

/// OWL-ViT's box bias `[N, 4]`: the inverse sigmoid of each cell's centre `(cx, cy)` and of
/// the cell size `(1 / cols, 1 / rows)`, row-major over the grid.
pub fn box_prior(grid: (usize, usize)) -> Vec<[f64; 4]> {
    let (gh, gw) = grid;
    let mut out = Vec::with_capacity(gh * gw);
    for r in 0..gh {
        for c in 0..gw {
            out.push([
                inverse_sigmoid((c as f64 + 0.5) / gw as f64),
                inverse_sigmoid((r as f64 + 0.5) / gh as f64),
                inverse_sigmoid(1.0 / gw as f64),
                inverse_sigmoid(1.0 / gh as f64),
            ]);
        }
    }
    out
}

/// The head (see the module docs).
pub struct DetectionHead {
    cfg: DetHeadConfig,
    norm: LayerNorm,
    box1: Linear,
    box2: Linear,
    box_out: Linear,
    class_proj: Linear,
    logit_shift: Linear,
    logit_scale: Linear,
    prior: Tensor,
}

impl DetectionHead {
    /// A head with its parameters in `vb` (candle's default initialisation; the trainer
    /// re-draws them from its seed).
    pub fn new(vb: VarBuilder, cfg: &DetHeadConfig) -> Result<Self> {
        cfg.validate()?;
        let w = cfg.width;
        let d = cfg.feature_dim;
        let prior: Vec<f32> = box_prior(cfg.grid)
            .iter()
            .flat_map(|b| b.iter().map(|&v| v as f32))
            .collect();
        let n = cfg.grid.0 * cfg.grid.1;
        Ok(Self {
            cfg: cfg.clone(),
            norm: medvlm_models::transformer::layer_norm(vb.pp("norm"), d, 1e-5)?,
            box1: candle_nn::linear(d, w, vb.pp("box1"))?,
            box2: candle_nn::linear(w, w, vb.pp("box2"))?,
            box_out: candle_nn::linear(w, 4, vb.pp("box_out"))?,
            class_proj: candle_nn::linear(d, cfg.text_dim, vb.pp("class_proj"))?,
            logit_shift: candle_nn::linear(d, 1, vb.pp("logit_shift"))?,
            logit_scale: candle_nn::linear(d, 1, vb.pp("logit_scale"))?,
            prior: Tensor::from_vec(prior, (1, n, 4), vb.device())?,
        })
    }

    /// The settings.
    pub fn config(&self) -> &DetHeadConfig {
        &self.cfg
    }

    /// Boxes `[B, N, 4]` as `(cx, cy, w, h)` fractions of the image and class logits
    /// `[B, N]`, from patch tokens `[B, N, D]` and one query text embedding per sample
    /// `[B, E]`.
    pub fn forward(&self, tokens: &Tensor, text: &Tensor) -> Result<(Tensor, Tensor)> {
        let (b, n, d) = tokens.dims3()?;
        let (gh, gw) = self.cfg.grid;
        if n != gh * gw || d != self.cfg.feature_dim {
            return Err(DetError::Invalid(format!(
                "{n} tokens of width {d} for a {gh}x{gw} grid of width {}",
                self.cfg.feature_dim
            )));
        }
        let (tb, e) = text.dims2()?;
        if tb != b || e != self.cfg.text_dim {
            return Err(DetError::Invalid(format!(
                "{tb} text embeddings of width {e} for {b} samples of text width {}",
                self.cfg.text_dim
            )));
        }
        let x = self.norm.forward(tokens)?;
        let h = self.box1.forward(&x)?.gelu()?;
        let h = self.box2.forward(&h)?.gelu()?;
        let boxes =
            candle_nn::ops::sigmoid(&self.box_out.forward(&h)?.broadcast_add(&self.prior)?)?;
        let emb = self.class_proj.forward(&x)?;
        let emb = emb.broadcast_div(
            &emb.sqr()?
                .sum_keepdim(D::Minus1)?
                .sqrt()?
                .clamp(1e-6, f64::MAX)?,
        )?;
        let q = text.broadcast_div(
            &text
                .sqr()?
                .sum_keepdim(D::Minus1)?
                .sqrt()?
                .clamp(1e-6, f64::MAX)?,
        )?;
        let cos = emb.matmul(&q.unsqueeze(2)?)?.squeeze(2)?;
        let shift = self.logit_shift.forward(&x)?.squeeze(2)?;
        let scale = (self.logit_scale.forward(&x)?.elu(1.0)? + 1.0)?.squeeze(2)?;
        let logits = (cos + shift)?.mul(&scale)?;
        Ok((boxes, logits))
    }
}

/// `(cx, cy, w, h)` to `[x0, y0, x1, y1]`.
pub fn cxcywh_to_xyxy(b: [f64; 4]) -> Bbox {
    [
        b[0] - b[2] / 2.0,
        b[1] - b[3] / 2.0,
        b[0] + b[2] / 2.0,
        b[1] + b[3] / 2.0,
    ]
}

/// `[x0, y0, x1, y1]` to `(cx, cy, w, h)`.
pub fn xyxy_to_cxcywh(b: Bbox) -> [f64; 4] {
    [
        (b[0] + b[2]) / 2.0,
        (b[1] + b[3]) / 2.0,
        b[2] - b[0],
        b[3] - b[1],
    ]
}

/// Generalised IoU (Rezatofighi et al., CVPR 2019) of two `[x0, y0, x1, y1]` boxes:
/// `IoU - (C - U) / C` with `C` the area of the smallest enclosing box and `U` the union; in
/// `(-1, 1]`, negative for disjoint boxes far apart. 0 when the enclosing box is empty.
pub fn giou(a: &Bbox, b: &Bbox) -> f64 {
    let area = |x: &Bbox| (x[2] - x[0]).max(0.0) * (x[3] - x[1]).max(0.0);
    let iw = (a[2].min(b[2]) - a[0].max(b[0])).max(0.0);
    let ih = (a[3].min(b[3]) - a[1].max(b[1])).max(0.0);
    let inter = iw * ih;
    let union = area(a) + area(b) - inter;
    let c = (a[2].max(b[2]) - a[0].min(b[0])) * (a[3].max(b[3]) - a[1].min(b[1]));
    if c <= 0.0 {
        return 0.0;
    }
    let iou = if union > 0.0 { inter / union } else { 0.0 };
    iou - (c - union) / c
}

/// Deformable DETR's focal matching cost of a token with logit `x` for a true box:
/// `alpha (1-p)^gamma (-log p) - (1-alpha) p^gamma (-log(1-p))`, `p = sigmoid(x)`.
pub fn focal_cost(x: f64, alpha: f64, gamma: f64) -> f64 {
    let p = 1.0 / (1.0 + (-x).exp());
    let eps = 1e-8;
    let pos = alpha * (1.0 - p).powf(gamma) * -(p + eps).ln();
    let neg = (1.0 - alpha) * p.powf(gamma) * -(1.0 - p + eps).ln();
    pos - neg
}

/// Sigmoid focal loss (Lin et al., ICCV 2017) of logits against 0/1 targets (same shape),
/// summed: `alpha_t (1 - p_t)^gamma BCE(x, t)` with `p_t = p t + (1-p)(1-t)` and
/// `alpha_t = alpha t + (1-alpha)(1-t)`.
pub fn sigmoid_focal_loss(
    logits: &Tensor,
    targets: &Tensor,
    alpha: f64,
    gamma: f64,
) -> Result<Tensor> {
    if logits.dims() != targets.dims() {
        return Err(DetError::Invalid(format!(
            "focal loss: logits {:?} and targets {:?} differ",
            logits.dims(),
            targets.dims()
        )));
    }
    // BCE with logits, stable: max(x, 0) - x t + log(1 + exp(-|x|)).
    let ce =
        ((logits.relu()? - logits.mul(targets)?)? + (logits.abs()?.neg()?.exp()? + 1.0)?.log()?)?;
    let p = candle_nn::ops::sigmoid(logits)?;
    let one_minus_t = targets.affine(-1.0, 1.0)?;
    let p_t = (p.mul(targets)? + p.affine(-1.0, 1.0)?.mul(&one_minus_t)?)?;
    let modulator = p_t.affine(-1.0, 1.0)?.clamp(0.0, 1.0)?.powf(gamma)?;
    let alpha_t = targets.affine(2.0 * alpha - 1.0, 1.0 - alpha)?;
    Ok(ce.mul(&modulator)?.mul(&alpha_t)?.sum_all()?)
}

/// Generalised IoU of matched box pairs `[M, 4]` (`[x0, y0, x1, y1]`) as a tensor `[M]`.
pub fn giou_tensor(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let col = |t: &Tensor, i: usize| t.narrow(1, i, 1).and_then(|c| c.squeeze(1));
    let (ax0, ay0, ax1, ay1) = (col(a, 0)?, col(a, 1)?, col(a, 2)?, col(a, 3)?);
    let (bx0, by0, bx1, by1) = (col(b, 0)?, col(b, 1)?, col(b, 2)?, col(b, 3)?);
    let area_a = (&ax1 - &ax0)?.relu()?.mul(&(&ay1 - &ay0)?.relu()?)?;
    let area_b = (&bx1 - &bx0)?.relu()?.mul(&(&by1 - &by0)?.relu()?)?;
    let iw = (ax1.minimum(&bx1)? - ax0.maximum(&bx0)?)?.relu()?;
    let ih = (ay1.minimum(&by1)? - ay0.maximum(&by0)?)?.relu()?;
    let inter = iw.mul(&ih)?;
    let union = ((area_a + area_b)? - &inter)?;
    let cw = (ax1.maximum(&bx1)? - ax0.minimum(&bx0)?)?;
    let ch = (ay1.maximum(&by1)? - ay0.minimum(&by0)?)?;
    let c = cw.mul(&ch)?;
    let iou = inter.div(&(&union + 1e-7)?)?;
    Ok((iou - (&c - &union)?.div(&(&c + 1e-7)?)?)?)
}

fn cxcywh_to_xyxy_tensor(b: &Tensor) -> Result<Tensor> {
    let c = b.narrow(1, 0, 2)?;
    let half = (b.narrow(1, 2, 2)? * 0.5)?;
    Ok(Tensor::cat(&[(&c - &half)?, (&c + &half)?], 1)?)
}

/// Minimum-cost one-to-one assignment of rows to columns of `cost` (`rows x cols`,
/// row-major): `Some(column)` for each row, `None` for rows left over when there are more
/// rows than columns (each column is used at most once). Costs are rounded to 1e-6 for the
/// integer Hungarian solver; non-finite costs count as very large.
pub fn hungarian_match(cost: &[f64], rows: usize, cols: usize) -> Result<Vec<Option<usize>>> {
    if cost.len() != rows * cols {
        return Err(DetError::Invalid(format!(
            "a {rows}x{cols} cost matrix needs {} values, got {}",
            rows * cols,
            cost.len()
        )));
    }
    if rows == 0 || cols == 0 {
        return Ok(vec![None; rows]);
    }
    let q = |v: f64| -> i64 {
        if v.is_finite() {
            (v.clamp(-1e9, 1e9) * 1e6).round() as i64
        } else {
            1_000_000_000_000_000
        }
    };
    if rows <= cols {
        let m = Matrix::from_vec(rows, cols, cost.iter().map(|&v| q(v)).collect())
            .map_err(|e| DetError::Invalid(format!("cost matrix: {e:?}")))?;
        let (_, assign) = kuhn_munkres_min(&m);
        Ok(assign.into_iter().map(Some).collect())
    } else {
        // More rows than columns: assign each column a row on the transposed matrix.
        let mut t = Vec::with_capacity(rows * cols);
        for c in 0..cols {
            for r in 0..rows {
                t.push(q(cost[r * cols + c]));
            }
        }
        let m = Matrix::from_vec(cols, rows, t)
            .map_err(|e| DetError::Invalid(format!("cost matrix: {e:?}")))?;
        let (_, assign) = kuhn_munkres_min(&m);
        let mut out = vec![None; rows];
        for (c, r) in assign.into_iter().enumerate() {
            out[r] = Some(c);
        }
        Ok(out)
    }
}

/// One training or evaluation sample: an image's frozen patch tokens, a query's text
/// embedding and the query's true boxes in that image (none when the finding is absent).
#[derive(Debug, Clone)]
pub struct DetSample {
    /// Patch tokens `[N, D]`.
    pub tokens: Tensor,
    /// Text embedding `[E]`.
    pub text: Tensor,
    /// True boxes `[x0, y0, x1, y1]`, fractions of the image.
    pub boxes: Vec<Bbox>,
}

fn stack(samples: &[&DetSample]) -> Result<(Tensor, Tensor)> {
    let p: Vec<&Tensor> = samples.iter().map(|s| &s.tokens).collect();
    let t: Vec<&Tensor> = samples.iter().map(|s| &s.text).collect();
    Ok((Tensor::stack(&p, 0)?, Tensor::stack(&t, 0)?))
}

/// The loss terms of one batch (each already divided by the number of true boxes).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LossTerms {
    /// Weighted total.
    pub total: f32,
    /// Focal term.
    pub focal: f32,
    /// L1 term.
    pub l1: f32,
    /// 1 - GIoU term.
    pub giou: f32,
}

/// The set loss of a batch (see the module docs): Hungarian matching on the detached
/// predictions, then focal + L1 + GIoU. Returns the differentiable total and its terms.
pub fn set_loss(
    boxes: &Tensor,
    logits: &Tensor,
    targets: &[&[Bbox]],
    w: &DetLossWeights,
) -> Result<(Tensor, LossTerms)> {
    let (b, n, _) = boxes.dims3()?;
    if targets.len() != b {
        return Err(DetError::Invalid(format!(
            "{} target lists for a batch of {b}",
            targets.len()
        )));
    }
    let box_vals: Vec<Vec<[f32; 4]>> = boxes
        .to_dtype(DType::F32)?
        .to_vec3::<f32>()?
        .into_iter()
        .map(|s| s.into_iter().map(|v| [v[0], v[1], v[2], v[3]]).collect())
        .collect();
    let logit_vals: Vec<Vec<f32>> = logits.to_dtype(DType::F32)?.to_vec2::<f32>()?;
    let mut matched_idx: Vec<u32> = Vec::new();
    let mut matched_tgt: Vec<f32> = Vec::new();
    let mut cls_target = vec![0f32; b * n];
    for (s, tg) in targets.iter().enumerate() {
        if tg.is_empty() {
            continue;
        }
        let mut cost = Vec::with_capacity(tg.len() * n);
        for t in tg.iter() {
            let tc = xyxy_to_cxcywh(*t);
            for j in 0..n {
                let p = box_vals[s][j].map(f64::from);
                let l1: f64 = (0..4).map(|k| (p[k] - tc[k]).abs()).sum();
                let g = giou(&cxcywh_to_xyxy(p), t);
                let fc = focal_cost(f64::from(logit_vals[s][j]), w.focal_alpha, w.focal_gamma);
                cost.push(w.class * fc + w.l1 * l1 - w.giou * g);
            }
        }
        for (ti, tok) in hungarian_match(&cost, tg.len(), n)?.into_iter().enumerate() {
            if let Some(j) = tok {
                matched_idx.push((s * n + j) as u32);
                matched_tgt.extend(xyxy_to_cxcywh(tg[ti]).iter().map(|&v| v as f32));
                cls_target[s * n + j] = 1.0;
            }
        }
    }
    let num_boxes = targets.iter().map(|t| t.len()).sum::<usize>().max(1) as f64;
    let dev = logits.device();
    let cls_t = Tensor::from_vec(cls_target, (b, n), dev)?;
    let focal = (sigmoid_focal_loss(logits, &cls_t, w.focal_alpha, w.focal_gamma)? / num_boxes)?;
    let mut total = (&focal * w.class)?;
    let (mut l1_v, mut giou_v) = (0f32, 0f32);
    if !matched_idx.is_empty() {
        let m = matched_idx.len();
        let idx = Tensor::from_vec(matched_idx, m, dev)?;
        let pred = boxes.reshape((b * n, 4))?.index_select(&idx, 0)?;
        let tgt = Tensor::from_vec(matched_tgt, (m, 4), dev)?;
        let l1 = ((&pred - &tgt)?.abs()?.sum_all()? / num_boxes)?;
        let g = giou_tensor(
            &cxcywh_to_xyxy_tensor(&pred)?,
            &cxcywh_to_xyxy_tensor(&tgt)?,
        )?;
        let gl = (g.affine(-1.0, 1.0)?.sum_all()? / num_boxes)?;
        l1_v = l1.to_scalar::<f32>()?;
        giou_v = gl.to_scalar::<f32>()?;
        total = ((total + (l1 * w.l1)?)? + (gl * w.giou)?)?;
    }
    let terms = LossTerms {
        total: total.to_scalar::<f32>()?,
        focal: focal.to_scalar::<f32>()?,
        l1: l1_v,
        giou: giou_v,
    };
    Ok((total, terms))
}

/// Re-draws every parameter from a seeded generator (candle's initialisers use the thread's
/// RNG): weights Kaiming-normal `N(0, 2 / fan_in)`, biases zero, layer-norm weights one, and
/// the box MLP's last layer zero so that an untrained head proposes each token's own cell.
fn seeded_init(params: &[NamedVar], seed: u64) -> Result<()> {
    Ok(init::seeded_init(params, seed, 0xde7_ec7, |name, dims| {
        if name.starts_with("norm.") && name.ends_with("weight") {
            Init::Ones
        } else if name.ends_with("bias") || name.starts_with("box_out.") {
            Init::Zeros
        } else {
            Init::Normal {
                std: init::kaiming_std(dims),
            }
        }
    })?)
}

/// A freshly initialised head (seeded, see `seeded_init`) and its parameters.
pub fn init_head(cfg: &DetHeadConfig, device: &Device) -> Result<(DetectionHead, VarMap)> {
    let varmap = VarMap::new();
    let head = DetectionHead::new(VarBuilder::from_varmap(&varmap, DType::F32, device), cfg)?;
    seeded_init(&medvlm_train::optim::varmap_params(&varmap), cfg.seed)?;
    Ok((head, varmap))
}

/// A trained head with its parameters.
pub struct TrainedDetHead {
    /// The head.
    pub head: DetectionHead,
    /// Its parameters.
    pub varmap: VarMap,
    /// Loss terms of each step.
    pub losses: Vec<LossTerms>,
}

/// Trains a head on `samples` with AdamW (the engine's, [`medvlm_train::optim::AdamW`]).
pub fn train_head(
    cfg: &DetHeadConfig,
    samples: &[DetSample],
    device: &Device,
) -> Result<TrainedDetHead> {
    if samples.is_empty() {
        return Err(DetError::Invalid("no training samples".into()));
    }
    if !samples.iter().any(|s| !s.boxes.is_empty()) {
        return Err(DetError::Invalid(
            "no training sample has a box: nothing to learn".into(),
        ));
    }
    let (head, varmap) = init_head(cfg, device)?;
    let params = medvlm_train::optim::varmap_params(&varmap);
    let mut opt = adamw(params.clone(), cfg.weight_decay)?;
    let mut sampler = ShuffledEpochs::new(samples.len(), cfg.seed);
    let mut losses = Vec::with_capacity(cfg.steps);
    for _ in 0..cfg.steps {
        let batch: Vec<&DetSample> = sampler
            .batch(cfg.batch)
            .into_iter()
            .map(|i| &samples[i])
            .collect();
        let (p, t) = stack(&batch)?;
        let (p, t) = (p.to_device(device)?, t.to_device(device)?);
        let (boxes, logits) = head.forward(&p, &t)?;
        let targets: Vec<&[Bbox]> = batch.iter().map(|s| s.boxes.as_slice()).collect();
        let (loss, terms) = set_loss(&boxes, &logits, &targets, &cfg.loss)?;
        let grads = Gradients::from_grad_store(&loss.backward()?, &params);
        opt.step(&grads, cfg.lr)?;
        losses.push(terms);
    }
    Ok(TrainedDetHead {
        head,
        varmap,
        losses,
    })
}

/// Every token's box (`[x0, y0, x1, y1]`, fractions) and sigmoid score for each sample.
pub fn token_predictions(
    head: &DetectionHead,
    samples: &[DetSample],
    device: &Device,
) -> Result<Vec<Vec<(Bbox, f64)>>> {
    let mut out = Vec::with_capacity(samples.len());
    for chunk in samples.chunks(64) {
        let refs: Vec<&DetSample> = chunk.iter().collect();
        let (p, t) = stack(&refs)?;
        let (boxes, logits) = head.forward(&p.to_device(device)?, &t.to_device(device)?)?;
        let boxes = boxes.to_dtype(DType::F32)?.to_vec3::<f32>()?;
        let scores = candle_nn::ops::sigmoid(&logits)?
            .to_dtype(DType::F32)?
            .to_vec2::<f32>()?;
        for (bs, ss) in boxes.into_iter().zip(scores) {
            out.push(
                bs.into_iter()
                    .zip(ss)
                    .map(|(b, s)| {
                        (
                            clip_box(cxcywh_to_xyxy([b[0], b[1], b[2], b[3]].map(f64::from))),
                            f64::from(s),
                        )
                    })
                    .collect(),
            );
        }
    }
    Ok(out)
}

/// A box clipped to the image `[0, 1]^2`.
pub fn clip_box(b: Bbox) -> Bbox {
    b.map(|v| v.clamp(0.0, 1.0))
}

/// Grounding: the box and score of the token that scores highest (first on ties).
pub fn ground(tokens: &[(Bbox, f64)]) -> Option<(Bbox, f64)> {
    tokens
        .iter()
        .copied()
        .reduce(|a, b| if b.1 > a.1 { b } else { a })
}

/// Detection: greedy non-maximum suppression (highest score first; a box whose IoU with a
/// kept one exceeds `nms_iou` is dropped), at most `max` kept.
pub fn detect(tokens: &[(Bbox, f64)], nms_iou: f64, max: usize) -> Vec<(Bbox, f64)> {
    let mut order: Vec<usize> = (0..tokens.len()).collect();
    order.sort_by(|&a, &b| tokens[b].1.total_cmp(&tokens[a].1));
    let mut kept: Vec<(Bbox, f64)> = Vec::new();
    for i in order {
        if kept.len() >= max {
            break;
        }
        let (b, s) = tokens[i];
        if kept
            .iter()
            .all(|(k, _)| medvlm_eval::detection::box_iou(k, &b) <= nms_iou)
        {
            kept.push((b, s));
        }
    }
    kept
}

/// The centre-box baseline for grounding: a box of size `(w, h)` (fractions of the image;
/// the pipeline uses the class's mean training box size) centred in the image.
pub fn centre_box(w: f64, h: f64) -> Bbox {
    clip_box([0.5 - w / 2.0, 0.5 - h / 2.0, 0.5 + w / 2.0, 0.5 + h / 2.0])
}

/// The zero-shot heatmap baseline: on a `rows x cols` patch-text similarity map (row-major),
/// the cells at or above `threshold` are grouped into 4-connected regions and the box of the
/// largest region (most cells; on a tie the one with the highest similarity) is returned, as
/// fractions of the image, with the region's highest similarity as its score. When no cell
/// reaches the threshold, the box of the single most similar cell.
pub fn heatmap_box(sim: &[f32], grid: (usize, usize), threshold: f32) -> Result<(Bbox, f64)> {
    let (rows, cols) = grid;
    if sim.len() != rows * cols || sim.is_empty() {
        return Err(DetError::Invalid(format!(
            "a similarity map of {} values for a {rows}x{cols} grid",
            sim.len()
        )));
    }
    let mut label = vec![usize::MAX; sim.len()];
    // (cells, best similarity, r0, c0, r1, c1) per region.
    let mut best: Option<(usize, f32, usize, usize, usize, usize)> = None;
    let mut region = 0;
    for start in 0..sim.len() {
        if sim[start] < threshold || label[start] != usize::MAX {
            continue;
        }
        let mut stack = vec![start];
        label[start] = region;
        let (mut n, mut top) = (0usize, f32::MIN);
        let (mut r0, mut c0, mut r1, mut c1) = (rows, cols, 0, 0);
        while let Some(i) = stack.pop() {
            let (r, c) = (i / cols, i % cols);
            n += 1;
            top = top.max(sim[i]);
            r0 = r0.min(r);
            c0 = c0.min(c);
            r1 = r1.max(r);
            c1 = c1.max(c);
            let mut push = |j: usize| {
                if sim[j] >= threshold && label[j] == usize::MAX {
                    label[j] = region;
                    stack.push(j);
                }
            };
            if r > 0 {
                push(i - cols);
            }
            if r + 1 < rows {
                push(i + cols);
            }
            if c > 0 {
                push(i - 1);
            }
            if c + 1 < cols {
                push(i + 1);
            }
        }
        region += 1;
        if best.is_none_or(|b| n > b.0 || (n == b.0 && top > b.1)) {
            best = Some((n, top, r0, c0, r1, c1));
        }
    }
    let (score, r0, c0, r1, c1) = match best {
        Some((_, top, r0, c0, r1, c1)) => (top, r0, c0, r1, c1),
        None => {
            let i = (0..sim.len())
                .reduce(|a, b| if sim[b] > sim[a] { b } else { a })
                .unwrap_or(0);
            (sim[i], i / cols, i % cols, i / cols, i % cols)
        }
    };
    Ok((
        [
            c0 as f64 / cols as f64,
            r0 as f64 / rows as f64,
            (c1 + 1) as f64 / cols as f64,
            (r1 + 1) as f64 / rows as f64,
        ],
        f64::from(score),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hungarian_finds_the_known_optimum() {
        // Rows: targets; columns: tokens. The greedy row-by-row choice (row 0 -> col 0, cost
        // 1) forces row 1 onto col 2 (cost 9) and row 2 onto col 1 (cost 6): total 16; the
        // optimum is row 0 -> col 1, row 1 -> col 0, row 2 -> col 2: 2 + 2 + 3 = 7.
        let cost = [1.0, 2.0, 8.0, 2.0, 10.0, 9.0, 4.0, 6.0, 3.0];
        let m = hungarian_match(&cost, 3, 3).unwrap();
        assert_eq!(m, vec![Some(1), Some(0), Some(2)]);
        // Fewer targets than tokens.
        // Both targets prefer token 1; giving it to row 1 (0.2) and token 2 to row 0 would
        // cost 7.2, token 1 to row 0 and token 2 to row 1 costs 0.8.
        let cost = [5.0, 0.5, 7.0, 1.0, 9.0, 0.2, 0.3, 8.0];
        assert_eq!(
            hungarian_match(&cost, 2, 4).unwrap(),
            vec![Some(1), Some(2)]
        );
        // More targets than tokens: one token, the target it costs least for gets it.
        assert_eq!(
            hungarian_match(&[3.0, 1.0, 2.0], 3, 1).unwrap(),
            vec![None, Some(0), None]
        );
        assert!(hungarian_match(&[1.0, 2.0], 2, 2).is_err());
    }

    #[test]
    fn giou_known_answers() {
        let a = [0.0, 0.0, 2.0, 2.0];
        // Identical boxes: 1.
        assert!((giou(&a, &a) - 1.0).abs() < 1e-12);
        // Overlap 1 of union 7, enclosing 3x3 = 9: 1/7 - 2/9.
        let b = [1.0, 1.0, 3.0, 3.0];
        assert!((giou(&a, &b) - (1.0 / 7.0 - 2.0 / 9.0)).abs() < 1e-12);
        // Disjoint: IoU 0, union 2, enclosing [0,0,3,1] = 3: -1/3; farther apart, lower.
        let c = [0.0, 0.0, 1.0, 1.0];
        let d = [2.0, 0.0, 3.0, 1.0];
        assert!((giou(&c, &d) + 1.0 / 3.0).abs() < 1e-12);
        let e = [9.0, 0.0, 10.0, 1.0];
        assert!((giou(&c, &e) + 0.8).abs() < 1e-12);
        // The tensor version agrees.
        let t = |v: &[Bbox]| {
            Tensor::from_vec(
                v.iter().flatten().map(|&x| x as f32).collect::<Vec<_>>(),
                (v.len(), 4),
                &Device::Cpu,
            )
            .unwrap()
        };
        let g = giou_tensor(&t(&[a, a, c, c]), &t(&[a, b, d, e]))
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        for (x, want) in g.iter().zip([1.0, 1.0 / 7.0 - 2.0 / 9.0, -1.0 / 3.0, -0.8]) {
            assert!((f64::from(*x) - want).abs() < 1e-5, "{g:?}");
        }
    }

    #[test]
    fn focal_loss_value() {
        // x = 0 (p = 0.5), t = 1: 0.25 * 0.5^2 * ln 2; t = 0: 0.75 * 0.5^2 * ln 2.
        // x = 2, t = 0: p = sigmoid(2), 0.75 * p^2 * (2 + ln(1 + e^-2)).
        let x = Tensor::new(&[0f32, 0.0, 2.0], &Device::Cpu).unwrap();
        let t = Tensor::new(&[1f32, 0.0, 0.0], &Device::Cpu).unwrap();
        let got = sigmoid_focal_loss(&x, &t, 0.25, 2.0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        let p2 = 1.0 / (1.0 + (-2f64).exp());
        let want = 0.25 * 0.25 * 2f64.ln()
            + 0.75 * 0.25 * 2f64.ln()
            + 0.75 * p2 * p2 * (2.0 + (1.0 + (-2f64).exp()).ln());
        assert!((f64::from(got) - want).abs() < 1e-5, "{got} vs {want}");
        // Gamma 0, alpha 0.5 is half the plain BCE.
        let got = sigmoid_focal_loss(&x, &t, 0.5, 0.0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        let bce = 2.0 * 2f64.ln() + 2.0 + (1.0 + (-2f64).exp()).ln();
        assert!((f64::from(got) - 0.5 * bce).abs() < 1e-5);
        // The matching cost: a confident right token costs less than an unsure one.
        assert!(focal_cost(4.0, 0.25, 2.0) < focal_cost(0.0, 0.25, 2.0));
        assert!(focal_cost(0.0, 0.25, 2.0) < focal_cost(-4.0, 0.25, 2.0));
    }

    #[test]
    fn untrained_head_proposes_each_tokens_cell() {
        let cfg = DetHeadConfig::new(8, 4, (4, 4));
        let (head, _) = init_head(&cfg, &Device::Cpu).unwrap();
        let tokens = Tensor::randn(0f32, 1.0, (2, 16, 8), &Device::Cpu).unwrap();
        let text = Tensor::randn(0f32, 1.0, (2, 4), &Device::Cpu).unwrap();
        let samples: Vec<DetSample> = (0..2)
            .map(|i| DetSample {
                tokens: tokens.get(i).unwrap(),
                text: text.get(i).unwrap(),
                boxes: vec![],
            })
            .collect();
        let preds = token_predictions(&head, &samples, &Device::Cpu).unwrap();
        for s in &preds {
            for (i, (b, _)) in s.iter().enumerate() {
                let (r, c) = ((i / 4) as f64, (i % 4) as f64);
                let want = [c / 4.0, r / 4.0, (c + 1.0) / 4.0, (r + 1.0) / 4.0];
                for k in 0..4 {
                    assert!(
                        (b[k] - want[k]).abs() < 1e-4,
                        "token {i}: {b:?} vs {want:?}"
                    );
                }
            }
        }
        // A 1x1 grid (a pooled feature) is refused.
        assert!(DetHeadConfig::new(8, 4, (1, 1)).validate().is_err());
        assert!(init_head(&DetHeadConfig::new(8, 4, (1, 1)), &Device::Cpu).is_err());
    }

    #[test]
    fn heatmap_box_takes_the_largest_region() {
        // 4x4 map: a 2-cell region at the top left, a 3-cell L at the bottom right, and a
        // single hot cell; threshold 0.5.
        #[rustfmt::skip]
        let sim = [
            0.9, 0.8, 0.0, 0.0,
            0.0, 0.0, 0.0, 0.95,
            0.0, 0.0, 0.0, 0.0,
            0.0, 0.0, 0.6, 0.7f32,
        ];
        let sim: Vec<f32> = sim.to_vec();
        let mut sim2 = sim.clone();
        sim2[11] = 0.6;
        let (b, s) = heatmap_box(&sim2, (4, 4), 0.5).unwrap();
        // Cells (3,2), (3,3), (2,3), (1,3): rows 1..=3, cols 2..=3.
        assert_eq!(b, [0.5, 0.25, 1.0, 1.0]);
        assert!((s - 0.95).abs() < 1e-6);
        // Without (2,3) the regions are 2, 1 and 2 cells; the tie goes to the hotter one.
        let (b, _) = heatmap_box(&sim, (4, 4), 0.5).unwrap();
        assert_eq!(b, [0.0, 0.0, 0.5, 0.25]);
        // Nothing above the threshold: the hottest cell.
        let (b, s) = heatmap_box(&sim, (4, 4), 2.0).unwrap();
        assert_eq!(b, [0.75, 0.25, 1.0, 0.5]);
        assert!((s - 0.95).abs() < 1e-6);
        assert!(heatmap_box(&sim, (3, 3), 0.5).is_err());
    }

    #[test]
    fn nms_drops_overlapping_lower_scores() {
        let t = vec![
            ([0.0, 0.0, 0.5, 0.5], 0.9),
            ([0.0, 0.0, 0.5, 0.45], 0.8),
            ([0.5, 0.5, 1.0, 1.0], 0.7),
        ];
        let d = detect(&t, 0.5, 100);
        assert_eq!(d.len(), 2);
        assert_eq!(d[1].0, [0.5, 0.5, 1.0, 1.0]);
        assert_eq!(detect(&t, 0.5, 1).len(), 1);
        assert_eq!(ground(&t).unwrap().1, 0.9);
    }
}
