"""``python -m sglang_tokenselect.launch_server``: SGLang's server, tokenselect by default.

Every SGLang flag is accepted; ``--attention-backend`` defaults to ``tokenselect``.
"""

from __future__ import annotations

import os
import sys
from typing import Optional, Sequence

BACKEND_FLAGS = ("--attention-backend", "--prefill-attention-backend", "--decode-attention-backend")


def with_default_backend(argv: Sequence[str]) -> list[str]:
    """Prepend ``--attention-backend tokenselect`` unless a backend flag is given."""
    argv = list(argv)
    given = any(a == f or a.startswith(f + "=") for a in argv for f in BACKEND_FLAGS)
    return argv if given else ["--attention-backend", "tokenselect", *argv]


def main(argv: Optional[Sequence[str]] = None) -> None:
    from sglang.launch_server import run_server
    from sglang.srt.plugins import load_plugins
    from sglang.srt.server_args import prepare_server_args
    from sglang.srt.utils import kill_process_tree

    from sglang_tokenselect.plugin import register

    load_plugins()  # the installed entry point, as in every SGLang process
    register()  # no-op when the entry point already ran; covers an uninstalled checkout
    from sglang.srt.plugins.hook_registry import HookRegistry

    HookRegistry.apply_hooks()
    server_args = prepare_server_args(with_default_backend(sys.argv[1:] if argv is None else argv))
    try:
        run_server(server_args)
    finally:
        kill_process_tree(os.getpid(), include_parent=False)


if __name__ == "__main__":
    main()
