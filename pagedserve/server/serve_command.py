"""`pagedserve serve [MODEL]`: the OpenAI-compatible server (flags mirror vLLM's)."""
from __future__ import annotations

import argparse
import os


def add_parser(sub) -> None:
    from pagedserve.entrypoints.engine_args import add_engine_args
    from pagedserve.server.tool_parsers import TOOL_PARSERS

    p = sub.add_parser("serve", help="serve a model over an OpenAI-compatible HTTP API",
                       description="Serve MODEL (an HF directory, a .gguf file or a Hub id in the local cache; "
                                   "default: the embedded SmolLM2-135M-Instruct) on an OpenAI-compatible API.")
    p.add_argument("model", nargs="?", default=None, help="the model (same as --model)")
    add_engine_args(p)
    g = p.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0 for every interface)")
    g.add_argument("--port", type=int, default=8000)
    g.add_argument("--served-model-name", nargs="+", default=None,
                   help="name(s) clients use in `model`; the first is reported (default: the model path)")
    g.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' on /v1/*, /tokenize and /detokenize "
                        "(default: $PAGEDSERVE_API_KEY, else none)")
    g.add_argument("--chat-template", default=None,
                   help="the chat template to use instead of the tokenizer's (a file, or the Jinja text itself)")
    g.add_argument("--trust-request-chat-template", action="store_true",
                   help="accept a chat template sent in a request (`chat_template`, also inside "
                        "`chat_template_kwargs`); refused with 400 by default. Rendering is sandboxed and bounded "
                        "either way")
    g.add_argument("--max-queue-len", type=int, default=None,
                   help="answer 429 when more than this many requests wait for the engine (default: no limit)")
    g.add_argument("--shutdown-timeout", type=float, default=30.0,
                   help="seconds SIGTERM waits for in-flight requests to finish")
    g.add_argument("--enable-access-log", action="store_true", help="log every HTTP request (off by default)")
    g.add_argument("--disable-log-requests", action="store_true", help="no per-request completion log lines")
    t = p.add_argument_group("tool calling")
    t.add_argument("--enable-auto-tool-choice", action="store_true",
                   help='accept tool_choice "auto" (the default when a request has tools); needs --tool-call-parser')
    t.add_argument("--tool-call-parser", default=None, choices=sorted(TOOL_PARSERS),
                   help="how to find tool calls in the model's text: hermes (Qwen2.5/Qwen3, Hermes, the default "
                        "model), llama3_json (Llama 3.x)")
    t.add_argument("--exclude-tools-when-tool-choice-none", action="store_true",
                   help='do not show the tools to the chat template when tool_choice is "none"')
    from pagedserve.answer_cache.args import add_answer_cache_args

    add_answer_cache_args(p)
    try:  # data parallel: `serve --replicas N` runs N of these servers behind the router
        from pagedserve.cluster.launcher import add_cluster_args
    except ImportError:
        pass
    else:
        add_cluster_args(p)
    p.set_defaults(func=run)


def read_chat_template(arg: str | None) -> str | None:
    """--chat-template: a file's contents, or the argument itself when it names no file."""
    from pathlib import Path

    from pagedserve.errors import ConfigError

    if arg is None:
        return None
    if Path(arg).is_file():
        return Path(arg).read_text()
    if "{" not in arg:
        raise ConfigError(f"--chat-template {arg!r}: no such file, and not a Jinja template",
                          param="chat_template")
    return arg


def run(args: argparse.Namespace) -> int:
    from pagedserve.entrypoints.engine_args import engine_kwargs
    from pagedserve.errors import ConfigError
    from pagedserve.server.api import ServerOptions, default_served_name, serve

    if args.model and args.model_opt and args.model != args.model_opt:
        raise ConfigError(f"two different models given: {args.model!r} and --model {args.model_opt!r}")
    model = args.model or args.model_opt
    from pagedserve.server.tool_calling import ToolOptions

    # Checked here so that `serve --replicas N` fails at once too, not in each replica.
    tools = ToolOptions(args.enable_auto_tool_choice, args.tool_call_parser, args.exclude_tools_when_tool_choice_none)
    if getattr(args, "replicas", 1) > 1:
        from pagedserve.cluster.launcher import run_cluster

        return run_cluster(args)
    if args.max_queue_len is not None and args.max_queue_len < 0:
        raise ConfigError("--max-queue-len must be >= 0", param="max_queue_len")
    from pagedserve.ports import check_port_free

    check_port_free(args.host, args.port)  # before minutes of model loading, not after
    api_key = args.api_key or os.environ.get("PAGEDSERVE_API_KEY") or None
    from pagedserve.answer_cache.args import config_from_args

    opts = ServerOptions(served_model_names=args.served_model_name or [default_served_name(model)],
                         api_key=api_key, max_queue_len=args.max_queue_len,
                         log_requests=not args.disable_log_requests, host=args.host, port=args.port,
                         answer_cache=config_from_args(args, salt=api_key or ""), tools=tools,
                         trust_request_chat_template=args.trust_request_chat_template,
                         chat_template=read_chat_template(args.chat_template))
    return serve(engine_kwargs(args, model), opts, shutdown_timeout=args.shutdown_timeout,
                 access_log=args.enable_access_log)
