"""Plugin registration, the --tokenselect-* flags and SGLang's argument resolution."""

from __future__ import annotations

import argparse
import importlib.metadata

import pytest

from sglang.srt.plugins import load_plugins

load_plugins()  # the installed entry point, as SGLang's launcher does

pytestmark = pytest.mark.sglang_contract

from sglang.srt.layers.attention.attention_registry import ATTENTION_BACKENDS  # noqa: E402
from sglang.srt.server_args import ATTENTION_BACKEND_CHOICES, ServerArgs, prepare_server_args  # noqa: E402

from sglang_tokenselect.backend import create_tokenselect_backend  # noqa: E402
from sglang_tokenselect.config import TokenSelectConfig  # noqa: E402
from sglang_tokenselect.launch_server import with_default_backend  # noqa: E402
from sglang_tokenselect.server_args import config_from_namespace, parse_tokenselect_args, resolved  # noqa: E402


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
                 "--tokenselect-vote", "sum", "--tokenselect-stats-interval", "100",
                 "--tokenselect-tp-vote", "local")
    assert config_from_namespace(args) == TokenSelectConfig(
        n_init=64, n_local=256, topk=1024, cache_threshold=0.95, score_scale=None, vote="sum", tp_vote="local")
    assert parse_tokenselect_args(args)["tokenselect_stats_interval"] == 100
    assert config_from_namespace(parse()) == TokenSelectConfig()  # defaults: 128 + 2048 + 512, θ 0.9
    defaults = config_from_namespace(parse())
    assert (defaults.sparse_prefill, defaults.prefill_chunk, defaults.tp_vote) == (False, 512, "global")
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
        ("--tokenselect-vote", "hard", "--tokenselect-vote must be one of soft, sum, got 'hard'"),
        ("--tokenselect-tp-vote", "both", "--tokenselect-tp-vote must be one of global, local, got 'both'"),
        ("--tokenselect-stats-interval", "-5", "--tokenselect-stats-interval must be >= 0"),
        ("--tokenselect-prefill-chunk", "0", "--tokenselect-prefill-chunk must be >= 1"),
        ("--tokenselect-prefill-chunk", "half", "--tokenselect-prefill-chunk must be an integer"),
    ],
)
def test_bad_values_fail_in_one_line_naming_the_option(flag, value, message):
    """Checked before SGLang resolves anything (the model path does not exist), with any backend."""
    for backend in ("tokenselect", "flashinfer"):
        with pytest.raises(SystemExit) as exc:
            server_args("/nonexistent/model", "--attention-backend", backend, f"{flag}={value}")
        text = str(exc.value.code)
        assert message in text and text.startswith("error: ") and "\n" not in text


def test_unknown_backend_is_refused_by_sglang(capsys):
    with pytest.raises(SystemExit) as exc:
        parse("--attention-backend", "tokenselectt")
    assert exc.value.code == 2
    assert "invalid choice: 'tokenselectt'" in capsys.readouterr().err


@pytest.mark.parametrize("kwargs, field", [
    (dict(topk=0), "--tokenselect-topk"),
    (dict(cache_threshold=float("nan")), "--tokenselect-cache-threshold"),
    (dict(cache_threshold=-1.5), "--tokenselect-cache-threshold"),
    (dict(n_local=0), "--tokenselect-n-local"),
    (dict(vote="max"), "--tokenselect-vote"),
    (dict(tp_vote="ranked"), "--tokenselect-tp-vote"),
    (dict(prefill_chunk=0), "--tokenselect-prefill-chunk"),
    (dict(sparse_prefill=True, n_local=256, prefill_chunk=512), "--tokenselect-n-local .256. >= --tokenselect-prefill-chunk .512."),
])
def test_config_dataclass_validates_too(kwargs, field):
    with pytest.raises(ValueError, match=field):
        TokenSelectConfig(**kwargs)


def server_args(model: str, *argv: str) -> ServerArgs:
    return prepare_server_args(["--model-path", model, "--device", "cpu", "--skip-tokenizer-init", *argv])


def resolve(sa: ServerArgs):
    """The resolved arguments: SGLang 0.5.17 resolves while building ServerArgs, 0.5.23 when
    its launcher calls ``resolve_once``."""
    if hasattr(sa, "resolve_once"):
        sa.resolve_once()
    return resolved(sa)


def decode_graph_batches(view):
    cfg = view.cuda_graph_config  # None on a CPU with SGLang 0.5.23
    return None if cfg is None else (cfg.decode.max_bs, cfg.decode.bs)


