#!/usr/bin/env python3
"""Tiny random-weight BiomedCLIP-layout model (open_clip CustomTextCLIP) for medvlm's parity tests.

Needs: pip install torch open_clip_torch timm transformers tokenizers safetensors numpy
No model hub access: the timm ViT and the HF BERT are built from explicit tiny configs.

The model has exactly the layout of microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224:
  vision: open_clip TimmModel around timm `vit_base_patch16_224` (pool "", proj "linear")
          shrunk to img 32, patch 8, width 32, depth 2, heads 2;
  text:   open_clip HFTextEncoder around an HF BertModel (proj "mlp", pooler
          "cls_last_hidden_state_pooler") shrunk to width 32, 2 layers, 2 heads;
  embed_dim 24, context_length 16.
Every parameter (LayerNorm weights and biases included) is drawn at random from a fixed seed,
so a swapped or ignored tensor changes the outputs.

Writes crates/medvlm-models/tests/fixtures/biomedclip/:
  open_clip_config.json         BiomedCLIP's config, context_length 16, plus a top-level
                                "medvlm_arch" block giving the tiny sizes (open_clip ignores it;
                                medvlm needs it because the timm/HF names imply full-size models)
  open_clip_pytorch_model.bin   torch.save(state_dict) - exercises medvlm's pickle reader
  tokenizer.json                a tiny BERT WordPiece tokenizer (lowercasing, [CLS] .. [SEP])
  texts.json                    the captions
  expected.safetensors          pixel_values [2,3,32,32], input_ids [n,16] (i64),
                                image_features, text_features (unnormalised projections),
                                image_tokens (trunk output after the final norm, [2,17,32]),
                                text_tokens (BERT last hidden state, [n,16,32]),
                                logit_scale (exp'd, [1]), logits_per_image [2,n]

It also writes the generic-BERT fixture crates/medvlm-models/tests/fixtures/bert/ (a tiny
BertModel *with* its pooler, saved as safetensors under a "bert." prefix as in
BertForPreTraining-style checkpoints such as PubMedBERT / BioClinicalBERT):
  config.json, model.safetensors, expected.safetensors with input_ids, attention_mask,
  token_type_ids (i64 [3,10]), last_hidden_state, cls, mean_pooled, pooler_output
  (the tanh pooler), all f32.
"""
import json
import os

import numpy as np
import timm
import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

import open_clip.hf_model as hf_model
from open_clip.model import CustomTextCLIP

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "crates", "medvlm-models", "tests", "fixtures", "biomedclip")
BERT_OUT = os.path.join(ROOT, "crates", "medvlm-models", "tests", "fixtures", "bert")
HF_NAME = "microsoft/BiomedNLP-BiomedBERT-base-uncased-abstract"
TIMM_NAME = "vit_base_patch16_224"
CONTEXT = 16
EMBED_DIM = 24
VISION = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, mlp_ratio=4.0)

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
WORDS = [
    "a", "the", "of", "with", "and", "no", "chest", "x", "-", "ray", "showing", "normal",
    "radiograph", "ct", "scan", "brain", "hemorrhage", "pneumo", "##thorax", "##nia", "left",
    "right", "lung", "effusion", "small", "large", "mass", "in", "lobe", "upper", "lower",
    ".", ",", "photo", "histopathology", "tumor", "##s", "##ed", "acute", "findings",
]
TEXTS = [
    "Chest X-ray showing pneumonia.",
    "a normal chest radiograph",
    "CT scan of the brain with acute hemorrhage",
    "small left pneumothorax",
    "large mass in the right upper lobe of the lung with effusion and no other findings at all",
]


def build_tokenizer():
    vocab = {t: i for i, t in enumerate(SPECIALS + WORDS)}
    tok = Tokenizer(models.WordPiece(vocab=vocab, unk_token="[UNK]", max_input_chars_per_word=100))
    tok.normalizer = normalizers.BertNormalizer(
        clean_text=True, handle_chinese_chars=True, strip_accents=None, lowercase=True
    )
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
    )
    return tok, vocab


