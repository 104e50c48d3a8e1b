//! Report generation as a task: image-report pairs from a manifest, a frozen image tower's
//! embeddings, the ClipCap-style generator of [`crate::report_generation`] trained on them,
//! the saved generator folder, evaluation beside the nearest-neighbour-report baseline, and
//! generation for image files.
//!
//! Protocol ([`evaluate`]): every record of the evaluated manifest (or split) gets one
//! generated report (greedy by default, or beam search), scored against its one reference
//! report with BLEU-1..4, ROUGE-L and CIDEr-D ([`medvlm_eval::report_metrics`], as
//! pycocoevalcap computes them) and with clinical efficacy ([`medvlm_eval::report_labeller`]:
//! the findings a rule labeller reads as present, uncertain mentions counted present,
//! precision/recall/F1 per finding, micro and macro over the lexicon's findings), overall and
//! per modality. The lexicon is the phantom vocabulary unless a JSON
//! [`FindingLexicon`] is given. The baseline writes, for each image, the training report of
//! the training image whose embedding is nearest by cosine (the retrieval baseline of report
//! generation papers); it shares the generator's embeddings, so the comparison is of the
//! decoder, not of the tower.
//!
//! Artefact folder ([`ReportModel::save`], written to a temporary folder and renamed):
//! `report_model.json` (the card: settings, the image model's spec and fingerprint, the
//! training record), `generator.safetensors` (`mapper.*` and the decoder under
//! `decoder.transformer.*`, GPT-2's layout), `tokenizer.json`, and for the baseline
//! `train_embeddings.safetensors` and `train_reports.json`; with a diagnosis prompt also
//! `findings.safetensors` (the findings classifier of [`crate::report_findings`]; its
//! thresholds and the lexicon are in the card).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use medvlm_eval::report_labeller::{
    clinical_efficacy, ClinicalEfficacy, FindingLexicon, FindingTerms,
};
use medvlm_eval::report_metrics::{score_reports, ReportScores};
use medvlm_models::LoadedModel;
use serde::{Deserialize, Serialize};

use crate::card::read_json_card;
use crate::report_findings::{
    load_findings, train_findings, FindingsCard, FindingsClassifier, FindingsConfig,
};
use crate::report_generation::{
    train_generator_prompted, PromptGuidance, ReportError, ReportGenConfig, ReportGenerator,
    Result, EOS_ID,
};

/// Format tag of the card.
pub const FORMAT: &str = "medvlm-report/1";
const CARD_FILE: &str = "report_model.json";
const WEIGHTS_FILE: &str = "generator.safetensors";
const TOKENIZER_FILE: &str = "tokenizer.json";
const TRAIN_EMBEDS_FILE: &str = "train_embeddings.safetensors";
const TRAIN_REPORTS_FILE: &str = "train_reports.json";
const FINDINGS_FILE: &str = "findings.safetensors";

fn file_err(path: &Path, reason: impl std::fmt::Display) -> ReportError {
    ReportError::File {
        path: path.to_path_buf(),
        reason: reason.to_string(),
    }
}

/// One image and its report.
#[derive(Debug, Clone, PartialEq)]
pub struct ReportItem {
    /// The image file.
    pub image: PathBuf,
    /// The reference report.
    pub report: String,
    /// The record's `modality`, when given.
    pub modality: Option<String>,
}

/// Image-report pairs read from a manifest.
#[derive(Debug, Clone)]
pub struct ReportTask {
    /// The manifest.
    pub manifest: PathBuf,
    /// The pairs, in manifest order.
    pub items: Vec<ReportItem>,
}

impl ReportTask {
    /// Each record's `modality`, in order.
    pub fn modalities(&self) -> Vec<Option<String>> {
        self.items.iter().map(|i| i.modality.clone()).collect()
    }

    /// The records of `manifest` (those of `split` when given); each must carry a non-empty
    /// `text` (the report), otherwise the error names the record.
    pub fn from_manifest(manifest: &Path, split: Option<&str>) -> Result<Self> {
        let m = medvlm_io::read_manifest(manifest).map_err(|e| file_err(manifest, e))?;
        let mut items = Vec::new();
        for (i, rec) in m.records.iter().enumerate() {
            if split.is_some_and(|s| rec.split.as_deref() != Some(s)) {
                continue;
            }
            let report = rec.text.as_deref().map(str::trim).unwrap_or("");
            if report.is_empty() {
                return Err(file_err(
                    manifest,
                    format!(
                        "record {} ({}) has no report text; report generation needs a `text` on every record",
                        i + 1,
                        rec.image
                    ),
                ));
            }
            items.push(ReportItem {
                image: m.image_path(rec),
                report: report.to_string(),
                modality: rec
                    .extra
                    .get("modality")
                    .and_then(|v| v.as_str())
                    .map(str::to_string),
            });
        }
        if items.is_empty() {
            return Err(file_err(
                manifest,
                match split {
                    Some(s) => format!("no record of split {s:?}"),
                    None => "no records".to_string(),
                },
            ));
        }
        Ok(Self {
            manifest: manifest.to_path_buf(),
            items,
        })
    }
}

/// L2-normalised image embeddings `[N, E]` of files with a loaded model (every file must be
/// readable: an unreadable one is an error naming it).
pub fn image_embeddings(m: &LoadedModel, files: &[PathBuf], device: &Device) -> Result<Tensor> {
    let e = medvlm_models::embed::embed_image_files(m, files, 32, false, device, &|_| {})?;
    let t = e
        .embeds
        .ok_or_else(|| ReportError::Invalid("no image could be embedded".into()))?;
    Ok(medvlm_models::vlm::l2_normalize(&t)?.to_device(device)?)
}

