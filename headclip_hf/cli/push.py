# Copyright 2026 The headclip_hf authors. Licensed under the Apache License, Version 2.0.
"""`headclip push`: publish a trained HeadCLIP with its model card on the Hugging Face Hub."""

import argparse
import tempfile
from pathlib import Path

import torch
from huggingface_hub import ModelCard

from ..adapters import is_peft_adapter
from ..files import check_output_folder
from ..hub import (
    DEFAULT_LICENSE,
    HUB_FOLDER_OUTPUT,
    check_repo_id,
    check_upload_access,
    render_model_card,
    save_hub_folder,
    upload_hub_folder,
)
from ..modeling_headclip import HeadCLIPModel
from ..provenance import check_results_provenance
from ..reporting import RESULTS_JSON, RESULTS_MARKDOWN
from ..space import SPACE_OUTPUT, publish_space
from ._common import (
    CommandError,
    add_model_arguments,
    add_output_dir_argument,
    load_model_and_processor,
    resolve_device,
)

EPILOG = """examples:
  headclip push --model runs/mvtec/adapter --results eval/visa --train_dataset "MVTec AD" --eval_dataset VisA \\
      --repo_id user/headclip-mvtec --dry_run --output_dir hub-preview/
  headclip push --model runs/mvtec/adapter --results eval/visa --train_dataset "MVTec AD" --eval_dataset VisA \\
      --repo_id user/headclip-mvtec --private --revision v1
  headclip push ... --repo_id user/headclip-mvtec --space user/headclip-demo   # also the demo app as a Space

The repository holds the full model with its remote code and the custom pipeline (loads with
AutoModel/pipeline(..., trust_remote_code=True) without headclip_hf), or with --adapter_only the adapter alone;
plus the processor, the model card (README.md, metrics in its table and model-index metadata) and the evaluation
run under evaluation/. With --space, a Gradio Space (the `headclip demo` app, the package's source, the sample images)
that loads the model is uploaded after it; with --dry_run it is only written, to --space_dir. Log in first
(`hf auth login`) or pass --token. The repository ids, the output folders and (unless --dry_run) the Hub login are
checked before the model loads."""


def add_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "push",
        help="publish a trained HeadCLIP with its model card on the Hub",
        description="Publish a trained HeadCLIP on the Hugging Face Hub, with a model card holding its metrics.",
        epilog=EPILOG,
    )
    parser.add_argument("--repo_id", required=True, help="Hub repository, user/name")
    parser.add_argument(
        "--results", required=True, help="the --output_dir folder of `headclip evaluate` for this model"
    )
    parser.add_argument("--train_dataset", required=True, help='data set the model was trained on, e.g. "MVTec AD"')
    parser.add_argument("--eval_dataset", required=True, help="data set of the --results run, e.g. VisA")
    parser.add_argument(
        "--license", default=DEFAULT_LICENSE, help=f"Hub licence id (default: {DEFAULT_LICENSE}, MVTec AD's)"
    )
    parser.add_argument(
        "--base_model", help="Hub id of the base CLIP (default: where the model came from, if the Hub)"
    )
    parser.add_argument("--adapter_only", action="store_true", help="publish the adapter only, not the full model")
    parser.add_argument(
        "--dry_run", action="store_true", help="write the repository folder to --output_dir, no upload"
    )
    add_output_dir_argument(
        parser, None, "the repository folder (default: a temporary folder; --dry_run needs it)", required=False
    )
    parser.add_argument("--private", action="store_true", help="create the repository as private")
    parser.add_argument("--revision", help="branch to push to (created if missing; default: main)")
    parser.add_argument("--token", help="Hub token (default: the one of `hf auth login` or HF_TOKEN)")
    parser.add_argument("--commit_message", default="Upload HeadCLIP", help="commit message")
    parser.add_argument(
        "--space", metavar="SPACE_ID", help="also publish the demo app as a Gradio Space (user/name) showing the model"
    )
    parser.add_argument(
        "--space_dir",
        help="where to write the Space folder (needed with --dry_run; default: a temporary folder); --overwrite "
        "applies to it too",
    )
    add_model_arguments(parser, cpu_default="publishing only loads and saves the model, no accelerator needed")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    """Run `headclip push`: check the inputs, load the model, write the repository folder, upload it."""
    device = _check_inputs(args)
    model, processor = load_model_and_processor(args.model, args.adapter, args.image_size, device)
    check_results_provenance(Path(args.results) / RESULTS_JSON, model)  # the numbers published must be this model's
    base_model = _base_model(args, model)
    card = _model_card(args, model, base_model)
    with tempfile.TemporaryDirectory(prefix="headclip-push-") as temporary:
        folder = Path(args.output_dir or Path(temporary) / "repo")
        save_hub_folder(
            model,
            processor,
            folder,
            card,
            args.results,
            adapter_only=args.adapter_only,
            base_model=base_model,
            overwrite=args.overwrite,
        )
        if args.dry_run:
            print(f"Dry run: wrote the repository folder for {args.repo_id} to {folder}; nothing was uploaded.")
            _publish_space(args)
            return 0
        url = upload_hub_folder(
            folder,
            args.repo_id,
            private=args.private,
            revision=args.revision,
            token=args.token,
            commit_message=args.commit_message,
            output_kind=HUB_FOLDER_OUTPUT,
        )
    print(f"Uploaded {args.repo_id}: {url}")
    _publish_space(args)
    return 0


