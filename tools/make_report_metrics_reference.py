#!/usr/bin/env python3
"""Reference values of BLEU-1..4, ROUGE-L and CIDEr-D for medvlm-eval's report metrics,
computed by pycocoevalcap's own scorers (the COCO caption evaluation that report-generation
papers report with).

    python3 -m venv /tmp/pyref && /tmp/pyref/bin/pip install pycocoevalcap==1.2
    /tmp/pyref/bin/python tools/make_report_metrics_reference.py \
        > crates/medvlm-eval/tests/fixtures/report_metrics_reference.json

pycocoevalcap's PTBTokenizer runs Stanford CoreNLP (Java); this script instead tokenises with
the rule medvlm documents (lower case, ASCII punctuation removed except hyphens and
apostrophes between letters or digits), writes the tokens into the fixture so the Rust test
checks its tokenizer against them, and gives the scorers the space-joined tokens, which is
what they receive after PTBTokenizer.
"""
import json
import sys

from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.rouge.rouge import Rouge

PUNCT = set("!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~")


def tokenize(text):
    out = []
    for raw in text.lower().split():
        word = ""
        for i, c in enumerate(raw):
            inner = lambda ch: ch.isalnum()
            keep = (
                c.isalnum()
                or (c in "-'" and 0 < i < len(raw) - 1 and inner(raw[i - 1]) and inner(raw[i + 1]))
                or not (c in PUNCT or c.isspace())
            )
            if keep:
                word += c
            elif word:
                out.append(word)
                word = ""
        if word:
            out.append(word)
    return out


# Phantom-style reports (generated, reference) covering: exact matches, paraphrases, negations,
# hedges, a short candidate (brevity penalty), repeated n-grams (clipping), several
# references of tied lengths, punctuation, and an empty candidate.
CORPUS = [
    ("PA chest radiograph. A small effusion is present in the right costophrenic angle. No acute bony abnormality.",
     ["PA chest radiograph. A small effusion is present in the right costophrenic angle. No acute bony abnormality."]),
    ("PA chest radiograph. A moderate pleural effusion is seen in the left lung base. Heart size is normal.",
     ["PA chest radiograph. A moderate pleural fluid collection is seen in the left lung base. No mass, consolidation, cardiomegaly or pneumothorax is identified.",
      "Chest radiograph: moderate left pleural effusion. The cardiomediastinal silhouette is within normal limits."]),
    ("Axial T2-weighted MRI. Possible small lesion in the right frontal lobe.",
     ["Axial T2-weighted MRI of the brain. A small well-defined lesion is seen in the right frontal lobe, likely a metastasis. No midline shift."]),
    ("No pneumothorax.",
     ["PA chest radiograph. No pneumothorax, effusion or consolidation. Heart size is normal. Normal study."]),
    ("nodule nodule nodule nodule in the left upper lobe",
     ["A single nodule in the left upper lobe.", "Nodule, left upper lobe."]),
    ("Dermoscopy: an asymmetric pigmented lesion with irregular borders, suspicious for melanoma.",
     ["Dermoscopic image of an asymmetric pigmented lesion with irregular borders and blue-white veil; melanoma cannot be excluded.",
      "Pigmented lesion, asymmetric, irregular border: suspicious for melanoma.",
      "Benign-appearing naevus is not seen; the lesion is asymmetric."]),
    ("H&E patch: focal tumour cells with high mitotic activity.",
     ["H&E stained patch showing focal tumour with frequent mitoses.", "Focal tumour cells; mitotic activity is high."]),
    ("",
     ["Normal study. No acute abnormality."]),
    ("The lungs are clear. Heart size is normal. No effusion.",
     ["The lungs are clear. Heart size is normal. No effusion.", "Lungs clear; normal heart size; no effusion."]),
    ("Large mass in the left temporal lobe with surrounding oedema and mild midline shift.",
     ["A large mass in the left temporal lobe with surrounding oedema. Mild midline shift to the right."]),
    ("Cardiomegaly.",
     ["Marked cardiomegaly. No pleural effusion.", "Enlarged cardiac silhouette."]),
    ("Patient's right lung: small pneumothorax (apical), 2-cm rim.",
     ["Small right apical pneumothorax with a 2-cm rim.", "Right-sided apical pneumothorax, small."]),
]


def main():
    gts, res, tokens = {}, {}, []
    for i, (cand, refs) in enumerate(CORPUS):
        c = tokenize(cand)
        rs = [tokenize(r) for r in refs]
        tokens.append({"candidate": c, "references": rs})
        res[i] = [" ".join(c)]
        gts[i] = [" ".join(r) for r in rs]
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    rouge, rouge_each = Rouge().compute_score(gts, res)
    cider, cider_each = Cider().compute_score(gts, res)
    out = {
        "generator": "tools/make_report_metrics_reference.py (pycocoevalcap 1.2 scorers)",
        "corpus": [{"candidate": c, "references": r} for c, r in CORPUS],
        "tokens": tokens,
        "bleu": list(bleu),
        "rouge_l": float(rouge),
        "rouge_l_each": [float(v) for v in rouge_each],
        "cider_d": float(cider),
        "cider_d_each": [float(v) for v in cider_each],
    }
    json.dump(out, sys.stdout, indent=1)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