def test_resolution_attaches_config_and_keeps_decode_graph_batches(tiny_model):
    plain = resolve(server_args(tiny_model, "--attention-backend", "flashinfer", "--max-running-requests", "256"))
    sa = server_args(tiny_model, "--attention-backend", "tokenselect", "--tokenselect-topk", "96",
                     "--tokenselect-stats-interval", "8")
    assert sa._tokenselect_config == TokenSelectConfig(topk=96)
    assert sa._tokenselect_stats_interval == 8
    view = resolve(sa)
    # the selection scratch does not grow with the captured batch: SGLang's own choice stands
    assert decode_graph_batches(view) == decode_graph_batches(plain)
    assert view.max_running_requests == 256
    assert view.page_size in (None, 1)
    explicit = server_args(tiny_model, "--attention-backend", "tokenselect", "--max-running-requests", "7")
    assert resolve(explicit).max_running_requests == 7
    import pickle  # SGLang hands ServerArgs to its scheduler processes

    assert pickle.loads(pickle.dumps(sa))._tokenselect_config == TokenSelectConfig(topk=96)


def test_other_backends_are_left_alone(tiny_model):
    sa = server_args(tiny_model, "--attention-backend", "triton")
    assert resolve(sa).max_running_requests is None
    assert not hasattr(sa, "_tokenselect_config") or sa._tokenselect_config == TokenSelectConfig()


UNSUPPORTED_ON_THE_COMMAND_LINE = [
    (("--page-size", "16"), "needs --page-size 1, got 16"),
    (("--enable-mixed-chunk",), "--enable-mixed-chunk"),
    (("--prefill-attention-backend", "torch_native"), "--prefill-attention-backend torch_native"),
    (("--enable-two-batch-overlap",), "--enable-two-batch-overlap"),
    (("--enable-pdmux",), "--enable-pdmux"),
    (("--kv-cache-dtype", "fp8_e4m3"), "--kv-cache-dtype fp8_e4m3"),
    (("--speculative-algorithm", "EAGLE"), "--speculative-algorithm EAGLE"),
]


@pytest.mark.parametrize("argv, message", UNSUPPORTED_ON_THE_COMMAND_LINE)
def test_unsupported_options_are_refused_on_the_command_line_in_one_line(argv, message):
    """Refused from the arguments alone, before SGLang resolves (or downloads) the model:
    the model path does not even exist."""
    with pytest.raises(SystemExit) as exc:
        server_args("/nonexistent/model", "--attention-backend", "tokenselect", *argv)
    text = str(exc.value.code)
    assert message in text and text.startswith("error: ") and "\n" not in text


def test_supported_options_pass_the_command_line_check(tiny_model):
    sa = server_args(tiny_model, "--attention-backend", "tokenselect", "--page-size", "1",
                     "--kv-cache-dtype", "bf16")
    assert sa.page_size == 1


@pytest.mark.parametrize("field, value, message", [
    ("page_size", 16, "--page-size 1"),
    ("enable_mixed_chunk", True, "--enable-mixed-chunk"),
    ("enable_pdmux", True, "--enable-pdmux"),
])
def test_server_args_built_in_python_are_checked_once_resolved(tiny_model, field, value, message):
    """ServerArgs built without the command line (SGLang's Engine API) meet the same rules."""
    with pytest.raises(ValueError, match=message):
        resolve(ServerArgs(model_path=tiny_model, device="cpu", skip_tokenizer_init=True,
                           attention_backend="tokenselect", **{field: value}))