/// What a generator reads of image files, from one pass of the tower: the L2-normalised
/// embeddings `[N, E]` and, when `findings_grid` is given (a diagnosis prompt), the findings
/// classifier's inputs: the embeddings alone (grid 0) or the features of
/// [`crate::vqa_pipeline::image_features`] (the same embeddings, then the patch tokens pooled
/// on a `grid x grid` grid).
fn read_image_inputs(
    m: &LoadedModel,
    files: &[PathBuf],
    findings_grid: Option<usize>,
    device: &Device,
) -> Result<ImageInputs> {
    match findings_grid {
        None => Ok(ImageInputs {
            embeds: image_embeddings(m, files, device)?,
            findings: None,
        }),
        Some(0) => {
            let embeds = image_embeddings(m, files, device)?;
            Ok(ImageInputs {
                findings: Some(embeds.clone()),
                embeds,
            })
        }
        Some(grid) => {
            let features =
                crate::vqa_pipeline::image_features(m, files, grid, device).map_err(|e| {
                    ReportError::Invalid(format!(
                        "the findings classifier's inputs: {e} (for the report generator: `--findings-grid 0`)"
                    ))
                })?;
            Ok(ImageInputs {
                embeds: features.narrow(1, 0, m.model.embed_dim())?.contiguous()?,
                findings: Some(features),
            })
        }
    }
}

/// Text of word tokens as a report: punctuation attached to its word, hyphens and `&`
/// joining theirs (`t1 - weighted` -> `t1-weighted`).
pub fn detokenize(words: &[String]) -> String {
    let mut out = String::new();
    let mut glue_next = true;
    for w in words {
        let attach_left = matches!(w.as_str(), "." | "," | ":" | ";" | "!" | "?" | ")");
        let joiner = matches!(w.as_str(), "-" | "&" | "/" | "'");
        if !(glue_next || attach_left || joiner) {
            out.push(' ');
        }
        out.push_str(w);
        glue_next = joiner || w == "(";
    }
    out
}

/// The phantom vocabulary's findings (every modality) as a labeller lexicon. Each finding is
/// labelled `modality/finding` and read only in reports of its modality: the brain tumour and
/// the histology tumour share terms, as do the chest mass and the brain tumour's "mass".
pub fn phantom_lexicon() -> FindingLexicon {
    FindingLexicon {
        findings: medvlm_phantoms::Modality::ALL
            .iter()
            .flat_map(|&m| modality_terms(m, true))
            .collect(),
    }
}

fn phantom_modality_lexicon(name: &str) -> Option<FindingLexicon> {
    let m = medvlm_phantoms::Modality::ALL
        .into_iter()
        .find(|m| m.name() == name)?;
    Some(FindingLexicon {
        findings: modality_terms(m, false),
    })
}

/// The findings of modality `m`; `scoped`: labelled `modality/finding` and read only in its
/// reports.
fn modality_terms(m: medvlm_phantoms::Modality, scoped: bool) -> Vec<FindingTerms> {
    m.vocab()
        .iter()
        .map(|v| FindingTerms {
            label: if scoped {
                format!("{}/{}", m.name(), v.label)
            } else {
                v.label.to_string()
            },
            match_terms: v.match_terms.iter().map(|t| t.to_string()).collect(),
            modality: scoped.then(|| m.name().to_string()),
        })
        .collect()
}

/// What the saved generator records of its training.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReportCard {
    /// [`FORMAT`].
    pub format: String,
    /// The image model as given (`--model`).
    pub model_spec: String,
    /// Fingerprint of the image model's folder.
    pub model_fingerprint: String,
    /// Width of its image embeddings.
    pub image_dim: usize,
    /// Vocabulary size of the tokenizer.
    pub vocab_size: usize,
    /// Generator settings.
    pub config: ReportGenConfig,
    /// The training manifest and split.
    pub train_manifest: String,
    /// Split used, if any.
    pub train_split: Option<String>,
    /// Training reports.
    pub n_train: usize,
    /// Reports cut to `max_tokens`.
    pub n_truncated: usize,
    /// Mean loss of each epoch.
    pub epoch_losses: Vec<f32>,
    /// The diagnosis prompt's findings classifier (absent without a prompt).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub findings: Option<FindingsCard>,
    /// The lexicon whose findings the prompt states (with a prompt only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lexicon: Option<FindingLexicon>,
}

/// How reports are decoded.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub enum Decoding {
    /// Greedy (batched).
    Greedy,
    /// Beam search with this many beams.
    Beam(usize),
    /// Greedy, with the report's end held until it states every finding the diagnosis
    /// prompt calls present ([`ReportGenerator::generate_greedy_held`]; read by the
    /// labeller in the finding's own modality), and with `guidance` > 0 each step's
    /// log-probabilities guided towards the prompt against an all-absent prompt
    /// ([`crate::report_generation::PromptGuidance`]). Needs a generator with a diagnosis
    /// prompt.
    GreedyFaithful {
        /// Classifier-free guidance scale (0: none).
        guidance: f64,
    },
}

/// What a generator reads of a set of images ([`ReportModel::image_inputs`]).
pub struct ImageInputs {
    /// L2-normalised image embeddings `[N, E]` (the decoder's prefix and the baseline).
    pub embeds: Tensor,
    /// The findings classifier's inputs `[N, F_in]` (with a diagnosis prompt only).
    pub findings: Option<Tensor>,
}

