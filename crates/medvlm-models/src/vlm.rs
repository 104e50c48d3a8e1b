//! The interface every model family implements, and the extension points the
//! adaptation methods use.
//!
//! # Towers
//! A [`VisionLanguageModel`] is an [`ImageEncoder`] + a [`TextEncoder`] + a
//! logit scale (and a bias for SigLIP) + access to its [`LinearLayers`].
//! Encoders return the *projected* embeddings (not normalised), the pooled
//! features before projection, and the last hidden states (patch / token
//! features) for dense tasks.
//!
//! # Extension points
//! - **Prompt learning on the text side** (CoOp, Zhou et al. 2022, "Learning
//!   to Prompt for Vision-Language Models"; CoCoOp): [`TextPrompt`] replaces
//!   the *token embeddings* at given positions by given vectors before the
//!   positional embeddings are added. Pooling still uses the token ids (EOT /
//!   last / CLS position), so the ids at replaced positions can be any
//!   placeholder (e.g. `X`).
//! - **Visual prompts** (VPT, Jia et al. 2022, "Visual Prompt Tuning"):
//!   [`VisualPrompts`] inserts `N` learnable tokens into the ViT sequence
//!   right after the class token (at index 0 for models without one, like
//!   SigLIP), after position embeddings were added ("shallow"); optionally new
//!   prompt tokens replace the prompt slots before every later layer ("deep").
//! - **Linear wrappers** (LoRA, adapters) and bias access (BitFit): see
//!   [`crate::linear`].
//! - **Full / partial fine-tuning**: load the model with
//!   [`crate::weights::LoadMode::Trainable`]; every parameter is then a `Var`
//!   in a `VarMap` under its checkpoint name.

use candle_core::{DType, Device, Tensor, D};

use crate::error::{ModelError, Result};
pub use crate::linear::{LinearLayer, LinearLayers, LinearWrapper};

/// The model families medvlm implements.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Family {
    /// HF `CLIPModel` (OpenAI CLIP, PubMedCLIP, PLIP).
    Clip,
    /// HF `SiglipModel` (SigLIP, MedSigLIP).
    Siglip,
    /// open_clip layout with a timm ViT and an HF BERT text tower (BiomedCLIP).
    Biomedclip,
    /// open_clip's own layout with CLIP's ModifiedResNet image tower (OpenAI RN50/RN101,
    /// PubMedCLIP-RN50, medvlm's quickstart model).
    #[serde(rename = "openclip")]
    OpenClip,
}

impl Family {
    /// Lower-case name, as used in presets and configs.
    pub fn name(&self) -> &'static str {
        match self {
            Family::Clip => "clip",
            Family::Siglip => "siglip",
            Family::Biomedclip => "biomedclip",
            Family::OpenClip => "openclip",
        }
    }
}

