#!/usr/bin/env python3
"""Write a Llama-3-8B-shaped model folder for ``--load-format dummy`` runs.

Nothing is downloaded.  The folder holds:

* ``config.json``            LlamaForCausalLM, hidden 4096, 32 layers, 32 heads,
                             8 KV heads, head_dim 128, intermediate 14336, vocab
                             128256, rope_theta 500000, 131072 positions, bf16.
* ``generation_config.json`` bos/eos ids only (no sampling defaults).
* ``tokenizer.json``         a byte-level BPE whose vocabulary has exactly the
                             model's 128256 ids, so every id a random-weight model
                             emits decodes to text: ids 0..255 are the 256
                             byte-level symbols, 256..127999 are synthetic merges
                             (all 2-symbol strings, then 3-symbol strings), and
                             128000..128255 are Llama-3 style special tokens.
                             Built deterministically with the ``tokenizers``
                             library, no training data needed.
* ``tokenizer_config.json``  PreTrainedTokenizerFast, bos/eos/pad tokens and a
                             small Llama-3 style chat template so
                             ``/v1/chat/completions`` works.

Usage: ``python benchmarks/dummy_model.py --out DIR``
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Dict, List, Tuple

VOCAB_SIZE = 128256
NUM_REGULAR = 128000  # ids below this are plain BPE tokens
BOS_ID = 128000
EOS_ID = 128001  # <|end_of_text|>
EOT_ID = 128009  # <|eot_id|>
PAD_ID = 128004

BOS_TOKEN = "<|begin_of_text|>"
EOS_TOKEN = "<|end_of_text|>"
EOT_TOKEN = "<|eot_id|>"
PAD_TOKEN = "<|finetune_right_pad_id|>"

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
    "{% endif %}"
)

LLAMA3_8B_CONFIG: Dict[str, object] = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "attention_bias": False,
    "attention_dropout": 0.0,
    "bos_token_id": BOS_ID,
    "eos_token_id": [EOS_ID, EOT_ID],
    "head_dim": 128,
    "hidden_act": "silu",
    "hidden_size": 4096,
    "initializer_range": 0.02,
    "intermediate_size": 14336,
    "max_position_embeddings": 131072,
    "mlp_bias": False,
    "num_attention_heads": 32,
    "num_hidden_layers": 32,
    "num_key_value_heads": 8,
    "pretraining_tp": 1,
    "rms_norm_eps": 1e-05,
    "rope_scaling": None,
    "rope_theta": 500000.0,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "use_cache": True,
    "transformers_version": "4.45.0",
    "vocab_size": VOCAB_SIZE,
}


def special_tokens() -> List[Tuple[int, str]]:
    """The 256 Llama-3 special tokens, ids 128000..128255."""
    named = {
        128000: BOS_TOKEN,
        128001: EOS_TOKEN,
        128004: PAD_TOKEN,
        128006: "<|start_header_id|>",
        128007: "<|end_header_id|>",
        128008: "<|eom_id|>",
        128009: EOT_TOKEN,
        128010: "<|python_tag|>",
    }
    out = []
    reserved = 0
    for i in range(NUM_REGULAR, VOCAB_SIZE):
        if i in named:
            out.append((i, named[i]))
        else:
            out.append((i, f"<|reserved_special_token_{reserved}|>"))
            reserved += 1
    return out


def _byte_alphabet() -> List[str]:
    """GPT-2 byte-to-unicode symbols in byte order (the ByteLevel alphabet)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    table = dict(zip(bs, cs))
    return [chr(table[b]) for b in range(256)]


def _merge_priority(alphabet: List[str]) -> List[str]:
    """Symbols ordered so that merges of common English bytes get low ranks."""
    common = " etaoinshrdlcumwfgypbvkjxqzETAOINSHRDLCUMWFGYPBVKJXQZ.,'\n-0123456789"
    byte_to_sym = {chr(b): alphabet[b] for b in range(128)}
    first = []
    for ch in common:
        sym = byte_to_sym.get(ch)
        if sym is not None and sym not in first:
            first.append(sym)
    return first + [s for s in alphabet if s not in first]