/// A trained generator with its tokenizer and baseline memory.
pub struct ReportModel {
    /// The card.
    pub card: ReportCard,
    /// The generator.
    pub generator: ReportGenerator,
    /// The word tokenizer.
    pub tokenizer: tokenizers::Tokenizer,
    /// Training image embeddings `[N, E]` (L2-normalised) for the baseline.
    pub train_embeds: Tensor,
    /// Their reports.
    pub train_reports: Vec<String>,
    /// The diagnosis prompt's findings classifier (with a prompt only).
    pub findings: Option<FindingsClassifier>,
    /// The generator's parameters by name (what `generator.safetensors` holds).
    weights: HashMap<String, Tensor>,
    /// The findings classifier's tensors (what `findings.safetensors` holds).
    findings_tensors: Option<HashMap<String, Tensor>>,
}

/// Settings of [`train`].
#[derive(Debug, Clone)]
pub struct ReportTrainOptions {
    /// Image model spec (`medvlm_models::load_model`).
    pub model_spec: String,
    /// Generator settings.
    pub config: ReportGenConfig,
    /// Split of the manifest to train on (`None`: every record).
    pub split: Option<String>,
    /// Condition the decoder on a diagnosis prompt (PromptMRG; see
    /// [`crate::report_generation::ReportGenerator`]) with this findings classifier's
    /// settings; `None`: no prompt.
    pub diagnosis_prompt: Option<FindingsConfig>,
    /// The findings the prompt states; `None`: the phantom vocabulary.
    pub lexicon: Option<FindingLexicon>,
}

/// The findings `text`, a report of `modality`, states as present or uncertain (1.0) or not
/// (0.0), in lexicon order: what clinical efficacy counts as a positive (uncertain mentions
/// count as present).
pub fn stated_findings(text: &str, lexicon: &FindingLexicon, modality: Option<&str>) -> Vec<f32> {
    medvlm_eval::report_labeller::findings_present(text, lexicon, modality, true)
        .into_iter()
        .map(|p| f32::from(u8::from(p)))
        .collect()
}

/// Token ids of a report: its words then EOS, cut to `max_tokens` (the cut keeps EOS).
pub fn encode_report(
    tok: &tokenizers::Tokenizer,
    text: &str,
    max_tokens: usize,
) -> Result<(Vec<u32>, bool)> {
    let enc = tok
        .encode(text, false)
        .map_err(|e| ReportError::Invalid(format!("tokenizer: {e}")))?;
    let mut ids = enc.get_ids().to_vec();
    let cut = ids.len() + 1 > max_tokens;
    ids.truncate(max_tokens - 1);
    ids.push(EOS_ID);
    Ok((ids, cut))
}

