"""SGLang plugin entry point (group ``sglang.srt.plugins``).

SGLang calls ``register()`` in every process it starts (launcher, scheduler, workers)
through ``sglang.srt.plugins.load_plugins()``. It adds ``tokenselect`` to the
``--attention-backend`` choices, registers the backend factory, and hooks the server
argument parsing and resolution, and adds ``GET /tokenselect/stats`` to SGLang's HTTP app
just before it serves (a BEFORE hook on ``_setup_and_run_http_server``, which receives the
resolved ServerArgs). No SGLang file is modified.
"""

from __future__ import annotations

import logging
import multiprocessing

logger = logging.getLogger(__name__)

_registered = False

SERVER_ARGS = "sglang.srt.server_args.ServerArgs"


def register() -> None:
    """Register the backend and its hooks; idempotent."""
    global _registered
    if _registered:
        return
    from sglang.srt.layers.attention.attention_registry import register_attention_backend
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType
    from sglang.srt.server_args import ATTENTION_BACKEND_CHOICES, ServerArgs, add_attention_backend_choices

    from sglang_tokenselect import server_args as hooks
    from sglang_tokenselect.backend import create_tokenselect_backend
    from sglang_tokenselect.server import routes

    if hooks.BACKEND_NAME not in ATTENTION_BACKEND_CHOICES:
        add_attention_backend_choices([hooks.BACKEND_NAME])
    register_attention_backend(hooks.BACKEND_NAME)(create_tokenselect_backend)
    HookRegistry.register(f"{SERVER_ARGS}.add_cli_args", hooks.after_add_cli_args, HookType.AFTER)
    HookRegistry.register(f"{SERVER_ARGS}.from_cli_args", hooks.around_from_cli_args, HookType.AROUND)
    if resolves_in_post_init(ServerArgs):  # SGLang 0.5.17
        compatibility = f"{SERVER_ARGS}._handle_attention_backend_compatibility"
        resolution = f"{SERVER_ARGS}.__post_init__"
    else:  # a resolution pipeline run by ServerArgs.resolve_once (SGLang 0.5.23)
        compatibility = "sglang.srt.arg_groups.attention_hook.handle_attention_backend_compatibility"
        resolution = f"{SERVER_ARGS}.resolve_once"
    HookRegistry.register(compatibility, hooks.after_attention_backend_compatibility, HookType.AFTER)
    HookRegistry.register(resolution, hooks.after_resolution, HookType.AFTER)
    if multiprocessing.parent_process() is None:
        # The launcher runs the HTTP server; applying a hook imports its target module, which the
        # spawned scheduler and detokenizer processes need not load (~1 s each).
        HookRegistry.register(routes.HTTP_SETUP_TARGET, routes.before_http_server, HookType.BEFORE)
    _registered = True
    logger.info("TokenSelect: registered attention backend %r", hooks.BACKEND_NAME)


def resolves_in_post_init(server_args_cls) -> bool:
    """SGLang 0.5.17 resolves arguments in ``ServerArgs.__post_init__`` (through the method
    ``_handle_attention_backend_compatibility``); 0.5.23 resolves them in ``resolve_once``,
    a pipeline whose attention step is ``arg_groups.attention_hook``'s function."""
    return hasattr(server_args_cls, "_handle_attention_backend_compatibility")