impl std::fmt::Display for Family {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Tokenised text: `input_ids` `[B, L]` u32 and `attention_mask` `[B, L]`
/// u32 (1 = real token, 0 = padding).
#[derive(Debug, Clone)]
pub struct TokenBatch {
    pub input_ids: Tensor,
    pub attention_mask: Tensor,
}

impl TokenBatch {
    /// Batch size.
    pub fn batch_size(&self) -> usize {
        self.input_ids.dims().first().copied().unwrap_or(0)
    }
    /// Sequence length.
    pub fn seq_len(&self) -> usize {
        self.input_ids.dims().get(1).copied().unwrap_or(0)
    }
}

/// Token embeddings to substitute (text prompt learning).
///
/// `positions` must be strictly increasing and inside the sequence;
/// `vectors` is `[P, D]` (same for every text in the batch, CoOp) or
/// `[B, P, D]` (one set per text, CoCoOp), with `P = positions.len()` and
/// `D` the text hidden size.
#[derive(Debug, Clone)]
pub struct TextPrompt {
    pub positions: Vec<usize>,
    pub vectors: Tensor,
}

/// Prompt tokens for the vision transformer (VPT).
///
/// `shallow`: `[N, D]` or `[B, N, D]`, inserted after the class token (index
/// 0 when there is none) once position embeddings were added.
/// `deep[i]` (for `i >= 1`): `[N, D]` or `[B, N, D]` that replaces the `N`
/// prompt slots before encoder layer `i` (VPT-deep). `deep[0]` is ignored
/// (the shallow prompts feed layer 0); `deep` may be shorter than the number
/// of layers (missing entries keep the running prompt tokens).
#[derive(Debug, Clone, Default)]
pub struct VisualPrompts {
    pub shallow: Option<Tensor>,
    pub deep: Vec<Option<Tensor>>,
}

impl VisualPrompts {
    /// Number of prompt tokens (0 without shallow prompts).
    pub fn len(&self) -> usize {
        self.shallow
            .as_ref()
            .and_then(|t| t.dims().get(t.rank().saturating_sub(2)).copied())
            .unwrap_or(0)
    }
    /// Whether there are no prompt tokens.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Output of a text tower.
#[derive(Debug, Clone)]
pub struct TextOutput {
    /// Projected embeddings `[B, E]`, not normalised.
    pub embeds: Tensor,
    /// Pooled features before projection `[B, D]`.
    pub pooled: Tensor,
    /// Last hidden states `[B, L, D]` (after the final layer norm, as HF returns them).
    pub last_hidden_state: Tensor,
}

/// Output of a vision tower.
#[derive(Debug, Clone)]
pub struct VisionOutput {
    /// Projected embeddings `[B, E]`, not normalised.
    pub embeds: Tensor,
    /// Pooled features before projection `[B, D]`.
    pub pooled: Tensor,
    /// Last hidden states `[B, T, D]` exactly as the family's HF model returns
    /// them (CLIP: before `post_layernorm`; SigLIP: after it), including the
    /// class token and prompt tokens.
    pub last_hidden_state: Tensor,
    /// Tokens before the patch tokens (class token + prompt tokens).
    pub num_prefix_tokens: usize,
}

impl VisionOutput {
    /// Patch tokens only `[B, num_patches, D]`.
    pub fn patch_tokens(&self) -> Result<Tensor> {
        let t = self.last_hidden_state.dim(1)?;
        Ok(self
            .last_hidden_state
            .narrow(1, self.num_prefix_tokens, t - self.num_prefix_tokens)?)
    }
}

/// Hidden states of chosen blocks of a vision transformer
/// ([`ImageEncoder::encode_image_layers`]).
#[derive(Debug, Clone)]
pub struct VisionLayerStates {
    /// The blocks asked for, counted from 1 (HF's `hidden_states[k]`), in the order asked.
    pub layers: Vec<usize>,
    /// One `[B, T, D]` per entry of `layers`: the block's raw output (no final norm),
    /// class token included.
    pub hidden_states: Vec<Tensor>,
    /// Tokens before the patch tokens (the class token; 0 without one).
    pub num_prefix_tokens: usize,
}

impl VisionLayerStates {
    /// Patch tokens `[B, num_patches, D]` of the `i`-th requested layer.
    pub fn patch_tokens(&self, i: usize) -> Result<Tensor> {
        let h = self.hidden_states.get(i).ok_or_else(|| {
            ModelError::invalid(format!(
                "layer entry {i} of {} requested layers",
                self.hidden_states.len()
            ))
        })?;
        let t = h.dim(1)?;
        Ok(h.narrow(1, self.num_prefix_tokens, t - self.num_prefix_tokens)?)
    }
}

/// Checks block indices for [`ImageEncoder::encode_image_layers`]: non-empty, each in
/// `1..=depth` (counted from 1 as HF's `hidden_states`, whose entry 0 is the embeddings).
pub fn check_vision_layers(layers: &[usize], depth: usize) -> Result<()> {
    if layers.is_empty() {
        return Err(ModelError::invalid("no image-tower layer requested"));
    }
    if let Some(&bad) = layers.iter().find(|&&k| k == 0 || k > depth) {
        return Err(ModelError::invalid(format!(
            "image-tower layer {bad} does not exist: the tower has {depth} layers, counted \
             from 1 (layer {depth} is the last)"
        )));
    }
    Ok(())
}

/// The sequences of WinCLIP's window masking ([`ImageEncoder::encode_image_windows`]):
/// from `x` `[B, prefix + N, D]` (the prefix tokens, then the `N` patch tokens, position
/// embeddings added), for every window the prefix tokens and the window's patch tokens, as
/// `[B * W, prefix + k, D]` (image-major: row `b * W + w`). Every window must hold the same
/// number `k >= 1` of distinct patch indices below `N`.
pub fn window_token_sequences(x: &Tensor, prefix: usize, windows: &[Vec<usize>]) -> Result<Tensor> {
    let (b, t, d) = x.dims3()?;
    let n = t.saturating_sub(prefix);
    let k = windows.first().map_or(0, Vec::len);
    if windows.is_empty() || k == 0 {
        return Err(ModelError::invalid(
            "no window of patch tokens given (each window needs at least one patch)",
        ));
    }
    for (i, w) in windows.iter().enumerate() {
        if w.len() != k {
            return Err(ModelError::invalid(format!(
                "window {i} holds {} patches, window 0 holds {k}: windows of one call must \
                 have the same size",
                w.len()
            )));
        }
        if let Some(&bad) = w.iter().find(|&&p| p >= n) {
            return Err(ModelError::invalid(format!(
                "window {i} names patch {bad}, but the image has {n} patches"
            )));
        }
        let mut sorted = w.clone();
        sorted.sort_unstable();
        if sorted.windows(2).any(|p| p[0] == p[1]) {
            return Err(ModelError::invalid(format!(
                "window {i} names a patch twice"
            )));
        }
    }
    let idx: Vec<u32> = windows
        .iter()
        .flat_map(|w| (0..prefix).chain(w.iter().map(|&p| prefix + p)))
        .map(|i| i as u32)
        .collect();
    let idx = Tensor::new(idx.as_slice(), x.device())?;
    let w = windows.len();
    // [B, W * (prefix + k), D] -> [B * W, prefix + k, D]
    Ok(x.index_select(&idx, 1)?.reshape((b * w, prefix + k, d))?)
}

/// A text tower.
pub trait TextEncoder: Send + Sync {
    /// Encode a batch, optionally substituting token embeddings.
    fn encode_text_with(
        &self,
        tokens: &TokenBatch,
        prompt: Option<&TextPrompt>,
    ) -> Result<TextOutput>;
    /// Encode a batch.
    fn encode_text(&self, tokens: &TokenBatch) -> Result<TextOutput> {
        self.encode_text_with(tokens, None)
    }
    /// Input token embeddings `[B, L, D]` of `input_ids` `[B, L]` (without
    /// position embeddings), e.g. to initialise CoOp context vectors from words.
    fn token_embeddings(&self, input_ids: &Tensor) -> Result<Tensor>;
    /// Hidden size `D` of the text transformer.
    fn text_hidden_size(&self) -> usize;
    /// Number of text transformer layers.
    fn text_num_layers(&self) -> usize;
    /// Maximum sequence length.
    fn context_length(&self) -> usize;
}

/// A vision tower taking `pixel_values` `[B, 3, H, W]`.
pub trait ImageEncoder: Send + Sync {
    /// Encode images, optionally with visual prompt tokens.
    fn encode_image_with(
        &self,
        pixel_values: &Tensor,
        prompts: Option<&VisualPrompts>,
    ) -> Result<VisionOutput>;
    /// Encode images.
    fn encode_image(&self, pixel_values: &Tensor) -> Result<VisionOutput> {
        self.encode_image_with(pixel_values, None)
    }
    /// Hidden size `D` of the vision transformer.
    fn vision_hidden_size(&self) -> usize;
    /// Number of vision transformer layers.
    fn vision_num_layers(&self) -> usize;
    /// Input resolution (square).
    fn image_size(&self) -> usize;
    /// Switch batch-norm layers between batch statistics (`true`: pretraining) and running
    /// statistics (`false`, the default: inference and few-shot fine-tuning). Towers without
    /// batch norm ignore it.
    fn set_training(&self, _on: bool) {}
    /// Whether [`ImageEncoder::encode_image_with`] accepts [`VisualPrompts`] (a vision
    /// transformer; a convolutional tower has no token sequence to insert them into).
    fn supports_visual_prompts(&self) -> bool {
        true
    }
    /// The patch tokens of `out` mapped into the joint image-text space, `[B, N, E]`, the way
    /// the tower maps its pooled token (dense CLIP features as MaskCLIP uses them, Zhou et al.,
    /// ECCV 2022), or `None` for towers whose pooling has no per-token equivalent (attention
    /// pooling heads). Default: `None`.
    fn project_patch_tokens(&self, _out: &VisionOutput) -> Result<Option<Tensor>> {
        Ok(None)
    }
    /// The hidden states after the transformer blocks `layers` (counted from 1 as HF's
    /// `hidden_states[k]`: layer `k` is the output of the `k`-th block; the last layer is
    /// [`ImageEncoder::vision_num_layers`]), for dense heads that read several depths
    /// (CLIPSeg, Lüddecke & Ecker, CVPR 2022, reads layers 3, 6 and 9 of ViT-B/16's 12). Raw
    /// block outputs, before any final norm, without visual prompts; the same computation
    /// as [`ImageEncoder::encode_image`] up to the deepest layer asked, whose later blocks
    /// are not run. A layer 0 or beyond the tower's depth is an error
    /// ([`check_vision_layers`]). Default: an error (towers without a token sequence per
    /// block, such as the ResNets).
    fn encode_image_layers(
        &self,
        _pixel_values: &Tensor,
        _layers: &[usize],
    ) -> Result<VisionLayerStates> {
        Err(ModelError::invalid(
            "this image tower does not give the hidden states of its intermediate layers \
             (available for the vision transformers: CLIP, SigLIP, BiomedCLIP)",
        ))
    }
    /// Whether [`ImageEncoder::encode_image_windows`] is available.
    fn supports_image_windows(&self) -> bool {
        false
    }
    /// Embeddings in the joint space of windows of the patch grid, `[B, W, E]` (not
    /// normalised): for each window (a list of patch indices, row-major on the grid, all
    /// windows of one call the same size) the tower runs on its prefix tokens and the
    /// window's patch tokens only, each with its own position embedding, and pools and
    /// projects as for the whole image; patches outside the window do not take part
    /// (WinCLIP's window masking, Jeong et al., CVPR 2023, section 4.2: the transformer
    /// takes a subset of tokens, so one forward pass per window costs as many tokens as the
    /// window holds). A window of every patch gives [`ImageEncoder::encode_image`]'s
    /// `embeds`. Default: an error (towers without a token sequence).
    fn encode_image_windows(
        &self,
        _pixel_values: &Tensor,
        _windows: &[Vec<usize>],
    ) -> Result<Tensor> {
        Err(ModelError::invalid(
            "this image tower cannot encode windows of its patch grid (available for the \
             vision transformers with a class token: CLIP, BiomedCLIP)",
        ))
    }
}

/// A dual-encoder vision-language model.
pub trait VisionLanguageModel: ImageEncoder + TextEncoder + LinearLayers {
    /// The family.
    fn family(&self) -> Family;
    /// Dimension `E` of the shared embedding space.
    fn embed_dim(&self) -> usize;
    /// The learned temperature in log space (scalar tensor); logits use `exp()` of it.
    fn logit_scale(&self) -> Tensor;
    /// The learned logit bias (scalar tensor; SigLIP only).
    fn logit_bias(&self) -> Option<Tensor> {
        None
    }
    /// Compute device.
    fn device(&self) -> &Device;
    /// Compute dtype.
    fn dtype(&self) -> DType;