def build_vocab_and_merges() -> Tuple[Dict[str, int], List[Tuple[str, str]]]:
    alphabet = _byte_alphabet()
    vocab: Dict[str, int] = {s: i for i, s in enumerate(alphabet)}
    merges: List[Tuple[str, str]] = []
    order = _merge_priority(alphabet)
    pairs = [a + b for a in order for b in order]  # 65536 two-symbol tokens
    for a in order:
        for b in order:
            vocab[a + b] = len(vocab)
            merges.append((a, b))
    done = False
    for p in pairs:  # three-symbol tokens until the regular range is full
        for c in order:
            if len(vocab) >= NUM_REGULAR:
                done = True
                break
            vocab[p + c] = len(vocab)
            merges.append((p, c))
        if done:
            break
    assert len(vocab) == NUM_REGULAR, len(vocab)
    return vocab, merges


def build_tokenizer():
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    vocab, merges = build_vocab_and_merges()
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    specials = special_tokens()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for _, t in specials])
    for i, t in specials:
        got = tok.token_to_id(t)
        if got != i:
            raise RuntimeError(f"special token {t} got id {got}, expected {i}")
    if tok.get_vocab_size(with_added_tokens=True) != VOCAB_SIZE:
        raise RuntimeError("tokenizer vocab size mismatch")
    return tok


def tokenizer_config() -> Dict[str, object]:
    added = {
        str(i): {
            "content": t,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
        for i, t in special_tokens()
    }
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS_TOKEN,
        "eos_token": EOT_TOKEN,
        "pad_token": PAD_TOKEN,
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 131072,
        "model_input_names": ["input_ids", "attention_mask"],
        "added_tokens_decoder": added,
        "chat_template": CHAT_TEMPLATE,
    }


def _write_json(path: str, obj: object) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)
        f.write("\n")
    os.replace(tmp, path)


def write_model_dir(out: str) -> str:
    """Write config + tokenizer into ``out`` (created if needed); return ``out``."""
    os.makedirs(out, exist_ok=True)
    _write_json(os.path.join(out, "config.json"), LLAMA3_8B_CONFIG)
    _write_json(
        os.path.join(out, "generation_config.json"),
        {"_from_model_config": True, "bos_token_id": BOS_ID, "eos_token_id": [EOS_ID, EOT_ID]},
    )
    build_tokenizer().save(os.path.join(out, "tokenizer.json"))
    _write_json(os.path.join(out, "tokenizer_config.json"), tokenizer_config())
    _write_json(
        os.path.join(out, "special_tokens_map.json"),
        {"bos_token": BOS_TOKEN, "eos_token": EOT_TOKEN, "pad_token": PAD_TOKEN},
    )
    return out


def is_model_dir(path: str) -> bool:
    return all(
        os.path.isfile(os.path.join(path, f))
        for f in ("config.json", "tokenizer.json", "tokenizer_config.json")
    )


def verify(out: str) -> Dict[str, object]:
    """Load with transformers and render the chat template; return a summary."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out)
    ids = tok.encode("Hello world, this is a test.", add_special_tokens=False)
    text = tok.decode(ids)
    msgs = [{"role": "user", "content": "Say hi."}]
    prompt = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    if "assistant" not in prompt or not prompt.startswith(BOS_TOKEN):
        raise RuntimeError(f"unexpected chat prompt {prompt!r}")
    return {
        "len": len(tok),
        "bos_token_id": tok.bos_token_id,
        "eos_token_id": tok.eos_token_id,
        "roundtrip": text,
        "chat_prompt": prompt,
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="model folder to write")
    ap.add_argument("--no-verify", action="store_true", help="skip the transformers check")
    args = ap.parse_args(argv)
    write_model_dir(args.out)
    print(f"wrote {args.out}", flush=True)
    if not args.no_verify:
        print(json.dumps(verify(args.out), ensure_ascii=False), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
