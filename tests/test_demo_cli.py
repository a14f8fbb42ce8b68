"""The CPU demo's argument errors: one line each, naming the demo's own flags, before any
model is loaded or converted."""

from __future__ import annotations

import json

import pytest

from sglang_tokenselect_eval import demo


def demo_error(capsys, *argv: str) -> str:
    with pytest.raises(SystemExit) as exc:
        demo.main(list(argv))
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err  # one line, no usage block, no traceback
    assert err.startswith(f"{demo.PROG}: error: ")
    return err


@pytest.mark.parametrize("argv, message", [
    (("--topk", "0"), "--topk must be >= 1, got 0"),
    (("--n-local", "0"), "--n-local must be >= 1"),
    (("--n-init", "-3"), "--n-init must be >= 0"),
    (("--cache-threshold", "2"), "--cache-threshold must be in [-1, 1]"),
    (("--score-scale", "-1"), "--score-scale must be a positive number or 'layer'"),
    (("--depth", "1.5"), "--depth must be in [0, 1]"),
    (("--length", "0"), "--length must be >= 1"),
    (("--length", "2k"), "--length must be an integer"),
    (("--max-new-tokens", "0"), "--max-new-tokens must be >= 1"),
    (("--vote", "hard"), "invalid choice: 'hard'"),
])
def test_bad_flags_name_the_demo_flag(capsys, argv, message):
    err = demo_error(capsys, *argv)
    assert message in err
    assert "--tokenselect-" not in err  # the server's flag names are not the demo's


def test_missing_model_dir_is_refused_not_created(capsys, tmp_path):
    typo = tmp_path / "smolm2"
    err = demo_error(capsys, "--model-dir", str(typo))
    assert f"--model-dir {typo}: no model there" in err
    assert not typo.exists()


@pytest.fixture
def small_context_model(tmp_path):
    """A folder the demo accepts as a model (a config.json) with a 1,024-token context."""
    (tmp_path / "config.json").write_text(json.dumps({"max_position_embeddings": 1024}))
    return tmp_path


@pytest.mark.parametrize("length, new_tokens, fits", [(1008, 16, True), (1009, 16, False), (100000, 16, False),
                                                      (1000, 30, False)])
def test_length_beyond_the_context_is_refused(small_context_model, length, new_tokens, fits):
    args = demo.build_parser().parse_args(["--model-dir", str(small_context_model), "--length", str(length),
                                           "--max-new-tokens", str(new_tokens)])
    if fits:
        demo.check_length_fits(args, 1024)
        return
    with pytest.raises(demo.DemoError, match=f"--length {length} plus {new_tokens} new tokens exceeds "
                                             "the model's context of 1024 tokens"):
        demo.check_length_fits(args, 1024)


def test_length_beyond_the_context_stops_before_loading(capsys, small_context_model):
    err = demo_error(capsys, "--model-dir", str(small_context_model), "--length", "100000")
    assert "--length 100000 plus 16 new tokens exceeds the model's context of 1024 tokens" in err


def test_too_short_length_is_refused_by_name(capsys):
    """The bundled SmolLM2's tokenizer measures the prompt's framing (converted once, cached)."""
    pytest.importorskip("gguf")
    err = demo_error(capsys, "--length", "10")
    assert "--length 10 is too short for the passkey prompt" in err
