#!/usr/bin/env python3
"""Reference sentence embeddings of the real all-MiniLM-L6-v2 BERT for the Rust parity test.

Needs: pip install torch transformers safetensors numpy
Weights: run tools/fetch_weights.sh first (puts the model in weights/all-minilm-l6-v2/).

Writes crates/medvlm-models/tests/fixtures/minilm/reference.safetensors with, for a few
medical sentences:
  input_ids, attention_mask   (i64 [n, L], what the HF tokenizer produces, padded to the
                               longest sentence)
  mean_pooled                 (f32 [n, 384], mean of the last hidden states over the
                               attention mask: sentence-transformers' pooling for MiniLM)
  cls                         (f32 [n, 384], last hidden state of the [CLS] token)
and sentences.json with the sentences in the same order.
The Rust test (tests/minilm_real_weights.rs) runs medvlm's BERT tower on the same weights and
requires cosine >= 0.9999 per sentence.
"""
import json
import os
import sys

import torch
from safetensors.torch import save_file
from transformers import AutoTokenizer, BertModel

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WEIGHTS = os.path.join(ROOT, "weights", "all-minilm-l6-v2")
OUT = os.path.join(ROOT, "crates", "medvlm-models", "tests", "fixtures", "minilm")

SENTENCES = [
    "Chest radiograph shows a right lower lobe consolidation consistent with pneumonia.",
    "No acute cardiopulmonary abnormality.",
    "Small left-sided pneumothorax without mediastinal shift.",
    "Axial CT of the brain demonstrates an acute subdural hematoma.",
    "Histopathology: invasive ductal carcinoma, grade 2, margins clear.",
    "MRI T2-weighted image with hyperintense lesion in the periventricular white matter.",
]


def main():
    if not os.path.isfile(os.path.join(WEIGHTS, "model.safetensors")):
        sys.exit(f"missing {WEIGHTS}/model.safetensors: run tools/fetch_weights.sh first")
    tok = AutoTokenizer.from_pretrained(WEIGHTS)
    model = BertModel.from_pretrained(WEIGHTS, add_pooling_layer=False).eval()
    enc = tok(SENTENCES, padding="longest", truncation=True, max_length=256, return_tensors="pt")
    with torch.no_grad():
        out = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
    hidden = out.last_hidden_state
    mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    mean_pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
    cls = hidden[:, 0, :]
    os.makedirs(OUT, exist_ok=True)
    save_file(
        {
            "input_ids": enc["input_ids"].to(torch.int64).contiguous(),
            "attention_mask": enc["attention_mask"].to(torch.int64).contiguous(),
            "mean_pooled": mean_pooled.float().contiguous(),
            "cls": cls.float().contiguous(),
        },
        os.path.join(OUT, "reference.safetensors"),
        metadata={"source": "tools/make_minilm_reference.py", "model": "all-MiniLM-L6-v2"},
    )
    with open(os.path.join(OUT, "sentences.json"), "w") as f:
        json.dump(SENTENCES, f, indent=1)
        f.write("\n")
    print(f"wrote {OUT}: {len(SENTENCES)} sentences, seq len {enc['input_ids'].shape[1]}")


if __name__ == "__main__":
    main()
