//! Known medical (and general) vision-language models medvlm can load.
//! A preset name can be given wherever a model is expected (`--model
//! pubmedclip`), and resolves to its hub id in the local hub cache.

use crate::vlm::Family;

/// One known model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Preset {
    /// Short name for `--model`.
    pub name: &'static str,
    /// Hugging Face hub id.
    pub hub_id: &'static str,
    pub family: Family,
    /// Square input resolution in pixels.
    pub input_size: usize,
    /// Licence of the weights as stated by the publisher.
    pub licence: &'static str,
    /// What it was trained on.
    pub notes: &'static str,
}

/// The preset table.
pub const PRESETS: &[Preset] = &[
    Preset {
        name: "clip-b32",
        hub_id: "openai/clip-vit-base-patch32",
        family: Family::Clip,
        input_size: 224,
        licence: "MIT",
        notes: "OpenAI CLIP ViT-B/32, web image-text pairs",
    },
    Preset {
        name: "clip-b16",
        hub_id: "openai/clip-vit-base-patch16",
        family: Family::Clip,
        input_size: 224,
        licence: "MIT",
        notes: "OpenAI CLIP ViT-B/16, web image-text pairs",
    },
    Preset {
        name: "clip-l14",
        hub_id: "openai/clip-vit-large-patch14",
        family: Family::Clip,
        input_size: 224,
        licence: "MIT",
        notes: "OpenAI CLIP ViT-L/14, web image-text pairs",
    },
    Preset {
        name: "pubmedclip",
        hub_id: "flaviagiammarino/pubmed-clip-vit-base-patch32",
        family: Family::Clip,
        input_size: 224,
        licence: "MIT",
        notes: "CLIP ViT-B/32 fine-tuned on ROCO radiology figures (Eslami et al. 2023)",
    },
    Preset {
        name: "plip",
        hub_id: "vinid/plip",
        family: Family::Clip,
        input_size: 224,
        licence: "not stated on the model card (research use only per the card)",
        notes: "CLIP ViT-B/32 fine-tuned on OpenPath pathology tweets (Huang et al. 2023)",
    },
    Preset {
        name: "biomedclip",
        hub_id: "microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224",
        family: Family::Biomedclip,
        input_size: 224,
        licence: "MIT",
        notes: "ViT-B/16 + PubMedBERT, PMC-15M figure-caption pairs (Zhang et al. 2023)",
    },
    Preset {
        name: "siglip-b16",
        hub_id: "google/siglip-base-patch16-224",
        family: Family::Siglip,
        input_size: 224,
        licence: "Apache-2.0",
        notes: "SigLIP ViT-B/16, WebLI (Zhai et al. 2023)",
    },
    Preset {
        name: "medsiglip",
        hub_id: "google/medsiglip-448",
        family: Family::Siglip,
        input_size: 448,
        licence: "Health AI Developer Foundations terms of use",
        notes: "SigLIP-400M variant on de-identified medical image-text pairs (Google 2025)",
    },
];

/// The preset called `name` (case-insensitive), or whose hub id is `name`.
pub fn find_preset(name: &str) -> Option<&'static Preset> {
    PRESETS
        .iter()
        .find(|p| p.name.eq_ignore_ascii_case(name) || p.hub_id.eq_ignore_ascii_case(name))
}
