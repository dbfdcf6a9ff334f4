"""`hotlora`: talk to a running hotlora-server from the shell.

    hotlora generate [--adapter NAME[@VERSION]] [--max-new-tokens N] [--temperature T] "prompt"
    hotlora generate --json-schema schema.json | --regex RE  "prompt"   # structured output
    hotlora models                 # what --adapter can name (no admin token needed)
    hotlora adapters list
    hotlora adapters load NAME [--version V | --path DIR]
    hotlora adapters unload NAME
    hotlora health                 # SERVING (exit 0) or NOT_SERVING (exit 1)

--target (or HOTLORA_TARGET) picks the server, default localhost:50051; --admin-token-file (or
HOTLORA_ADMIN_TOKEN_FILE, as the server names it; or the token itself in HOTLORA_ADMIN_TOKEN)
authenticates the adapters commands.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from .client import Client, HotloraClientError


def _global_options(parser: argparse.ArgumentParser, with_defaults: bool) -> argparse.ArgumentParser:
    """The options every command takes, before or after the command's name: the top-level parser
    holds the defaults; each command's copy has none, so it sets only what is given after it."""
    def default(value):
        return value if with_defaults else argparse.SUPPRESS

    parser.add_argument("--target", default=default(os.environ.get("HOTLORA_TARGET", "localhost:50051")),
                        help="server host:port [env HOTLORA_TARGET]")
    parser.add_argument("--admin-token-file", type=Path, default=default(os.environ.get("HOTLORA_ADMIN_TOKEN_FILE")),
                        help="file with the admin bearer token [env HOTLORA_ADMIN_TOKEN_FILE; or the token itself in "
                             "env HOTLORA_ADMIN_TOKEN]")
    parser.add_argument("--api-key-file", type=Path, default=default(os.environ.get("HOTLORA_API_KEY_FILE")),
                        help="file whose first key (the server's --api-key-file format) is sent as the API key "
                             "[env HOTLORA_API_KEY_FILE; or the key itself in env HOTLORA_API_KEY]")
    parser.add_argument("--tls", action="store_true", default=default(False),
                        help="connect with TLS, trusting the system's certificate authorities")
    parser.add_argument("--ca-cert", type=Path, default=default(None),
                        help="connect with TLS, trusting this PEM certificate (authority) [implies --tls]")
    parser.add_argument("--timeout", type=float, default=default(600.0), help="seconds per call")
    return parser


def _parser() -> argparse.ArgumentParser:
    p = _global_options(argparse.ArgumentParser(prog="hotlora", description="Client for hotlora-server.",
                                                formatter_class=argparse.ArgumentDefaultsHelpFormatter), True)
    common = _global_options(argparse.ArgumentParser(add_help=False), False)
    commands = p.add_subparsers(dest="command", required=True)

    def command(parent, name: str, **kwargs) -> argparse.ArgumentParser:
        return parent.add_parser(name, parents=[common], **kwargs)

    g = command(commands, "generate", help="generate a completion (streamed to stdout)")
    g.add_argument("prompt")
    g.add_argument("--adapter", default="", help='adapter name, or name@version; "" for the base model')
    g.add_argument("--max-new-tokens", type=int)
    g.add_argument("--temperature", type=float)
    g.add_argument("--top-p", type=float)
    g.add_argument("--top-k", type=int)
    g.add_argument("--seed", type=int)
    g.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    g.add_argument("--chat", action="store_true", help="send the prompt as one user message through the chat template")
    g.add_argument("--logprobs", type=int, metavar="N", help="print each token's logprob and N alternatives")
    g.add_argument("--echo", action="store_true",
                   help="print the prompt first; with --logprobs, each prompt token's logprob too and the prompt's "
                        "total log-likelihood (--max-new-tokens 0 scores the prompt only)")
    shape = g.add_mutually_exclusive_group()
    shape.add_argument("--json-schema", type=Path, metavar="FILE", help="hold the output to this JSON schema")
    shape.add_argument("--json-object", action="store_true", help="hold the output to any JSON object")
    shape.add_argument("--regex", help="hold the output to this regular expression")

    command(commands, "models", help="list what --adapter can name: the base model and every adapter")

    command(commands, "health", help="is the server serving? (exit 0 when SERVING)")

    a = command(commands, "adapters", help="list, load or unload adapters")
    actions = a.add_subparsers(dest="action", required=True)
    command(actions, "list")
    load = command(actions, "load")
    load.add_argument("name")
    load.add_argument("--version", default="")
    load.add_argument("--path", default="", help="PEFT directory on the server (must be allowed there)")
    unload = command(actions, "unload")
    unload.add_argument("name")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    token = os.environ.get("HOTLORA_ADMIN_TOKEN")
    if args.admin_token_file:
        token = args.admin_token_file.read_text().strip()
    key = os.environ.get("HOTLORA_API_KEY")
    if args.api_key_file:
        lines = (line.strip() for line in args.api_key_file.read_text().splitlines())
        key = next((line for line in lines if line and not line.startswith("#")), None)  # the server's file format
    try:
        with Client(args.target, admin_token=token, api_key=key, tls=args.tls, timeout=args.timeout,
                    root_certificates=args.ca_cert.read_bytes() if args.ca_cert else None) as client:
            if args.command == "generate":
                return _generate(client, args)
            if args.command == "models":
                for model in client.models():
                    print(model.id)
                return 0
            if args.command == "health":
                status = client.health()
                print(f"{args.target}: {status}")
                return 0 if status == "SERVING" else 1
            return _adapters(client, args)
    except HotloraClientError as exc:
        print(f"error: {exc.code.name}: {exc}", file=sys.stderr)
        return 1


