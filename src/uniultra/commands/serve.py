"""`uniultra serve`: run the web app with uvicorn, on the loopback interface unless told otherwise."""

from __future__ import annotations

import argparse
import ipaddress
import sys

LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1"}


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "serve",
        help="interactive segmentation in the browser (web app + JSON API)",
        description="Serve the point-of-care web app: open an image, drag a box or tap points, see the mask. "
        "Listens on 127.0.0.1 only unless --host says otherwise; the API is documented at /docs.",
    )
    p.add_argument("--model", default="default",
                   help="checkpoint path, 'default' (bundled UniUltra-mini) or preset:NAME (random weights); "
                   "a checkpoint from `uniultra auto train` also enables the page's Auto button")
    p.add_argument("--size", type=int, default=None, help="model input size (default: the model's own)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    p.add_argument("--host", default="127.0.0.1",
                   help="interface to bind (default 127.0.0.1: this computer only; there is NO authentication)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--max-upload-mb", type=float, default=20.0, help="largest accepted upload in MB (default 20)")
    p.add_argument("--cache-size", type=int, default=8,
                   help="image embeddings kept in memory, least recently used dropped first (default 8)")
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
            "Anyone who can reach this address can upload images and use the model: there is no\n"
            "authentication and no encryption. Do not expose patient data this way; use the default\n"
            f"--host 127.0.0.1 (or an SSH tunnel / an authenticating TLS proxy) instead.\n{bar}")


def run_serve(args: argparse.Namespace) -> int:
    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port must be in 0..65535, got {args.port}")
    if args.max_upload_mb <= 0:
        raise ValueError(f"--max-upload-mb must be positive, got {args.max_upload_mb}")
    if args.cache_size < 1:
        raise ValueError(f"--cache-size must be at least 1, got {args.cache_size}")
    try:
        import uvicorn

        from uniultra.serve.app import create_app
    except ImportError as exc:
        print(f"uniultra serve: error: {exc.name} is not installed; install the server with "
              "pip install 'uniultra[serve]'", file=sys.stderr)
        return 2
    from uniultra.inference.loading import load_any_model

    model = load_any_model(args.model, image_size=args.size, device=args.device)
    app = create_app(model, max_upload_mb=args.max_upload_mb, cache_size=args.cache_size)
    base = getattr(model, "base", model)  # an automatic-mode model wraps a box-promptable base
    auto = "" if base is model else f", automatic mode for {', '.join(model.config.modalities)}"
    if not is_local(args.host):
        print(exposure_warning(args.host, args.port), file=sys.stderr, flush=True)
    shown = f"[{args.host}]" if ":" in args.host else args.host
    print(f"uniultra serve: model {args.model} ({base.config.name}, {base.config.image_size} px{auto}); "
          f"open http://{shown}:{args.port}/ in a browser (API docs at /docs)", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info")
    return 0