    /// `logits_per_image` `[N_img, N_txt]` = `exp(scale) · cos(img, txt) (+ bias)`,
    /// as HF `CLIPModel` / `SiglipModel` compute them.
    fn logits_per_image(&self, image_embeds: &Tensor, text_embeds: &Tensor) -> Result<Tensor> {
        let img = l2_normalize(image_embeds)?;
        let txt = l2_normalize(text_embeds)?;
        let scale = self.logit_scale().exp()?.to_dtype(img.dtype())?;
        let mut logits = img.matmul(&txt.t()?)?.broadcast_mul(&scale)?;
        if let Some(b) = self.logit_bias() {
            logits = logits.broadcast_add(&b.to_dtype(logits.dtype())?)?;
        }
        Ok(logits)
    }
}

/// `x / ||x||` along the last dimension; a zero row stays zero (the norm is floored at
/// 1e-12, which leaves every other row exactly as the plain division would).
pub fn l2_normalize(x: &Tensor) -> Result<Tensor> {
    let norm = x
        .sqr()?
        .sum_keepdim(D::Minus1)?
        .sqrt()?
        .clamp(1e-12, f64::MAX)?;
    Ok(x.broadcast_div(&norm)?)
}

fn batch_prompt(p: &Tensor, batch: usize, what: &str) -> Result<Tensor> {
    match p.rank() {
        2 => {
            let (n, d) = p.dims2()?;
            Ok(p.unsqueeze(0)?.broadcast_as((batch, n, d))?)
        }
        3 if p.dim(0)? == batch => Ok(p.clone()),
        _ => Err(ModelError::invalid(format!(
            "{what}: expected [P, D] or [{batch}, P, D], got {:?}",
            p.dims()
        ))),
    }
}

/// Replace `embeds[:, positions[i]]` by `prompt.vectors[.., i, :]` (differentiable
/// with respect to the vectors). `embeds` is `[B, L, D]`.
pub fn apply_text_prompt(embeds: &Tensor, prompt: &TextPrompt) -> Result<Tensor> {
    let (b, l, d) = embeds.dims3()?;
    let vectors =
        batch_prompt(&prompt.vectors, b, "text prompt vectors")?.to_dtype(embeds.dtype())?;
    let (_, p, vd) = vectors.dims3()?;
    if p != prompt.positions.len() || vd != d {
        return Err(ModelError::invalid(format!(
            "text prompt: {} positions and hidden size {d}, but vectors are {:?}",
            prompt.positions.len(),
            prompt.vectors.dims()
        )));
    }
    if prompt.positions.windows(2).any(|w| w[0] >= w[1]) {
        return Err(ModelError::invalid(
            "text prompt positions must be strictly increasing",
        ));
    }
    if let Some(&last) = prompt.positions.last() {
        if last >= l {
            return Err(ModelError::invalid(format!(
                "text prompt position {last} is outside the sequence of length {l}"
            )));
        }
    }
    let mut pieces = Vec::with_capacity(2 * p + 1);
    let mut cur = 0;
    for (i, &pos) in prompt.positions.iter().enumerate() {
        if pos > cur {
            pieces.push(embeds.narrow(1, cur, pos - cur)?);
        }
        pieces.push(vectors.narrow(1, i, 1)?);
        cur = pos + 1;
    }
    if cur < l {
        pieces.push(embeds.narrow(1, cur, l - cur)?);
    }
    Ok(Tensor::cat(&pieces, 1)?)
}

/// Insert prompt tokens `[N, D]` or `[B, N, D]` into `x` `[B, T, D]` at index `at`.
pub fn insert_prompt_tokens(x: &Tensor, prompts: &Tensor, at: usize) -> Result<Tensor> {
    let (b, t, d) = x.dims3()?;
    let p = batch_prompt(prompts, b, "visual prompts")?.to_dtype(x.dtype())?;
    if p.dim(2)? != d || at > t {
        return Err(ModelError::invalid(format!(
            "visual prompts {:?} do not fit a sequence {:?} at index {at}",
            prompts.dims(),
            x.dims()
        )));
    }
    Ok(Tensor::cat(
        &[&x.narrow(1, 0, at)?, &p, &x.narrow(1, at, t - at)?],
        1,
    )?)
}

/// Replace the `n` tokens of `x` `[B, T, D]` starting at `at` by `prompts`
/// (`[n, D]` or `[B, n, D]`): VPT-deep between layers.
pub fn replace_prompt_tokens(x: &Tensor, prompts: &Tensor, at: usize, n: usize) -> Result<Tensor> {
    let (b, t, _) = x.dims3()?;
    let p = batch_prompt(prompts, b, "deep visual prompts")?.to_dtype(x.dtype())?;
    if p.dim(1)? != n || at + n > t {
        return Err(ModelError::invalid(format!(
            "deep visual prompts {:?} must have {n} tokens (sequence {:?})",
            prompts.dims(),
            x.dims()
        )));
    }
    Ok(Tensor::cat(
        &[&x.narrow(1, 0, at)?, &p, &x.narrow(1, at + n, t - at - n)?],
        1,
    )?)
}

#[cfg(test)]
mod tests {
    #[test]
    fn l2_normalize_gives_unit_rows_and_keeps_a_zero_row_zero() -> Result<()> {
        let x = Tensor::new(&[[3f32, 4.0], [0.0, 0.0]], &Device::Cpu)?;
        let y = l2_normalize(&x)?.to_vec2::<f32>()?;
        assert_eq!(y, vec![vec![0.6, 0.8], vec![0.0, 0.0]]);
        Ok(())
    }

