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
    from sglang.srt.server_args import ATTENTION_BACKEND_CHOICES, add_attention_backend_choices

    from sglang_tokenselect import server_args as hooks
    from sglang_tokenselect.backend import create_tokenselect_backend
    from sglang_tokenselect.server import routes

    if hooks.BACKEND_NAME not in ATTENTION_BACKEND_CHOICES:
        add_attention_backend_choices([hooks.BACKEND_NAME])
    register_attention_backend(hooks.BACKEND_NAME)(create_tokenselect_backend)
    HookRegistry.register(f"{SERVER_ARGS}.add_cli_args", hooks.after_add_cli_args, HookType.AFTER)
    HookRegistry.register(f"{SERVER_ARGS}.from_cli_args", hooks.around_from_cli_args, HookType.AROUND)
    HookRegistry.register(
        f"{SERVER_ARGS}._handle_attention_backend_compatibility",
        hooks.after_attention_backend_compatibility,
        HookType.AFTER,
    )
    HookRegistry.register(f"{SERVER_ARGS}.__post_init__", hooks.after_post_init, HookType.AFTER)
    if multiprocessing.parent_process() is None:
        # The launcher runs the HTTP server; applying a hook imports its target module, which the
        # spawned scheduler and detokenizer processes need not load (~1 s each).
        HookRegistry.register(routes.HTTP_SETUP_TARGET, routes.before_http_server, HookType.BEFORE)
    _registered = True
    logger.info("TokenSelect: registered attention backend %r", hooks.BACKEND_NAME)
