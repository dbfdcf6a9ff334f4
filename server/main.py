"""`hotlora-server`: flags -> config -> build -> serve.

Today it has one subcommand, `make-model`, which writes a seeded random-weight checkpoint
directory (see server.model_factory). The gRPC server itself (flags --model, --adapters, ...)
is issue #3 and is not implemented yet; running without a subcommand says so.
"""

from __future__ import annotations

import sys

SUBCOMMANDS = {"make-model": "server.model_factory"}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in SUBCOMMANDS:
        import importlib

        importlib.import_module(SUBCOMMANDS[argv[0]]).main(argv[1:])
        return 0
    print("usage: hotlora-server make-model DIR [--preset tiny|tiny-qwen2|tiny-tied|small|1b] [--seed N]\n"
          "The gRPC server (hotlora-server --model DIR --adapters STORE ...) is not implemented yet (issue #3).",
          file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