    use super::*;

    #[test]
    fn text_prompt_replaces_exact_positions() -> Result<()> {
        let dev = Device::Cpu;
        let e = Tensor::arange(0f32, 2. * 5. * 3., &dev)?.reshape((2, 5, 3))?;
        let v = Tensor::new(&[[-1f32, -1., -1.], [-2., -2., -2.]], &dev)?;
        let out = apply_text_prompt(
            &e,
            &TextPrompt {
                positions: vec![1, 4],
                vectors: v,
            },
        )?;
        let o: Vec<Vec<Vec<f32>>> = out.to_vec3()?;
        let base: Vec<Vec<Vec<f32>>> = e.to_vec3()?;
        for b in 0..2 {
            assert_eq!(o[b][0], base[b][0]);
            assert_eq!(o[b][1], vec![-1.; 3]);
            assert_eq!(o[b][2], base[b][2]);
            assert_eq!(o[b][3], base[b][3]);
            assert_eq!(o[b][4], vec![-2.; 3]);
        }
        assert!(apply_text_prompt(
            &e,
            &TextPrompt {
                positions: vec![5],
                vectors: Tensor::zeros((1, 3), DType::F32, &dev)?
            }
        )
        .is_err());
        Ok(())
    }

    #[test]
    fn prompt_tokens_insert_and_replace() -> Result<()> {
        let dev = Device::Cpu;
        let x = Tensor::arange(0f32, 4. * 2., &dev)?.reshape((1, 4, 2))?;
        let p = Tensor::new(&[[9f32, 9.], [8., 8.]], &dev)?;
        let y = insert_prompt_tokens(&x, &p, 1)?;
        assert_eq!(
            y.to_vec3::<f32>()?[0],
            vec![
                vec![0., 1.],
                vec![9., 9.],
                vec![8., 8.],
                vec![2., 3.],
                vec![4., 5.],
                vec![6., 7.]
            ]
        );
        let q = Tensor::new(&[[7f32, 7.], [6., 6.]], &dev)?;
        let z = replace_prompt_tokens(&y, &q, 1, 2)?;
        assert_eq!(z.to_vec3::<f32>()?[0][1], vec![7., 7.]);
        assert_eq!(z.to_vec3::<f32>()?[0][2], vec![6., 6.]);
        assert_eq!(z.to_vec3::<f32>()?[0][3], vec![2., 3.]);
        Ok(())
    }
}
