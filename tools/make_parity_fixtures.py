#!/usr/bin/env python3
"""Make tiny random-weight CLIP and SigLIP parity fixtures for medvlm-models.

Needs: pip install torch transformers tokenizers safetensors pillow numpy
(made with torch 2.15, transformers 5.24, tokenizers 0.23).

For each family it writes, under crates/medvlm-models/tests/fixtures/{clip,siglip}/:
  config.json, model.safetensors (f32), pytorch_model.bin (torch.save of the
  state dict), model_f16.safetensors, model_bf16.safetensors,
  tokenizer.json (+ tokenizer_config.json), preprocessor_config.json,
  inputs.safetensors   pixel_values [2,3,32,32] f32, input_ids/attention_mask [3,L] i64
  expected.safetensors image_embeds, text_embeds (raw projected), logits_per_image,
                       text/vision last_hidden_state and pooled outputs,
                       and *_f16 / *_bf16 variants computed with the weights
                       rounded to that dtype (compute in f32),
  texts.json           the texts tokenised into input_ids,
  rgb.png, grey.png    and preprocess.safetensors: the HF image processor's
                       pixel_values for both images.
Run from the repository root: python tools/make_parity_fixtures.py
"""
import json
import os

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import (
    CLIPConfig,
    CLIPImageProcessor,
    CLIPModel,
    CLIPTokenizer,
    PreTrainedTokenizerFast,
    SiglipConfig,
    SiglipImageProcessor,
    SiglipModel,
)

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
OUT = os.path.join(ROOT, "crates", "medvlm-models", "tests", "fixtures")
TEXTS = ["a photo of the x-ray", "Chest X-ray: no finding.", "the " * 40 + "end"]


def test_images(out):
    rng = np.random.default_rng(0)
    h, w = 37, 45
    yy, xx = np.mgrid[0:h, 0:w]
    rgb = np.stack([xx * 255 / w, yy * 255 / h, (xx + yy) * 255 / (h + w)], -1)
    rgb = np.clip(rgb + rng.normal(0, 8, rgb.shape), 0, 255).astype(np.uint8)
    grey = np.clip(128 + 100 * np.sin(xx[:, :40] / 5.0)[:36], 0, 255).astype(np.uint8)
    Image.fromarray(rgb, "RGB").save(os.path.join(out, "rgb.png"))
    Image.fromarray(grey, "L").save(os.path.join(out, "grey.png"))
    return [Image.open(os.path.join(out, "rgb.png")), Image.open(os.path.join(out, "grey.png"))]


def save_weights(model, out, file_name, dtype=None):
    sd = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    if dtype is not None:
        sd = {k: v.to(dtype) for k, v in sd.items()}
    if file_name.endswith(".bin"):
        torch.save(sd, os.path.join(out, file_name))
    else:
        save_file(sd, os.path.join(out, file_name))


def rounded(model, dtype):
    """A copy of the model with weights rounded to dtype, computing in f32."""
    import copy

    m = copy.deepcopy(model)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(p.to(dtype).to(torch.float32))
    return m


def clip_tokenizer():
    chars = [chr(c) for c in range(33, 127)]
    vocab = {}
    for c in chars:
        vocab[c] = len(vocab)
    for c in chars:
        vocab[c + "</w>"] = len(vocab)
    merges = [("t", "h"), ("th", "e</w>"), ("o", "f</w>"), ("p", "h"), ("ph", "o"),
              ("pho", "t"), ("phot", "o</w>"), ("x", "-"), ("x-", "r"), ("c", "h")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=merges)


