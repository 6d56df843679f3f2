# Copyright 2026 The headclip_hf authors. Licensed under the Apache License, Version 2.0.
"""`headclip dataset export`: an anomaly data set as Parquet with embedded images and a dataset card; Hub upload."""

import argparse

from ..dataset_export import (
    DATA_FOLDER,
    DATASET_CARD,
    DEFAULT_MAX_SHARD_SIZE,
    export_anomaly_dataset,
    parse_shard_size,
    upload_anomaly_dataset,
)
from ..hub import check_repo_id, check_upload_access
from ._common import CommandError, add_data_arguments, add_output_dir_argument, data_arguments

EXPORT_EPILOG = f"""examples:
  headclip dataset export data/mvtec_ad --split test train --output_dir exports/mvtec_ad
  headclip dataset export data/mvtec_ad --output_dir exports/mvtec_ad --push_to_hub user/mvtec-ad --private
  headclip dataset export my_table.parquet --label_column is_defective --mask_column gt --output_dir exports/mine
  headclip evaluate exports/mvtec_ad --model runs/visa/adapter     # an export loads like the folder it came from

Writes OUTPUT_DIR/{DATA_FOLDER}/<split>-<index>-of-<count>.parquet (image and mask bytes embedded; `path` relative to
the source folder) and OUTPUT_DIR/{DATASET_CARD}, a dataset card (features, images per split and category, licence
and citation from the source's README when it has them). With --push_to_hub the folder is then uploaded (log in first
with `hf auth login`, or pass --token; the login is checked before the export)."""


def add_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "dataset",
        help="anomaly data sets: export as Parquet with a dataset card, publish on the Hub",
        description="Work with anomaly data sets in the Hugging Face format.",
    )
    actions = parser.add_subparsers(dest="action", required=True, metavar="action")
    export = actions.add_parser(
        "export",
        help="write Parquet shards with embedded images and a dataset card; optionally upload them",
        description="Export an anomaly data set (any source `headclip evaluate` reads) as Parquet shards with the "
        "images and masks embedded, plus a dataset card, so that it moves between machines and can be shared on "
        "the Hub.",
        epilog=EXPORT_EPILOG,
    )
    add_data_arguments(export, several_splits=True, streaming=False)
    add_output_dir_argument(export, None, "the Parquet shards and the dataset card")
    export.add_argument(
        "--max_shard_size",
        default=DEFAULT_MAX_SHARD_SIZE,
        help=f"largest Parquet shard before compression (default: {DEFAULT_MAX_SHARD_SIZE})",
    )
    export.add_argument("--license", help="Hub licence id for the card (default: from the source's README)")
    export.add_argument("--citation", help="citation for the card (default: from the source's README)")
    export.add_argument("--pretty_name", help="title of the card (default: the source's name)")
    export.add_argument("--push_to_hub", metavar="REPO_ID", help="upload the folder to this Hub data set repository")
    export.add_argument("--private", action="store_true", help="create the Hub repository as private")
    export.add_argument("--token", help="Hub token (default: the one of `hf auth login` or HF_TOKEN)")
    export.set_defaults(handler=run_export)


def run_export(args: argparse.Namespace) -> int:
    if args.push_to_hub is not None:
        check_repo_id(args.push_to_hub)
    try:
        parse_shard_size(args.max_shard_size)
    except ValueError as error:
        raise CommandError(str(error)) from error
    if args.push_to_hub is not None:  # the login, before the export
        check_upload_access(args.token, without_upload="leave out --push_to_hub")
    folder = export_anomaly_dataset(
        args.data,
        args.output_dir,
        splits=args.split,
        max_shard_size=args.max_shard_size,
        license=args.license,
        citation=args.citation,
        pretty_name=args.pretty_name,
        repo_id=args.push_to_hub,
        overwrite=args.overwrite,
        **data_arguments(args),
    )
    print(f"Exported {args.data} (splits {', '.join(args.split)}) to {folder}.")
    if args.push_to_hub is not None:
        url = upload_anomaly_dataset(folder, args.push_to_hub, private=args.private, token=args.token)
        print(f"Uploaded {args.push_to_hub}: {url}")
    return 0