/// Trains a generator on `task` with the image model `m` (loaded from `opts.model_spec`);
/// `on_epoch(epoch, loss)` after each epoch.
pub fn train(
    task: &ReportTask,
    m: &LoadedModel,
    opts: &ReportTrainOptions,
    device: &Device,
    on_epoch: &mut dyn FnMut(usize, f32),
) -> Result<ReportModel> {
    opts.config.validate()?;
    let files: Vec<PathBuf> = task.items.iter().map(|i| i.image.clone()).collect();
    let grid = opts.diagnosis_prompt.as_ref().map(|f| f.image_grid);
    let ImageInputs { embeds, findings } = read_image_inputs(m, &files, grid, device)?;
    let texts: Vec<&str> = task.items.iter().map(|i| i.report.as_str()).collect();
    let tokenizer =
        medvlm_train::pretrain::build_word_tokenizer(&texts, opts.config.min_word_count)
            .map_err(|e| ReportError::Invalid(e.to_string()))?;
    let mut reports = Vec::with_capacity(texts.len());
    let mut n_truncated = 0;
    for t in &texts {
        let (ids, cut) = encode_report(&tokenizer, t, opts.config.max_tokens)?;
        n_truncated += usize::from(cut);
        reports.push(ids);
    }
    let vocab = tokenizer.get_vocab_size(true);
    let mut config = opts.config.clone();
    let mut prompt = None;
    if let (Some(fcfg), Some(features)) = (&opts.diagnosis_prompt, &findings) {
        let lexicon = opts.lexicon.clone().unwrap_or_else(phantom_lexicon);
        let f = lexicon.findings.len();
        let modalities = task.modalities();
        lexicon
            .check_modalities(&modalities, texts.len())
            .map_err(|e| file_err(&task.manifest, e))?;
        let targets: Vec<f32> = texts
            .iter()
            .zip(&modalities)
            .flat_map(|(t, m)| stated_findings(t, &lexicon, m.as_deref()))
            .collect();
        if !targets.iter().any(|&v| v > 0.0) {
            return Err(ReportError::Invalid(format!(
                "the diagnosis prompt's lexicon ({f} findings: {}) finds no finding stated in \
                 any training report of {}; give the lexicon of these reports or train without \
                 the prompt",
                lexicon
                    .findings
                    .iter()
                    .take(5)
                    .map(|t| t.label.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
                    + if f > 5 { ", ..." } else { "" },
                task.manifest.display()
            )));
        }
        let y = Tensor::from_vec(targets, (texts.len(), f), device)?;
        let labels: Vec<String> = lexicon.findings.iter().map(|t| t.label.clone()).collect();
        let classifier = train_findings(fcfg, features, &y, &labels)?;
        // Training feeds the states the reference reports state (teacher forcing of the
        // prompt); generation feeds the classifier's.
        let states = y.to_dtype(DType::U32)?;
        config.findings = f;
        prompt = Some((lexicon, classifier, states));
    }
    let trained = train_generator_prompted(
        &config,
        &embeds,
        prompt.as_ref().map(|(_, _, s)| s),
        &reports,
        vocab,
        on_epoch,
    )?;
    let card = ReportCard {
        format: FORMAT.into(),
        model_spec: opts.model_spec.clone(),
        model_fingerprint: crate::segmentation_pipeline::model_fingerprint(&opts.model_spec, m),
        image_dim: embeds.dim(1)?,
        vocab_size: vocab,
        config,
        train_manifest: task.manifest.display().to_string(),
        train_split: opts.split.clone(),
        n_train: reports.len(),
        n_truncated,
        epoch_losses: trained.epoch_losses.clone(),
        findings: prompt.as_ref().map(|(_, c, _)| c.card.clone()),
        lexicon: prompt.as_ref().map(|(l, _, _)| l.clone()),
    };
    let (findings, findings_tensors) = match prompt {
        Some((_, c, _)) => (Some(c.classifier), Some(c.tensors)),
        None => (None, None),
    };
    Ok(ReportModel {
        card,
        generator: trained.generator,
        tokenizer,
        train_embeds: embeds,
        train_reports: texts.iter().map(|s| s.to_string()).collect(),
        findings,
        weights: medvlm_models::model_dir::varmap_tensors(&trained.varmap)?,
        findings_tensors,
    })
}

impl ReportModel {
    /// Writes the artefact folder `out` (see the module documentation), replacing an earlier
    /// one only once the new one is complete.
    pub fn save(&self, out: &Path) -> Result<()> {
        medvlm_io::atomic::write_dir_atomic(
            out,
            |tmp: &Path| -> Result<()> {
                let card =
                    serde_json::to_string_pretty(&self.card).map_err(|e| file_err(out, e))?;
                std::fs::write(tmp.join(CARD_FILE), card)
                    .map_err(|e| file_err(&tmp.join(CARD_FILE), e))?;
                candle_core::safetensors::save(&self.weights, tmp.join(WEIGHTS_FILE))?;
                if let Some(t) = &self.findings_tensors {
                    candle_core::safetensors::save(t, tmp.join(FINDINGS_FILE))?;
                }
                self.tokenizer
                    .save(tmp.join(TOKENIZER_FILE), false)
                    .map_err(|e| file_err(&tmp.join(TOKENIZER_FILE), e))?;
                let mut te = HashMap::new();
                te.insert(
                    "embeddings".to_string(),
                    self.train_embeds.to_device(&Device::Cpu)?,
                );
                candle_core::safetensors::save(&te, tmp.join(TRAIN_EMBEDS_FILE))?;
                let reports =
                    serde_json::to_string(&self.train_reports).map_err(|e| file_err(out, e))?;
                std::fs::write(tmp.join(TRAIN_REPORTS_FILE), reports)
                    .map_err(|e| file_err(&tmp.join(TRAIN_REPORTS_FILE), e))?;
                Ok(())
            },
            file_err,
        )
    }

    /// Loads an artefact folder and its image model; the second value is a warning when the
    /// image model's fingerprint differs from the card's.
    pub fn load(dir: &Path, device: &Device) -> Result<(Self, LoadedModel, Option<String>)> {
        let card: ReportCard = read_json_card(
            dir,
            CARD_FILE,
            FORMAT,
            "report generator",
            |c: &ReportCard| c.format.as_str(),
            file_err,
        )?;
        let tok_path = dir.join(TOKENIZER_FILE);
        let tokenizer =
            tokenizers::Tokenizer::from_file(&tok_path).map_err(|e| file_err(&tok_path, e))?;
        if tokenizer.get_vocab_size(true) != card.vocab_size {
            return Err(file_err(
                &tok_path,
                format!(
                    "{} tokens, the decoder was trained for {}",
                    tokenizer.get_vocab_size(true),
                    card.vocab_size
                ),
            ));
        }
        let wpath = dir.join(WEIGHTS_FILE);
        let file = medvlm_models::WeightFile::open(&wpath)?;
        let generator = file.load(
            DType::F32,
            device,
            &medvlm_models::LoadMode::Frozen,
            &[],
            |vb: VarBuilder| {
                ReportGenerator::new(vb, &card.config, card.image_dim, card.vocab_size)
                    .map_err(|e| candle_core::Error::msg(e.to_string()))
            },
        )?;
        // Kept for re-saving: read from the file already open, not a second time from disk.
        let names: Vec<String> = file.tensors().map(|(n, _, _)| n.to_string()).collect();
        let mut weights = HashMap::with_capacity(names.len());
        for n in names {
            let t = file.tensor(&n, DType::F32, device)?;
            weights.insert(n, t);
        }
        let epath = dir.join(TRAIN_EMBEDS_FILE);
        let train_embeds = candle_core::safetensors::load(&epath, device)
            .map_err(|e| file_err(&epath, e))?
            .remove("embeddings")
            .ok_or_else(|| file_err(&epath, "no `embeddings` tensor"))?;
        let rpath = dir.join(TRAIN_REPORTS_FILE);
        let train_reports: Vec<String> = serde_json::from_str(
            &std::fs::read_to_string(&rpath).map_err(|e| file_err(&rpath, e))?,
        )
        .map_err(|e| file_err(&rpath, e))?;
        if train_reports.len() != train_embeds.dim(0)? {
            return Err(file_err(
                &rpath,
                "not as many reports as training embeddings",
            ));
        }
        let (findings, findings_tensors) = match &card.findings {
            None => (None, None),
            Some(fc) => {
                let fpath = dir.join(FINDINGS_FILE);
                let tensors = candle_core::safetensors::load(&fpath, device)
                    .map_err(|e| file_err(&fpath, e))?;
                if fc.labels.len() != card.config.findings {
                    return Err(file_err(
                        &dir.join(CARD_FILE),
                        format!(
                            "the findings classifier names {} findings, the decoder's prompt {}",
                            fc.labels.len(),
                            card.config.findings
                        ),
                    ));
                }
                // The classifier's card names its findings so it stands alone; in a report
                // card they must be the prompt lexicon's, in its order, or the prompt would
                // state one finding under another's name.
                let lexicon_labels: Option<Vec<&str>> = card
                    .lexicon
                    .as_ref()
                    .map(|l| l.findings.iter().map(|f| f.label.as_str()).collect());
                let ok = match &lexicon_labels {
                    Some(l) => l.iter().copied().eq(fc.labels.iter().map(|s| s.as_str())),
                    None => false,
                };
                if !ok {
                    return Err(file_err(
                        &dir.join(CARD_FILE),
                        format!(
                            "the findings classifier's findings ({}) are not the prompt lexicon's ({})",
                            fc.labels.join(", "),
                            lexicon_labels.map_or("no lexicon".into(), |l| l.join(", "))
                        ),
                    ));
                }
                let c =
                    load_findings(tensors.clone(), fc, device).map_err(|e| file_err(&fpath, e))?;
                (Some(c), Some(tensors))
            }
        };
        let lopts = medvlm_models::LoadOptions {
            device: device.clone(),
            ..Default::default()
        };
        let m = medvlm_models::load_model(&card.model_spec, &lopts)?;
        let fp = crate::segmentation_pipeline::model_fingerprint(&card.model_spec, &m);
        let warning = (fp != card.model_fingerprint).then(|| {
            format!(
                "the image model {} is not the one the generator was trained with (fingerprint differs)",
                card.model_spec
            )
        });
        Ok((
            Self {
                card,
                generator,
                tokenizer,
                train_embeds,
                train_reports,
                findings,
                weights,
                findings_tensors,
            },
            m,
            warning,
        ))
    }

    /// What the generator reads of image files (one pass of the tower): the L2-normalised
    /// embeddings `[N, E]` and, with a diagnosis prompt, the findings classifier's inputs
    /// (see [`crate::report_findings::FindingsConfig::image_grid`]).
    pub fn image_inputs(
        &self,
        m: &LoadedModel,
        files: &[PathBuf],
        device: &Device,
    ) -> Result<ImageInputs> {
        let grid = self.card.findings.as_ref().map(|f| f.config.image_grid);
        read_image_inputs(m, files, grid, device)
    }

    /// The diagnosis prompt's finding states `[N, F]` for image inputs (`None` without a
    /// prompt).
    pub fn prompt_states(&self, inputs: &ImageInputs) -> Result<Option<Tensor>> {
        match (&self.findings, &inputs.findings) {
            (Some(c), Some(x)) => Ok(Some(c.states(x)?)),
            (None, _) => Ok(None),
            (Some(_), None) => Err(ReportError::Invalid(
                "this generator's diagnosis prompt needs the findings classifier's inputs".into(),
            )),
        }
    }

    /// Reports for image inputs ([`Self::image_inputs`]).
    pub fn generate_for(&self, inputs: &ImageInputs, decoding: Decoding) -> Result<Vec<String>> {
        let states = self.prompt_states(inputs)?;
        self.decode(&inputs.embeds, states.as_ref(), decoding)
    }

    fn decode(
        &self,
        embeds: &Tensor,
        states: Option<&Tensor>,
        decoding: Decoding,
    ) -> Result<Vec<String>> {
        if embeds.dim(1)? != self.card.image_dim {
            return Err(ReportError::Invalid(format!(
                "image embeddings are {} wide; the generator reads {}",
                embeds.dim(1)?,
                self.card.image_dim
            )));
        }
        let max = self.card.config.max_tokens;
        let ids: Vec<Vec<u32>> = match decoding {
            Decoding::Greedy => {
                let mut out = Vec::new();
                for start in (0..embeds.dim(0)?).step_by(64) {
                    let n = 64.min(embeds.dim(0)? - start);
                    let st = states.map(|s| s.narrow(0, start, n)).transpose()?;
                    out.extend(self.generator.generate_greedy_prompted(
                        &embeds.narrow(0, start, n)?,
                        st.as_ref(),
                        max,
                    )?);
                }
                out
            }
            Decoding::GreedyFaithful { guidance } => {
                if !(guidance >= 0.0 && guidance.is_finite()) {
                    return Err(ReportError::Invalid(format!(
                        "guidance scale {guidance} must be a finite number >= 0 (0: none)"
                    )));
                }
                let (Some(states), Some(lexicon)) = (states, self.card.lexicon.as_ref()) else {
                    return Err(ReportError::Invalid(
                        "faithful decoding holds a report to its diagnosis prompt; this \
                         generator was trained without one (--no-diagnosis-prompt)"
                            .into(),
                    ));
                };
                let mut out = Vec::new();
                for start in (0..embeds.dim(0)?).step_by(64) {
                    let n = 64.min(embeds.dim(0)? - start);
                    let st = states.narrow(0, start, n)?;
                    let prompted = st.to_vec2::<u32>()?;
                    let mut may_end =
                        |i: usize, ids: &[u32]| self.states_prompt(ids, &prompted[i], lexicon);
                    let none = st.zeros_like()?;
                    let guide = (guidance > 0.0).then_some(PromptGuidance {
                        contrast_states: &none,
                        scale: guidance,
                    });
                    out.extend(self.generator.generate_greedy_held(
                        &embeds.narrow(0, start, n)?,
                        Some(&st),
                        guide,
                        max,
                        &mut may_end,
                    )?);
                }
                out
            }
            Decoding::Beam(k) => (0..embeds.dim(0)?)
                .map(|i| {
                    let st = states.map(|s| s.get(i)).transpose()?;
                    self.generator
                        .generate_beam_prompted(&embeds.get(i)?, st.as_ref(), k, max)
                })
                .collect::<Result<_>>()?,
        };
        Ok(ids.iter().map(|t| self.detok(t)).collect())
    }

    /// Whether the report `ids` states every finding the prompt row `prompted` calls
    /// present, each read in its own modality (a finding without one, in any report): the
    /// report is labelled once per modality among those findings.
    fn states_prompt(&self, ids: &[u32], prompted: &[u32], lexicon: &FindingLexicon) -> bool {
        let text = self.detok(ids);
        let mut read: Vec<(Option<&str>, Vec<bool>)> = Vec::new();
        lexicon
            .findings
            .iter()
            .zip(prompted)
            .enumerate()
            .filter(|(_, (_, &s))| s == 1)
            .all(|(k, (f, _))| {
                let modality = f.modality.as_deref();
                let i = match read.iter().position(|(m, _)| *m == modality) {
                    Some(i) => i,
                    None => {
                        let labels = medvlm_eval::report_labeller::findings_present(
                            &text, lexicon, modality, true,
                        );
                        read.push((modality, labels));
                        read.len() - 1
                    }
                };
                read[i].1[k]
            })
    }

    fn detok(&self, ids: &[u32]) -> String {
        // Ids 0-3 are the word tokenizer's padding, start, unknown and end tokens: a report
        // shows none of them (an unknown word, e.g. a measurement seen once, is left out).
        let words: Vec<String> = ids
            .iter()
            .filter(|&&i| i > EOS_ID)
            .filter_map(|&i| self.tokenizer.id_to_token(i))
            .collect();
        detokenize(&words)
    }

    /// The nearest-neighbour baseline: for each embedding `[N, E]`, the training report of
    /// the training image with the highest cosine.
    pub fn nearest_reports(&self, embeds: &Tensor) -> Result<Vec<String>> {
        let sims = embeds.matmul(&self.train_embeds.t()?)?;
        let best = sims.argmax(1)?.to_vec1::<u32>()?;
        Ok(best
            .into_iter()
            .map(|i| self.train_reports[i as usize].clone())
            .collect())
    }
}

/// Scores of one set of generated reports.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReportMetrics {
    /// BLEU, ROUGE-L, CIDEr-D.
    pub language: ReportScores,
    /// Clinical efficacy over the whole lexicon.
    pub clinical: ClinicalEfficacy,
    /// Per modality: clinical efficacy over that modality's findings (phantom lexicon) or the
    /// whole lexicon, and the language scores.
    pub per_modality: BTreeMap<String, (ReportScores, ClinicalEfficacy)>,
}