def siglip_tokenizer():
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    words = ["▁a", "▁photo", "▁of", "▁the", "▁x", "-", "ray", "▁chest", "▁no", "▁finding",
             ".", ":", "▁end", "▁", "r", "a", "y", "e", "n", "d"]
    pieces += [(w, -1.0 - i * 0.1) for i, w in enumerate(words)]
    pieces += [(chr(c), -10.0) for c in range(ord("a"), ord("z") + 1) if chr(c) not in "rayend"]
    tk = Tokenizer(models.Unigram(pieces, unk_id=2, byte_fallback=False))
    tk.normalizer = normalizers.Sequence([normalizers.Lowercase()])
    tk.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tk.post_processor = processors.TemplateProcessing(
        single="$A </s>", special_tokens=[("</s>", 1)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tk, pad_token="<pad>", eos_token="</s>", unk_token="<unk>"
    )


def save_tokenizer(tok, out):
    tok.backend_tokenizer.no_padding()
    tok.backend_tokenizer.no_truncation()
    tok.save_pretrained(out)
    for extra in ("special_tokens_map.json", "chat_template.jinja"):
        p = os.path.join(out, extra)
        if os.path.exists(p):
            os.remove(p)


def expected_outputs(model, family, inputs, suffix=""):
    with torch.no_grad():
        px = inputs["pixel_values"]
        ids = inputs["input_ids"]
        if family == "clip":
            mask = inputs["attention_mask"]
            t = model.text_model(input_ids=ids, attention_mask=mask)
            v = model.vision_model(pixel_values=px)
            text_embeds = model.text_projection(t.pooler_output)
            image_embeds = model.visual_projection(v.pooler_output)
            logits = model(input_ids=ids, attention_mask=mask, pixel_values=px).logits_per_image
        else:
            # SigLIP runs without a padding mask (as trained; its tokenizer returns none).
            t = model.text_model(input_ids=ids)
            v = model.vision_model(pixel_values=px)
            text_embeds = t.pooler_output
            image_embeds = v.pooler_output
            logits = model(input_ids=ids, pixel_values=px).logits_per_image
    out = {
        "image_embeds": image_embeds,
        "text_embeds": text_embeds,
        "logits_per_image": logits,
        "text_last_hidden_state": t.last_hidden_state,
        "text_pooled": t.pooler_output,
        "vision_last_hidden_state": v.last_hidden_state,
        "vision_pooled": v.pooler_output,
    }
    return {k + suffix: x.float().clone().contiguous() for k, x in out.items()}


def make(family):
    out = os.path.join(OUT, family)
    os.makedirs(out, exist_ok=True)
    torch.manual_seed(1234 if family == "clip" else 4321)
    if family == "clip":
        tok = clip_tokenizer()
        eos = tok.convert_tokens_to_ids("<|endoftext|>")
        cfg = CLIPConfig(
            text_config=dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                             num_hidden_layers=2, num_attention_heads=4,
                             max_position_embeddings=24, eos_token_id=eos,
                             bos_token_id=tok.convert_tokens_to_ids("<|startoftext|>"),
                             pad_token_id=eos),
            vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                               num_attention_heads=4, image_size=32, patch_size=8),
            projection_dim=24,
        )
        model = CLIPModel(cfg).eval()
        ctx = 24
        ip = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    else:
        tok = siglip_tokenizer()
        cfg = SiglipConfig(
            text_config=dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                             num_hidden_layers=2, num_attention_heads=4,
                             max_position_embeddings=64, pad_token_id=0, eos_token_id=1),
            vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                               num_attention_heads=4, image_size=32, patch_size=8),
        )
        model = SiglipModel(cfg).eval()
        with torch.no_grad():
            # Random probe/logit values so the test sees non-default numbers.
            model.logit_scale.fill_(1.7)
            model.logit_bias.fill_(-2.5)
        ctx = 64
        ip = SiglipImageProcessor(size={"height": 32, "width": 32})
    # Initialise all weights with a visible spread (the default init leaves
    # biases at zero and layer norms at one, which would hide loading bugs).
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name in ("logit_scale", "logit_bias"):
                continue
            p.copy_(torch.randn_like(p) * (0.2 if p.dim() > 1 else 0.1) + (1.0 if "norm" in name and name.endswith("weight") else 0.0))

    enc = tok(TEXTS, padding="max_length", max_length=ctx, truncation=True, return_tensors="pt")
    inputs = {
        "pixel_values": torch.randn(2, 3, 32, 32),
        "input_ids": enc["input_ids"].long().contiguous(),
        "attention_mask": enc["attention_mask"].long().contiguous(),
    }
    model.config.save_pretrained(out)
    save_tokenizer(tok, out)
    ip.save_pretrained(out)
    save_weights(model, out, "model.safetensors")
    save_weights(model, out, "pytorch_model.bin")
    save_weights(model, out, "model_f16.safetensors", torch.float16)
    save_weights(model, out, "model_bf16.safetensors", torch.bfloat16)
    save_file(inputs, os.path.join(out, "inputs.safetensors"))
    exp = expected_outputs(model, family, inputs)
    exp.update(expected_outputs(rounded(model, torch.float16), family, inputs, "_f16"))
    exp.update(expected_outputs(rounded(model, torch.bfloat16), family, inputs, "_bf16"))
    save_file(exp, os.path.join(out, "expected.safetensors"))
    with open(os.path.join(out, "texts.json"), "w") as f:
        json.dump(TEXTS, f, indent=1)
    imgs = test_images(out)
    pre = ip(images=imgs, return_tensors="pt")["pixel_values"].float().contiguous()
    save_file({"pixel_values": pre}, os.path.join(out, "preprocess.safetensors"))
    total = sum(os.path.getsize(os.path.join(out, f)) for f in os.listdir(out))
    print(f"{family}: {out} ({total / 1024:.0f} KiB)")


if __name__ == "__main__":
    make("clip")
    make("siglip")