def randomise_(model):
    """Draw every parameter at random (default inits leave LayerNorm at 1/0, biases at 0)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name == "logit_scale":
                p.fill_(float(np.log(1 / 0.05)))
            elif "norm" in name.lower() and name.endswith("weight"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
            else:
                p.copy_(0.2 * torch.randn_like(p))


def make_bert_fixture():
    """Generic BERT tower: tiny BertModel with pooler, token types and padding."""
    torch.manual_seed(7)
    cfg = BertConfig(
        vocab_size=50, hidden_size=24, num_hidden_layers=2, num_attention_heads=3,
        intermediate_size=40, hidden_act="gelu", max_position_embeddings=32,
        type_vocab_size=2, layer_norm_eps=1e-12, pad_token_id=0,
    )
    model = BertModel(cfg, add_pooling_layer=True).eval()
    randomise_(model)
    input_ids = torch.tensor([
        [2, 11, 12, 13, 14, 3, 15, 16, 3, 0],
        [2, 40, 41, 3, 0, 0, 0, 0, 0, 0],
        [2, 5, 6, 7, 8, 9, 10, 17, 18, 3],
    ])
    attention_mask = (input_ids != 0).long()
    token_type_ids = torch.zeros_like(input_ids)
    token_type_ids[0, 6:9] = 1
    with torch.no_grad():
        out = model(input_ids=input_ids, attention_mask=attention_mask,
                    token_type_ids=token_type_ids)
    hidden = out.last_hidden_state
    m = attention_mask.unsqueeze(-1).float()
    mean_pooled = (hidden * m).sum(1) / m.sum(1)
    os.makedirs(BERT_OUT, exist_ok=True)
    save_file({f"bert.{k}": v.detach().clone().contiguous() for k, v in model.state_dict().items()},
              os.path.join(BERT_OUT, "model.safetensors"))
    cfg_dict = {k: getattr(cfg, k) for k in [
        "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
        "intermediate_size", "hidden_act", "max_position_embeddings", "type_vocab_size",
        "layer_norm_eps", "pad_token_id"]}
    cfg_dict["model_type"] = "bert"
    with open(os.path.join(BERT_OUT, "config.json"), "w") as f:
        json.dump(cfg_dict, f, indent=2)
        f.write("\n")
    save_file({
        "input_ids": input_ids.contiguous(),
        "attention_mask": attention_mask.contiguous(),
        "token_type_ids": token_type_ids.contiguous(),
        "last_hidden_state": hidden.contiguous(),
        "cls": hidden[:, 0, :].contiguous(),
        "mean_pooled": mean_pooled.contiguous(),
        "pooler_output": out.pooler_output.contiguous(),
    }, os.path.join(BERT_OUT, "expected.safetensors"),
        metadata={"source": "tools/make_biomedclip_fixture.py"})
    print(f"wrote {BERT_OUT}")


def main():
    make_bert_fixture()
    torch.manual_seed(20260611)
    tok, vocab = build_tokenizer()
    bert_cfg = BertConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        hidden_act="gelu",
        max_position_embeddings=64,
        type_vocab_size=2,
        layer_norm_eps=1e-12,
        pad_token_id=0,
    )

    # open_clip would fetch these from the hub; hand it the tiny versions instead.
    hf_model.AutoConfig.from_pretrained = staticmethod(lambda name, *a, **k: bert_cfg)
    real_create = timm.create_model
    timm.create_model = lambda name, **kw: real_create(name, **{**kw, **VISION})

    model_cfg = {
        "embed_dim": EMBED_DIM,
        "vision_cfg": {
            "timm_model_name": TIMM_NAME,
            "timm_model_pretrained": False,
            "timm_pool": "",
            "timm_proj": "linear",
            "image_size": VISION["img_size"],
        },
        "text_cfg": {
            "hf_model_name": HF_NAME,
            "hf_tokenizer_name": HF_NAME,
            "hf_proj_type": "mlp",
            "hf_pooler_type": "cls_last_hidden_state_pooler",
            "context_length": CONTEXT,
        },
    }
    text_cfg = dict(model_cfg["text_cfg"], hf_model_pretrained=False)
    model = CustomTextCLIP(EMBED_DIM, model_cfg["vision_cfg"], text_cfg).eval()

    randomise_(model)

    # Tokenise the way open_clip's HFTokenizer does: pad to the context length, truncate.
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
        sep_token="[SEP]", mask_token="[MASK]",
    )
    input_ids = fast(
        TEXTS, return_tensors="pt", max_length=CONTEXT, padding="max_length", truncation=True
    ).input_ids
    pixel_values = torch.randn(2, 3, VISION["img_size"], VISION["img_size"])

    with torch.no_grad():
        image_features = model.encode_image(pixel_values)
        text_features = model.encode_text(input_ids)
        image_tokens = model.visual.trunk.forward_features(pixel_values)
        attn_mask = (input_ids != bert_cfg.pad_token_id).long()
        text_tokens = model.text.transformer(
            input_ids=input_ids, attention_mask=attn_mask
        ).last_hidden_state
        img_n, txt_n, scale = model(pixel_values, input_ids)
        logits_per_image = scale * img_n @ txt_n.T

    os.makedirs(OUT, exist_ok=True)
    state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    torch.save(state, os.path.join(OUT, "open_clip_pytorch_model.bin"))
    config = {
        "model_cfg": model_cfg,
        "preprocess_cfg": {
            "mean": [0.48145466, 0.4578275, 0.40821073],
            "std": [0.26862954, 0.26130258, 0.27577711],
        },
        "medvlm_arch": {
            "vision": {
                "image_size": VISION["img_size"],
                "patch_size": VISION["patch_size"],
                "width": VISION["embed_dim"],
                "depth": VISION["depth"],
                "num_heads": VISION["num_heads"],
                "mlp_ratio": VISION["mlp_ratio"],
            },
            "text": {
                k: getattr(bert_cfg, k)
                for k in [
                    "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                    "intermediate_size", "hidden_act", "max_position_embeddings",
                    "type_vocab_size", "layer_norm_eps", "pad_token_id",
                ]
            },
        },
    }
    with open(os.path.join(OUT, "open_clip_config.json"), "w") as f:
        json.dump(config, f, indent=2)
        f.write("\n")
    tok.save(os.path.join(OUT, "tokenizer.json"))
    with open(os.path.join(OUT, "texts.json"), "w") as f:
        json.dump(TEXTS, f, indent=1)
        f.write("\n")
    save_file(
        {
            "pixel_values": pixel_values.contiguous(),
            "input_ids": input_ids.to(torch.int64).contiguous(),
            "image_features": image_features.contiguous(),
            "text_features": text_features.contiguous(),
            "image_tokens": image_tokens.contiguous(),
            "text_tokens": text_tokens.contiguous(),
            "logit_scale": scale.reshape(1).contiguous(),
            "logits_per_image": logits_per_image.contiguous(),
        },
        os.path.join(OUT, "expected.safetensors"),
        metadata={"source": "tools/make_biomedclip_fixture.py"},
    )
    n_params = sum(p.numel() for p in model.parameters())
    print(f"wrote {OUT}: {n_params} parameters, ids:\n{input_ids}")


if __name__ == "__main__":
    main()