/// One example of the evaluation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReportExample {
    /// Image file.
    pub image: String,
    /// Reference report.
    pub reference: String,
    /// Generated report.
    pub generated: String,
    /// The nearest-neighbour report.
    pub nearest_neighbour: String,
}

/// The evaluation of a generator on a task.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReportEvaluation {
    /// The manifest evaluated.
    pub manifest: String,
    /// Reports scored.
    pub n: usize,
    /// How reports were decoded.
    pub decoding: Decoding,
    /// The generator.
    pub generated: ReportMetrics,
    /// The nearest-neighbour-report baseline.
    pub nearest_neighbour: ReportMetrics,
    /// The first few examples.
    pub examples: Vec<ReportExample>,
    /// With a diagnosis prompt: how good its decisions were and how faithfully the reports
    /// followed them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub diagnosis_prompt: Option<PromptEvaluation>,
}

/// The diagnosis prompt's part of an evaluation, over the prompt's lexicon (the card's).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PromptEvaluation {
    /// The findings classifier's decisions scored as clinical efficacy against the findings
    /// the reference reports state: the most the reports could reach if they stated exactly
    /// what the prompt said.
    pub classifier: ClinicalEfficacy,
    /// Share of (report, finding) pairs where the labeller reads in the generated report what
    /// the prompt said (present or not).
    pub agreement: f64,
    /// Findings the prompt called present.
    pub prompted_present: usize,
    /// Of those, the ones the generated report states.
    pub stated_when_prompted: usize,
}