def _check_inputs(args: argparse.Namespace) -> torch.device:
    """
    Everything that can be refused before the model loads: the repository id, the evaluation results, the kind of
    adapter, the output folder, the device and (for an upload) the Hub login. Returns the device.
    """
    if args.dry_run and args.output_dir is None:
        raise CommandError("--dry_run writes the repository folder to --output_dir: pass --output_dir DIR.")
    for repo_id in (args.repo_id, args.space):
        if repo_id is not None:
            check_repo_id(repo_id)
    if args.space is not None and args.dry_run and args.space_dir is None:
        raise CommandError("--dry_run writes the Space folder to --space_dir: pass --space_dir DIR.")
    if args.space is not None and args.space_dir is not None:
        check_output_folder(args.space_dir, SPACE_OUTPUT, args.overwrite)
    results_dir = Path(args.results)
    if not all((results_dir / name).is_file() for name in (RESULTS_JSON, RESULTS_MARKDOWN)):
        raise CommandError(
            f"{results_dir} holds no evaluation results ({RESULTS_JSON}, {RESULTS_MARKDOWN}): pass the --output_dir "
            "folder of `headclip evaluate`."
        )
    if args.adapter_only and is_peft_adapter(args.adapter or args.model):
        raise CommandError(
            "A LoRA (PEFT) adapter changes the CLIP backbone, which a HeadCLIP adapter does not hold: publish the "
            "full model (without --adapter_only)."
        )
    if args.output_dir is not None:
        check_output_folder(args.output_dir, HUB_FOLDER_OUTPUT, args.overwrite)
    device = resolve_device(args.device)
    if not args.dry_run:
        check_upload_access(args.token)
    return device


def _base_model(args: argparse.Namespace, model: HeadCLIPModel) -> str | None:
    """The Hub id of the base CLIP the card and an adapter-only repository name (`--base_model`, else the origin)."""
    base_model = args.base_model or _hub_id_or_none(model.config._name_or_path)
    if args.adapter_only and base_model is None:
        raise CommandError(
            f"The model came from the local folder {model.config._name_or_path}: an adapter-only repository must name "
            "its base on the Hub, pass --base_model (e.g. openai/clip-vit-large-patch14-336)."
        )
    return base_model


def _model_card(args: argparse.Namespace, model: HeadCLIPModel, base_model: str | None) -> ModelCard:
    return render_model_card(
        model,
        args.results,
        repo_id=args.repo_id,
        train_dataset=args.train_dataset,
        eval_dataset=args.eval_dataset,
        license=args.license,
        base_model=base_model,
        adapter_only=args.adapter_only,
    )


def _publish_space(args: argparse.Namespace) -> None:
    """With --space: write (and unless --dry_run, upload) the Space showing the model, after the model itself."""
    if args.space is None:
        return
    space_url = publish_space(
        args.space,
        args.repo_id,
        folder=args.space_dir,
        upload=not args.dry_run,
        model_revision=args.revision,
        license=args.license,
        private=args.private,
        token=args.token,
        overwrite=args.overwrite,
    )
    if space_url is None:
        print(f"Dry run: wrote the Space folder for {args.space} to {args.space_dir}; nothing was uploaded.")
    else:
        print(f"Uploaded the Space {args.space}: {space_url}")


def _hub_id_or_none(name_or_path: str) -> str | None:
    """`name_or_path` if it names a Hub repository rather than a local folder."""
    return None if not name_or_path or Path(name_or_path).exists() else name_or_path
