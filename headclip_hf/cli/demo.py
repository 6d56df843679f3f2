# Copyright 2026 The headclip_hf authors. Licensed under the Apache License, Version 2.0.
"""`headclip demo`: the Gradio demo app (`headclip_hf.demo`) on this machine."""

import argparse
import socket
from pathlib import Path

from ..demo import build_demo, import_gradio, sample_images
from ._common import CommandError, add_model_arguments, load_model_and_processor

DEFAULT_PORT = 7860
# The TCP port numbers a server can listen on.
PORTS = range(1, 65536)

EPILOG = f"""examples:
  headclip demo --model runs/mvtec/adapter                       # then open http://127.0.0.1:{DEFAULT_PORT}
  HF_HUB_OFFLINE=1 headclip demo --model /models/headclip-mvtec --port 8080
  headclip demo --model user/headclip-mvtec --host 0.0.0.0        # reachable from other machines

Upload an image (or pick a sample image): the page shows the heatmap, the predicted mask, the anomaly score and the
decision; sliders set the image and pixel thresholds (starting at the model's calibrated ones, if any). Needs Gradio:
pip install "headclip_hf[demo]". Ctrl-C stops the server."""


def add_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "demo",
        help="try a model in the browser (Gradio app)",
        description="Serve the HeadCLIP demo app: upload an image, see its heatmap, mask, score and decision.",
        epilog=EPILOG,
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to serve on (default: 127.0.0.1, this machine)")
    parser.add_argument("--port", type=port_number, default=DEFAULT_PORT, help=f"port (default: {DEFAULT_PORT})")
    parser.add_argument(
        "--examples",
        help="folder of example images offered on the page (default: the package's sample images)",
    )
    add_model_arguments(parser)
    parser.set_defaults(handler=run)


def port_number(text: str) -> int:
    """An argument type: a TCP port number, 1 to 65535."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number (1 to 65535)") from None
    if value not in PORTS:
        raise argparse.ArgumentTypeError(f"{text} is not a port number (1 to 65535)")
    return value


def check_port_free(host: str, port: int) -> None:
    """
    Check that a server can listen on `host:port` (binding it for a moment, as the server will), before the model
    loads.

    Raises:
        `CommandError`: the address is not this machine's, or the port is in use or not allowed.
    """
    try:
        family, kind, _, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        with socket.socket(family, kind) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server's own socket
            probe.bind(address)
    except OSError as error:
        reason = error.strerror or str(error)
        raise CommandError(
            f"Cannot serve on {host}:{port}: {reason}. Another program may be using the port: choose another with "
            f"--port (e.g. --port {port + 1 if port < PORTS[-1] else DEFAULT_PORT}), or check --host."
        ) from error


def run(args: argparse.Namespace) -> int:
    try:
        import_gradio()
    except ImportError as error:
        raise CommandError(str(error)) from error
    if args.examples is not None and not Path(args.examples).is_dir():
        raise CommandError(f"--examples {args.examples} is not a folder: pass a folder of images.")
    check_port_free(args.host, args.port)
    model, processor = load_model_and_processor(args.model, args.adapter, args.image_size, args.device)
    examples = None if args.examples is None else sample_images(args.examples)  # None: the sample images
    demo = build_demo(model, processor, examples=examples)
    demo.launch(server_name=args.host, server_port=args.port, prevent_thread_lock=True)
    print(f"Serving the HeadCLIP demo of {args.model} on http://{args.host}:{args.port} (Ctrl-C stops it).")
    demo.block_thread()  # what `launch` does without prevent_thread_lock, now that the server is up
    return 0