fn score(
    generated: &[String],
    task: &ReportTask,
    lexicon: &FindingLexicon,
    custom_lexicon: bool,
) -> Result<ReportMetrics> {
    let refs: Vec<Vec<String>> = task.items.iter().map(|i| vec![i.report.clone()]).collect();
    let ref_texts: Vec<String> = task.items.iter().map(|i| i.report.clone()).collect();
    let language = score_reports(generated, &refs)?;
    let modalities = task.modalities();
    let clinical = clinical_efficacy(generated, &ref_texts, &modalities, lexicon, true)
        .map_err(|e| file_err(&task.manifest, e))?;
    let mut groups: BTreeMap<String, Vec<usize>> = BTreeMap::new();
    for (i, it) in task.items.iter().enumerate() {
        groups
            .entry(it.modality.clone().unwrap_or_else(|| "-".into()))
            .or_default()
            .push(i);
    }
    let mut per_modality = BTreeMap::new();
    if groups.len() > 1 {
        for (m, idx) in groups {
            let g: Vec<String> = idx.iter().map(|&i| generated[i].clone()).collect();
            let r: Vec<String> = idx.iter().map(|&i| ref_texts[i].clone()).collect();
            let rr: Vec<Vec<String>> = r.iter().map(|x| vec![x.clone()]).collect();
            let mods: Vec<Option<String>> = idx.iter().map(|&i| modalities[i].clone()).collect();
            let lex = if custom_lexicon {
                None
            } else {
                phantom_modality_lexicon(&m)
            };
            let ce = clinical_efficacy(&g, &r, &mods, lex.as_ref().unwrap_or(lexicon), true)?;
            per_modality.insert(m, (score_reports(&g, &rr)?, ce));
        }
    }
    Ok(ReportMetrics {
        language,
        clinical,
        per_modality,
    })
}

