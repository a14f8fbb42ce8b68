"""Plugin registration, the --tokenselect-* flags and SGLang's argument resolution."""

from __future__ import annotations

import argparse
import importlib.metadata
import json

import pytest

from sglang.srt.plugins import load_plugins

load_plugins()  # the installed entry point, as SGLang's launcher does

from sglang.srt.layers.attention.attention_registry import ATTENTION_BACKENDS  # noqa: E402
from sglang.srt.server_args import ATTENTION_BACKEND_CHOICES, ServerArgs, prepare_server_args  # noqa: E402

from sglang_tokenselect.backend import create_tokenselect_backend  # noqa: E402
from sglang_tokenselect.config import TokenSelectConfig  # noqa: E402
from sglang_tokenselect.launch_server import with_default_backend  # noqa: E402
from sglang_tokenselect.server_args import config_from_namespace  # noqa: E402


def test_entry_point_registers_the_backend():
    eps = importlib.metadata.entry_points(group="sglang.srt.plugins")
    assert [ep.value for ep in eps if ep.name == "tokenselect"] == ["sglang_tokenselect.plugin:register"]
    assert ATTENTION_BACKENDS["tokenselect"] is create_tokenselect_backend
    assert "tokenselect" in ATTENTION_BACKEND_CHOICES


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    ServerArgs.add_cli_args(parser)
    return parser.parse_args(["--model-path", "m", *argv])


def test_flags_parse_into_the_config():
    args = parse("--attention-backend", "tokenselect", "--tokenselect-n-init", "64",
                 "--tokenselect-n-local", "256", "--tokenselect-topk", "1024",
                 "--tokenselect-cache-threshold", "0.95", "--tokenselect-score-scale", "layer",
                 "--tokenselect-vote", "sum", "--tokenselect-stats-interval", "100")
    assert config_from_namespace(args) == TokenSelectConfig(
        n_init=64, n_local=256, topk=1024, cache_threshold=0.95, score_scale=None, vote="sum")
    assert args.tokenselect_stats_interval == 100
    assert config_from_namespace(parse()) == TokenSelectConfig()  # defaults: 128 + 2048 + 512, θ 0.9
    defaults = config_from_namespace(parse())
    assert (defaults.sparse_prefill, defaults.prefill_chunk) == (False, 512)
    sparse = config_from_namespace(parse("--tokenselect-sparse-prefill", "--tokenselect-prefill-chunk", "256"))
    assert (sparse.sparse_prefill, sparse.prefill_chunk) == (True, 256)


@pytest.mark.parametrize(
    "flag, value, message",
    [
        ("--tokenselect-topk", "0", "--tokenselect-topk must be >= 1"),
        ("--tokenselect-topk", "many", "--tokenselect-topk must be an integer"),
        ("--tokenselect-n-local", "0", "--tokenselect-n-local must be >= 1"),
        ("--tokenselect-n-init", "-1", "--tokenselect-n-init must be >= 0"),
        ("--tokenselect-cache-threshold", "1.5", "--tokenselect-cache-threshold must be in [-1, 1]"),
        ("--tokenselect-cache-threshold", "-1.1", "--tokenselect-cache-threshold must be in [-1, 1]"),
        ("--tokenselect-cache-threshold", "often", "--tokenselect-cache-threshold must be a number"),
        ("--tokenselect-score-scale", "0", "--tokenselect-score-scale must be a positive number"),
        ("--tokenselect-score-scale", "big", "--tokenselect-score-scale must be a positive number"),
        ("--tokenselect-vote", "hard", "invalid choice: 'hard'"),
        ("--tokenselect-prefill-chunk", "0", "--tokenselect-prefill-chunk must be >= 1"),
        ("--tokenselect-prefill-chunk", "half", "--tokenselect-prefill-chunk must be an integer"),
        ("--attention-backend", "tokenselectt", "invalid choice: 'tokenselectt'"),
    ],
)
def test_bad_values_fail_naming_the_option(flag, value, message, capsys):
    with pytest.raises(SystemExit) as exc:
        parse(flag, value)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("kwargs, field", [
    (dict(topk=0), "--tokenselect-topk"),
    (dict(cache_threshold=float("nan")), "--tokenselect-cache-threshold"),
    (dict(cache_threshold=-1.5), "--tokenselect-cache-threshold"),
    (dict(n_local=0), "--tokenselect-n-local"),
    (dict(vote="max"), "--tokenselect-vote"),
    (dict(prefill_chunk=0), "--tokenselect-prefill-chunk"),
    (dict(sparse_prefill=True, n_local=256, prefill_chunk=512), "--tokenselect-n-local .256. >= --tokenselect-prefill-chunk .512."),
])
def test_config_dataclass_validates_too(kwargs, field):
    with pytest.raises(ValueError, match=field):
        TokenSelectConfig(**kwargs)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """A config.json is all SGLang's argument resolution reads of a model."""
    path = tmp_path_factory.mktemp("tiny")
    (path / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64,
        "intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2,
        "num_hidden_layers": 2, "vocab_size": 256, "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5, "torch_dtype": "bfloat16", "head_dim": 16,
    }))
    return str(path)


