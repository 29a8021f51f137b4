"""`uniultra serve`: run the web app with uvicorn, on the loopback interface unless told otherwise."""

from __future__ import annotations

import argparse
import ipaddress
import os
import socket
import sys
from urllib.parse import quote

from uniultra.commands.runtime_option import add_runtime_arg, model_spec

LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1"}
TOKEN_ENV = "UNIULTRA_TOKEN"
WILDCARD_HOSTS = {"0.0.0.0", "::", ""}


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "serve",
        help="interactive segmentation in the browser (web app + JSON API)",
        description="Serve the point-of-care web app: open an image, drag a box or tap points, see the mask. "
        "Listens on 127.0.0.1 only unless --host says otherwise (then an access token is required); the API "
        "is documented at /docs.",
    )
    p.add_argument("--model", default="default",
                   help="checkpoint path, 'default' (bundled UniUltra-mini) or preset:NAME (random weights); "
                   "a checkpoint from `uniultra auto train` also enables the page's Auto button")
    p.add_argument("--size", type=int, default=None, help="model input size (default: the model's own)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    add_runtime_arg(p)
    p.add_argument("--host", default="127.0.0.1",
                   help="interface to bind (default 127.0.0.1: this computer only); any other needs --token")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--max-upload-mb", type=float, default=20.0, help="largest accepted upload in MB (default 20)")
    p.add_argument("--cache-size", type=int, default=8,
                   help="image embeddings kept per client, its least recently used dropped first (default 8)")
    p.add_argument("--total-cache-size", type=int, default=32,
                   help="image embeddings kept for all clients together (default 32)")
    p.add_argument("--token", default=os.environ.get(TOKEN_ENV) or None,
                   help=f"access token every request must carry (default: ${TOKEN_ENV}); required with a --host "
                   "beyond this computer. The page logs in through the printed address (…/?token=TOKEN)")
    p.add_argument("--allow-host", action="append", default=[], metavar="NAME",
                   help="also answer requests addressed to NAME (the Host header; repeatable). Always allowed: "
                   "localhost, 127.0.0.1, ::1 and the --host address")
    p.set_defaults(func=run_serve)


def is_local(host: str) -> bool:
    if host in LOCAL_HOSTS:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def exposure_warning(host: str, port: int) -> str:
    bar = "!" * 78
    return (f"{bar}\nWARNING: uniultra serve is listening on {host}:{port}, NOT only on this computer.\n"
            "Requests need the access token, but there is no encryption: the token and the images\n"
            "cross the network in clear text. Do not expose patient data this way; use the default\n"
            f"--host 127.0.0.1 with an SSH tunnel, or a TLS reverse proxy, instead.\n{bar}")


def allowed_hosts(host: str, extra: list[str]) -> list[str]:
    """The names requests may address the server by: this computer's, the bound address (for a
    wildcard bind, this machine's name), and the --allow-host names."""
    bound = [socket.gethostname()] if host in WILDCARD_HOSTS else [host]
    return sorted({*LOCAL_HOSTS, *bound, *extra})


def _check_exposure(host: str, token: str | None) -> None:
    if not is_local(host) and not token:
        raise ValueError(f"--host {host} reaches beyond this computer: refusing to start without an access "
                         f"token; pass --token TOKEN or set {TOKEN_ENV} (e.g. to the output of "
                         "python -c 'import secrets; print(secrets.token_urlsafe())')")


def run_serve(args: argparse.Namespace) -> int:
    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port must be in 0..65535, got {args.port}")
    if args.max_upload_mb <= 0:
        raise ValueError(f"--max-upload-mb must be positive, got {args.max_upload_mb}")
    if args.cache_size < 1:
        raise ValueError(f"--cache-size must be at least 1, got {args.cache_size}")
    if args.total_cache_size < args.cache_size:
        raise ValueError(f"--total-cache-size ({args.total_cache_size}) must be at least --cache-size "
                         f"({args.cache_size})")
    _check_exposure(args.host, args.token)
    try:
        import uvicorn

        from uniultra.serve.app import create_app
    except ImportError as exc:
        print(f"uniultra serve: error: {exc.name} is not installed; install the server with "
              "pip install 'uniultra[serve]'", file=sys.stderr)
        return 2
    from uniultra.inference.loading import load_for_serving

    model, described = load_for_serving(model_spec(args), image_size=args.size, device=args.device)
    app = create_app(model, max_upload_mb=args.max_upload_mb, cache_size=args.cache_size,
                     total_cache_size=args.total_cache_size, allowed_hosts=allowed_hosts(args.host, args.allow_host),
                     token=args.token)
    if not is_local(args.host):
        print(exposure_warning(args.host, args.port), file=sys.stderr, flush=True)
    shown = f"[{args.host}]" if ":" in args.host else args.host
    login = f"?token={quote(args.token, safe='')}" if args.token else ""
    print(f"uniultra serve: model {args.model} ({described}); "
          f"open http://{shown}:{args.port}/{login} in a browser (API docs at /docs)", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")
    return 0