/// Evaluates a generator and the nearest-neighbour baseline on `task` (see the module
/// documentation); `lexicon` overrides the phantom vocabulary.
pub fn evaluate(
    model: &ReportModel,
    image_model: &LoadedModel,
    task: &ReportTask,
    decoding: Decoding,
    lexicon: Option<&FindingLexicon>,
    device: &Device,
) -> Result<ReportEvaluation> {
    let files: Vec<PathBuf> = task.items.iter().map(|i| i.image.clone()).collect();
    let inputs = model.image_inputs(image_model, &files, device)?;
    let states = model.prompt_states(&inputs)?;
    let generated = model.decode(&inputs.embeds, states.as_ref(), decoding)?;
    let diagnosis_prompt = match (&states, &model.card.lexicon) {
        (Some(s), Some(lexicon)) => Some(prompt_evaluation(
            &s.to_vec2::<u32>()?,
            &generated,
            task,
            lexicon,
        )?),
        _ => None,
    };
    let nearest = model.nearest_reports(&inputs.embeds)?;
    let default_lex = phantom_lexicon();
    let lex = lexicon.unwrap_or(&default_lex);
    let examples = task
        .items
        .iter()
        .zip(&generated)
        .zip(&nearest)
        .take(8)
        .map(|((it, g), nn)| ReportExample {
            image: it.image.display().to_string(),
            reference: it.report.clone(),
            generated: g.clone(),
            nearest_neighbour: nn.clone(),
        })
        .collect();
    Ok(ReportEvaluation {
        manifest: task.manifest.display().to_string(),
        n: task.items.len(),
        decoding,
        generated: score(&generated, task, lex, lexicon.is_some())?,
        nearest_neighbour: score(&nearest, task, lex, lexicon.is_some())?,
        examples,
        diagnosis_prompt,
    })
}

fn prompt_evaluation(
    states: &[Vec<u32>],
    generated: &[String],
    task: &ReportTask,
    lexicon: &FindingLexicon,
) -> Result<PromptEvaluation> {
    let modalities = task.modalities();
    lexicon
        .check_modalities(&modalities, task.items.len())
        .map_err(|e| file_err(&task.manifest, e))?;
    let read = |text: &str, i: usize| {
        medvlm_eval::report_labeller::findings_present(
            text,
            lexicon,
            modalities[i].as_deref(),
            true,
        )
    };
    let prompted: Vec<Vec<bool>> = states
        .iter()
        .map(|r| r.iter().map(|&s| s == 1).collect())
        .collect();
    let reference: Vec<Vec<bool>> = task
        .items
        .iter()
        .enumerate()
        .map(|(i, it)| read(&it.report, i))
        .collect();
    let written: Vec<Vec<bool>> = generated
        .iter()
        .enumerate()
        .map(|(i, g)| read(g, i))
        .collect();
    let labels: Vec<String> = lexicon.findings.iter().map(|f| f.label.clone()).collect();
    let classifier =
        medvlm_eval::report_labeller::efficacy_from_labels(&prompted, &reference, &labels, true)?;
    let pairs = prompted
        .iter()
        .zip(&written)
        .flat_map(|(p, w)| p.iter().zip(w));
    let (mut same, mut total, mut present, mut stated) = (0usize, 0usize, 0usize, 0usize);
    for (&p, &w) in pairs {
        total += 1;
        same += usize::from(p == w);
        present += usize::from(p);
        stated += usize::from(p && w);
    }
    Ok(PromptEvaluation {
        classifier,
        agreement: same as f64 / total.max(1) as f64,
        prompted_present: present,
        stated_when_prompted: stated,
    })
}

/// Reads `manifest`, loads the image model, trains and writes the artefact folder `out`.
pub fn train_and_save(
    manifest: &Path,
    opts: &ReportTrainOptions,
    out: &Path,
    device: &Device,
    on_epoch: &mut dyn FnMut(usize, f32),
) -> Result<ReportCard> {
    let task = ReportTask::from_manifest(manifest, opts.split.as_deref())?;
    let lopts = medvlm_models::LoadOptions {
        device: device.clone(),
        ..Default::default()
    };
    let m = medvlm_models::load_model(&opts.model_spec, &lopts)?;
    let model = train(&task, &m, opts, device, on_epoch)?;
    model.save(out)?;
    Ok(model.card)
}