def server_args(model: str, *argv: str) -> ServerArgs:
    return prepare_server_args(["--model-path", model, "--device", "cpu", "--skip-tokenizer-init", *argv])


def test_resolution_attaches_config_and_keeps_decode_graph_batches(tiny_model):
    plain = server_args(tiny_model, "--attention-backend", "flashinfer", "--max-running-requests", "256")
    sa = server_args(tiny_model, "--attention-backend", "tokenselect", "--tokenselect-topk", "96",
                     "--tokenselect-stats-interval", "8")
    assert sa._tokenselect_config == TokenSelectConfig(topk=96)
    assert sa._tokenselect_stats_interval == 8
    # the selection scratch does not grow with the captured batch: SGLang's own choice stands
    assert sa.cuda_graph_config.decode.max_bs == plain.cuda_graph_config.decode.max_bs
    assert sa.cuda_graph_config.decode.bs == plain.cuda_graph_config.decode.bs
    assert sa.max_running_requests == 256
    assert sa.page_size in (None, 1)
    explicit = server_args(tiny_model, "--attention-backend", "tokenselect", "--max-running-requests", "7")
    assert explicit.max_running_requests == 7
    import pickle  # SGLang hands ServerArgs to its scheduler processes

    assert pickle.loads(pickle.dumps(sa))._tokenselect_config == TokenSelectConfig(topk=96)


def test_other_backends_are_left_alone(tiny_model):
    sa = server_args(tiny_model, "--attention-backend", "triton")
    assert sa.max_running_requests is None
    assert not hasattr(sa, "_tokenselect_config") or sa._tokenselect_config == TokenSelectConfig()


@pytest.mark.parametrize("argv, message", [
    (("--page-size", "16"), "--page-size 1"),
    (("--enable-mixed-chunk",), "--enable-mixed-chunk"),
    (("--prefill-attention-backend", "torch_native"), "--prefill-attention-backend"),
    (("--enable-two-batch-overlap",), "--enable-two-batch-overlap"),
    (("--enable-pdmux",), "--enable-pdmux"),
])
def test_unsupported_server_options_are_refused_by_name(tiny_model, argv, message):
    with pytest.raises(ValueError, match=message):
        server_args(tiny_model, "--attention-backend", "tokenselect", *argv)


def test_decode_only_disaggregation_is_refused_by_name():
    """A decode-only server starts requests without an extend, where the Selection Cache
    forgets a pool row's previous owner (checked on the resolved args: the full SGLang
    resolution of this mode wants a transfer backend)."""
    from types import SimpleNamespace

    from sglang_tokenselect.server_args import check_server_args_supported

    args = SimpleNamespace(get_attention_backends=lambda: ("tokenselect", "tokenselect"), page_size=1,
                           speculative_algorithm=None, enable_mixed_chunk=False, kv_cache_dtype="auto",
                           enable_dp_attention=False, disaggregation_mode="decode")
    with pytest.raises(ValueError, match="--disaggregation-mode decode"):
        check_server_args_supported(args)
    args.disaggregation_mode = "null"
    check_server_args_supported(args)


def test_sparse_prefill_needs_the_local_window_to_hold_a_sub_chunk(tiny_model):
    assert TokenSelectConfig(n_local=256, prefill_chunk=512).prefill_chunk == 512  # off: allowed
    with pytest.raises(ValueError, match="--tokenselect-sparse-prefill needs --tokenselect-n-local"):
        server_args(tiny_model, "--attention-backend", "tokenselect", "--tokenselect-sparse-prefill",
                    "--tokenselect-n-local", "128")


def test_sparse_prefill_turns_the_prefill_cuda_graph_off(tiny_model):
    from sglang.srt.model_executor.cuda_graph_config import Backend

    sa = server_args(tiny_model, "--attention-backend", "tokenselect", "--tokenselect-sparse-prefill")
    assert sa._tokenselect_config.sparse_prefill
    assert sa.cuda_graph_config.prefill.backend == Backend.DISABLED
    with pytest.raises(ValueError, match="--tokenselect-sparse-prefill does not support a prefill CUDA graph"):
        server_args(tiny_model, "--attention-backend", "tokenselect", "--tokenselect-sparse-prefill",
                    "--cuda-graph-backend-prefill", "tc_piecewise")
    plain = server_args(tiny_model, "--attention-backend", "tokenselect", "--cuda-graph-backend-prefill", "tc_piecewise")
    assert plain.cuda_graph_config.prefill.backend == Backend.TC_PIECEWISE  # sparse prefill off: untouched


def test_launch_server_defaults_to_tokenselect():
    assert with_default_backend(["--model-path", "m"]) == [
        "--attention-backend", "tokenselect", "--model-path", "m"]
    assert with_default_backend(["--attention-backend=flashinfer"]) == ["--attention-backend=flashinfer"]
    assert with_default_backend(["--decode-attention-backend", "x"])[0] == "--decode-attention-backend"