def test_decode_only_disaggregation_is_refused_by_name():
    """A decode-only server starts requests without an extend, where the Selection Cache
    forgets a pool row's previous owner (checked on the resolved args: the full SGLang
    resolution of this mode wants a transfer backend)."""
    from types import SimpleNamespace

    from sglang_tokenselect.server_args import check_server_args_supported

    args = SimpleNamespace(attention_backend="tokenselect", prefill_attention_backend=None,
                           decode_attention_backend=None, _resolved_overrides=[], page_size=1,
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
    if resolved(sa).cuda_graph_config is None:
        pytest.skip("this SGLang (0.5.23) resolves no CUDA graph config without a GPU: the switch is "
                    "verified against 0.5.17 only")
    assert resolved(sa).cuda_graph_config.prefill.backend == Backend.DISABLED
    with pytest.raises(ValueError, match="--tokenselect-sparse-prefill does not support a prefill CUDA graph"):
        server_args(tiny_model, "--attention-backend", "tokenselect", "--tokenselect-sparse-prefill",
                    "--cuda-graph-backend-prefill", "tc_piecewise")
    plain = server_args(tiny_model, "--attention-backend", "tokenselect", "--cuda-graph-backend-prefill", "tc_piecewise")
    assert resolved(plain).cuda_graph_config.prefill.backend == Backend.TC_PIECEWISE  # sparse prefill off: untouched


def test_launch_server_defaults_to_tokenselect():
    assert with_default_backend(["--model-path", "m"]) == [
        "--attention-backend", "tokenselect", "--model-path", "m"]
    assert with_default_backend(["--attention-backend=flashinfer"]) == ["--attention-backend=flashinfer"]
    assert with_default_backend(["--decode-attention-backend", "x"])[0] == "--decode-attention-backend"


def test_extrapolate_flag_parses_and_needs_sparse_prefill(tiny_model):
    assert config_from_namespace(parse()).extrapolate is False
    on = config_from_namespace(parse("--tokenselect-sparse-prefill", "--tokenselect-extrapolate"))
    assert on.extrapolate and on.sparse_prefill
    with pytest.raises(ValueError, match="--tokenselect-extrapolate needs --tokenselect-sparse-prefill") as exc:
        server_args(tiny_model, "--attention-backend", "tokenselect", "--tokenselect-extrapolate")
    assert "\n" not in str(exc.value)


def test_extrapolate_accepts_a_context_length_past_the_model(tiny_model, monkeypatch):
    """The tiny model was trained on 4,096 tokens: SGLang refuses --context-length 16384 unless
    SGLANG_ALLOW_OVERWRITE_LONGER_CONTEXT_LEN is set, which extrapolation sets (and logs)."""
    import os

    from sglang.srt.configs.model_config import ModelConfig

    from sglang_tokenselect import server_args as hooks

    lines = []
    record = lambda msg, *args: lines.append(msg % args)  # noqa: E731
    monkeypatch.setattr(hooks, "logger", type("L", (), {"info": staticmethod(record), "warning": staticmethod(record)}))
    monkeypatch.delenv(hooks.LONGER_CONTEXT_ENV, raising=False)
    # SGLang waives its check inside its own CI (0.5.23 reads CI=true, which our CI sets)
    monkeypatch.setattr("sglang.srt.configs.model_config.is_in_ci", lambda: False, raising=False)
    with pytest.raises(ValueError, match=hooks.LONGER_CONTEXT_ENV):  # SGLang's own check, without extrapolation
        ModelConfig.from_server_args(server_args(tiny_model, "--attention-backend", "tokenselect",
                                                 "--context-length", "16384"))
    sa = server_args(tiny_model, "--attention-backend", "tokenselect", "--tokenselect-sparse-prefill",
                     "--tokenselect-extrapolate", "--context-length", "16384")
    assert os.environ[hooks.LONGER_CONTEXT_ENV] == "1"
    assert sa._tokenselect_config.extrapolate
    assert ModelConfig.from_server_args(sa).context_len == 16384
    assert any("length extrapolation requested, context length 16384" in line for line in lines), lines
    monkeypatch.setenv(hooks.LONGER_CONTEXT_ENV, "0")  # the user's choice is kept, with a warning
    with pytest.raises(ValueError, match=hooks.LONGER_CONTEXT_ENV):  # 0.5.17 checks in ServerArgs, 0.5.23 here
        ModelConfig.from_server_args(server_args(tiny_model, "--attention-backend", "tokenselect",
                                                 "--tokenselect-sparse-prefill", "--tokenselect-extrapolate",
                                                 "--context-length", "16384"))
    assert os.environ[hooks.LONGER_CONTEXT_ENV] == "0" and any("keeps SGLang from accepting" in x for x in lines)
    lines.clear()
    server_args(tiny_model, "--attention-backend", "tokenselect", "--tokenselect-sparse-prefill",
                "--tokenselect-extrapolate")
    assert any("--context-length is not given" in line for line in lines), lines
def test_global_tp_vote_is_refused_on_cuda_at_tp_above_one(tiny_model):
    """The GPU path cannot all-reduce the vote yet: refused by name once the device is known;
    served with --tokenselect-tp-vote local, on one rank, and on the CPU path."""
    from types import SimpleNamespace

    from sglang_tokenselect.server_args import check_server_args_supported

    def args(device, tp_size, tp_vote="global"):
        return SimpleNamespace(attention_backend="tokenselect", prefill_attention_backend=None,
                               decode_attention_backend=None, _resolved_overrides=[], page_size=1,
                               speculative_algorithm=None, enable_mixed_chunk=False, kv_cache_dtype="auto",
                               enable_dp_attention=False, device=device, tp_size=tp_size, attn_cp_size=1,
                               _tokenselect_config=TokenSelectConfig(tp_vote=tp_vote))

    with pytest.raises(ValueError) as exc:
        check_server_args_supported(args("cuda", 2))
    text = str(exc.value)
    assert text.startswith("--tokenselect-tp-vote global") and "--tokenselect-tp-vote local" in text
    assert "\n" not in text
    for ok in (args("cuda", 2, "local"), args("cuda", 1), args("cpu", 2)):
        check_server_args_supported(ok)
    cpu_tp2 = server_args(tiny_model, "--attention-backend", "tokenselect", "--tp-size", "2")
    assert resolve(cpu_tp2).tp_size == 2 and cpu_tp2._tokenselect_config.tp_vote == "global"