/// Reads a lexicon file (JSON [`FindingLexicon`]).
pub fn read_lexicon(path: &Path) -> Result<FindingLexicon> {
    let text = std::fs::read_to_string(path).map_err(|e| file_err(path, e))?;
    let lex: FindingLexicon = serde_json::from_str(&text).map_err(|e| file_err(path, e))?;
    if lex.findings.is_empty() {
        return Err(file_err(path, "the lexicon lists no findings"));
    }
    Ok(lex)
}

/// Loads the artefact `dir` and evaluates it on `manifest` (its `split` when given); the
/// second value is the image-model warning of [`ReportModel::load`].
pub fn evaluate_manifest(
    dir: &Path,
    manifest: &Path,
    split: Option<&str>,
    decoding: Decoding,
    lexicon: Option<&Path>,
    device: &Device,
) -> Result<(ReportEvaluation, Option<String>)> {
    let task = ReportTask::from_manifest(manifest, split)?;
    let lex = lexicon.map(read_lexicon).transpose()?;
    let (model, m, warning) = ReportModel::load(dir, device)?;
    Ok((
        evaluate(&model, &m, &task, decoding, lex.as_ref(), device)?,
        warning,
    ))
}

/// A generator with the image model it reads, ready to write reports for image files (what
/// `medvlm report generate` and the service's `/v1/report` use).
pub struct Reporter {
    /// The generator.
    pub model: ReportModel,
    /// Its image model.
    pub image_model: LoadedModel,
}

impl Reporter {
    /// Loads the artefact `dir` and its image model; the second value is the image-model
    /// warning of [`ReportModel::load`].
    pub fn load(dir: &Path, device: &Device) -> Result<(Self, Option<String>)> {
        let (model, image_model, warning) = ReportModel::load(dir, device)?;
        Ok((Self { model, image_model }, warning))
    }

    /// One report per image file, in input order (an unreadable file is an error naming it).
    pub fn report_files(
        &self,
        images: &[PathBuf],
        decoding: Decoding,
        device: &Device,
    ) -> Result<Vec<String>> {
        let inputs = self.model.image_inputs(&self.image_model, images, device)?;
        self.model.generate_for(&inputs, decoding)
    }
}

/// Reports for image files with the artefact `dir`, in input order.
pub fn generate_files(
    dir: &Path,
    images: &[PathBuf],
    decoding: Decoding,
    device: &Device,
) -> Result<(Vec<String>, Option<String>)> {
    let (r, warning) = Reporter::load(dir, device)?;
    Ok((r.report_files(images, decoding, device)?, warning))
}

impl ReportEvaluation {
    /// A plain-text table: language and clinical-efficacy scores of the generator and the
    /// baseline, overall and per modality, then the first examples.
    pub fn render_table(&self) -> String {
        let mut s = format!(
            "{} reports of {} ({}); clinical efficacy: uncertain mentions count as present\n",
            self.n,
            self.manifest,
            match self.decoding {
                Decoding::Greedy => "greedy decoding".to_string(),
                Decoding::Beam(k) => format!("beam search, {k} beams"),
                Decoding::GreedyFaithful { guidance } if guidance > 0.0 =>
                    format!("greedy decoding held to the diagnosis prompt, guidance {guidance}"),
                Decoding::GreedyFaithful { .. } =>
                    "greedy decoding held to the diagnosis prompt".to_string(),
            }
        );
        s.push_str(&format!(
            "{:<22} {:<18} {:>7} {:>7} {:>7} {:>7} {:>8} {:>8} {:>9} {:>9}\n",
            "subset",
            "method",
            "BLEU-1",
            "BLEU-4",
            "ROUGE-L",
            "CIDEr-D",
            "CE P",
            "CE R",
            "CE F1 mi",
            "CE F1 ma"
        ));
        let mut rows = vec![("all".to_string(), None)];
        rows.extend(
            self.generated
                .per_modality
                .keys()
                .map(|m| (m.clone(), Some(m.clone()))),
        );
        for (name, key) in rows {
            for (method, metrics) in [
                ("generated", &self.generated),
                ("nearest neighbour", &self.nearest_neighbour),
            ] {
                let (lang, ce) = match &key {
                    None => (&metrics.language, &metrics.clinical),
                    Some(k) => match metrics.per_modality.get(k) {
                        Some((l, c)) => (l, c),
                        None => continue,
                    },
                };
                s.push_str(&format!(
                    "{:<22} {:<18} {:>7.3} {:>7.3} {:>7.3} {:>7.3} {:>8.3} {:>8.3} {:>9.3} {:>9.3}\n",
                    name,
                    method,
                    lang.bleu[0],
                    lang.bleu[3],
                    lang.rouge_l,
                    lang.cider_d,
                    ce.micro.precision,
                    ce.micro.recall,
                    ce.micro.f1,
                    ce.macro_avg.f1
                ));
            }
        }
        if let Some(p) = &self.diagnosis_prompt {
            s.push_str(&format!(
                "\ndiagnosis prompt: the findings classifier's own decisions score CE F1 micro {:.3}, macro {:.3} (P {:.3}, R {:.3}); the generated reports state what the prompt said for {:.1} % of (report, finding) pairs, {} of the {} findings it called present\n",
                p.classifier.micro.f1,
                p.classifier.macro_avg.f1,
                p.classifier.micro.precision,
                p.classifier.micro.recall,
                100.0 * p.agreement,
                p.stated_when_prompted,
                p.prompted_present
            ));
        }
        for e in self.examples.iter().take(3) {
            s.push_str(&format!(
                "\n{}\n  reference:  {}\n  generated:  {}\n  nearest:    {}\n",
                e.image, e.reference, e.generated, e.nearest_neighbour
            ));
        }
        s
    }
}