def _generate(client: Client, args) -> int:
    prompt = [{"role": "user", "content": args.prompt}] if args.chat else args.prompt
    options = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                   top_k=args.top_k, seed=args.seed, stop=args.stop, top_logprobs=args.logprobs,
                   json_schema=args.json_schema.read_text() if args.json_schema else None, json_object=args.json_object,
                   regex=args.regex, prompt_logprobs=_prompt_logprobs(args))
    if args.echo:
        sys.stdout.write(args.prompt)
    for piece in client.stream(prompt, args.adapter, **options):
        if piece.prompt_token_ids:
            print(f"\n  [prompt token 0: id {piece.prompt_token_ids[0]}, nothing before it to score it]", file=sys.stderr)
            _print_logprobs(piece.prompt_logprobs)
            total = sum(lp.logprob for lp in piece.prompt_logprobs)
            print(f"  [prompt log-likelihood {total:.4f} over {len(piece.prompt_logprobs)} tokens]", file=sys.stderr)
        sys.stdout.write(piece.text)
        sys.stdout.flush()
        _print_logprobs(piece.logprobs)
        if piece.finish_reason:
            print(f"\n[{piece.finish_reason}; {piece.usage.prompt_tokens} prompt + {piece.usage.completion_tokens} "
                  f"generated tokens; adapter {args.adapter or 'none'}{'@' + piece.adapter_version if piece.adapter_version else ''}]",
                  file=sys.stderr)
    return 0


def _prompt_logprobs(args) -> int | None:
    """With --echo: --logprobs N alternatives, or none (0) when only the prompt is scored (--max-new-tokens 0)."""
    if not args.echo:
        return None
    return args.logprobs if args.logprobs is not None else (0 if args.max_new_tokens == 0 else None)


def _print_logprobs(logprobs) -> None:
    for lp in logprobs:
        others = ", ".join(f"{token!r} {logprob:.3f}" for _, token, logprob in lp.top)
        print(f"\n  [{lp.token!r} {lp.logprob:.3f}; top: {others}]", file=sys.stderr)


def _adapters(client: Client, args) -> int:
    if args.action == "list":
        rows = client.list_adapters()
        print(f"{'NAME':<24} {'VERSION':<20} {'CUR':<4} {'TIER':<6} {'RANK':>4} {'IN-FLIGHT':>9}  HASH")
        for a in rows:
            print(f"{a.name:<24} {a.version:<20} {'*' if a.current else '':<4} {a.tier:<6} {a.rank:>4} {a.in_flight:>9}  "
                  f"{a.content_hash[:12]}")
    elif args.action == "load":
        a = client.load_adapter(args.name, version=args.version, path=args.path)
        print(f"loaded {a.name}@{a.version} (rank {a.rank}, {', '.join(a.target_modules)}; {a.tier}; {a.content_hash[:12]})")
    else:
        client.unload_adapter(args.name)
        print(f"unloaded {args.name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
