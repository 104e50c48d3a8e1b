#!/usr/bin/env python3
"""Make a tiny random-weight GPT-2 parity fixture for medvlm-models (the report decoder).

Needs: pip install torch transformers tokenizers safetensors numpy
(made with torch 2.15 and transformers from PyPI; see the printed versions).

Writes, under crates/medvlm-models/tests/fixtures/gpt2/:
  config.json, model.safetensors    GPT2LMHeadModel.save_pretrained (keys `transformer.*`,
                                    lm_head tied to wte and so not stored)
  model_bare.safetensors            the same weights in the original openai-community/gpt2
                                    layout (GPT2Model keys without the `transformer.` prefix)
  tokenizer.json                    a byte-level BPE (GPT-2's pre-tokeniser and decoder)
                                    trained on a few report sentences, vocabulary 300
  inputs.safetensors                input_ids / attention_mask [2, L] (right padding),
                                    prefix [2, P, n_embd] (a ClipCap-style prefix), prompt_ids [1, T]
  expected.safetensors              logits, last_hidden_state (right-padded batch),
                                    prefix_logits (inputs_embeds = prefix ++ wte(input_ids)),
                                    greedy_ids and beam3_ids (generate, 12 new tokens, no EOS stop)
  texts.json                        the texts and their token ids
Run from the repository root: python tools/make_gpt2_fixture.py
"""
import json
import os

import numpy as np
import torch
import transformers
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import GPT2Config, GPT2LMHeadModel

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
OUT = os.path.join(ROOT, "crates", "medvlm-models", "tests", "fixtures", "gpt2")
CORPUS = [
    "PA chest radiograph. Small pleural effusion in the left costophrenic angle.",
    "Axial T2-weighted brain MRI. No acute intracranial abnormality.",
    "Dermoscopy of a pigmented lesion. Atypical pigment network.",
    "Histology, H&E stain. Tumour cells crowd the stroma.",
    "Impression: moderate cardiomegaly. No pneumothorax, mass or consolidation.",
]
TEXTS = ["PA chest radiograph. Small effusion.", "Impression: no acute abnormality in the brain."]


def make_tokenizer():
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 4, trainer)
    return tok


def main():
    os.makedirs(OUT, exist_ok=True)
    torch.manual_seed(0)
    tok = make_tokenizer()
    tok.save(os.path.join(OUT, "tokenizer.json"))
    eos = tok.token_to_id("<|endoftext|>")
    cfg = GPT2Config(
        vocab_size=tok.get_vocab_size(),
        n_positions=64,
        n_embd=32,
        n_layer=2,
        n_head=4,
        activation_function="gelu_new",
        bos_token_id=eos,
        eos_token_id=eos,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    model = GPT2LMHeadModel(cfg).eval()
    # Random weights far from the initialiser's tiny scale, so every term matters.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("ln_1.weight") or name.endswith("ln_2.weight") or name.endswith("ln_f.weight"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            else:
                p.copy_(0.2 * torch.randn_like(p))
    model.save_pretrained(OUT, safe_serialization=True)
    sd = model.transformer.state_dict()
    bare = {k: v.contiguous() for k, v in sd.items() if not k.endswith(".attn.bias") and not k.endswith(".attn.masked_bias")}
    save_file(bare, os.path.join(OUT, "model_bare.safetensors"))

    ids = [tok.encode(t).ids for t in TEXTS]
    L = max(len(i) for i in ids)
    input_ids = torch.full((2, L), eos, dtype=torch.long)
    mask = torch.zeros((2, L), dtype=torch.long)
    for r, seq in enumerate(ids):
        input_ids[r, : len(seq)] = torch.tensor(seq)
        mask[r, : len(seq)] = 1
    prefix = 0.5 * torch.randn(2, 3, cfg.n_embd)
    prompt = torch.tensor([ids[0][:4]], dtype=torch.long)
    with torch.no_grad():
        out = model(input_ids=input_ids, attention_mask=mask, output_hidden_states=True)
        embeds = torch.cat([prefix, model.transformer.wte(input_ids)], dim=1)
        pmask = torch.cat([torch.ones(2, 3, dtype=torch.long), mask], dim=1)
        pout = model(inputs_embeds=embeds, attention_mask=pmask)
        # No EOS stop: the fixture compares whole 12-token continuations.
        greedy = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=12,
                                do_sample=False, eos_token_id=None, pad_token_id=eos)
        beam = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=12,
                              do_sample=False, num_beams=3, eos_token_id=None, pad_token_id=eos,
                              length_penalty=1.0, early_stopping=False)
    save_file(
        {"input_ids": input_ids, "attention_mask": mask, "prefix": prefix.contiguous(), "prompt_ids": prompt},
        os.path.join(OUT, "inputs.safetensors"),
    )
    save_file(
        {
            "logits": out.logits.contiguous(),
            "last_hidden_state": out.hidden_states[-1].contiguous(),
            "prefix_logits": pout.logits.contiguous(),
            "greedy_ids": greedy.contiguous(),
            "beam3_ids": beam.contiguous(),
        },
        os.path.join(OUT, "expected.safetensors"),
    )
    with open(os.path.join(OUT, "texts.json"), "w") as f:
        json.dump({"texts": TEXTS, "ids": ids}, f, indent=1)
    print("torch", torch.__version__, "transformers", transformers.__version__)
    print("greedy", greedy.tolist(), "beam", beam.tolist())


if __name__ == "__main__":
    main()
