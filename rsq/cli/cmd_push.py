"""`rsq push DIR REPO`: upload a checkpoint to the Hugging Face hub."""

from __future__ import annotations

from rsq.io.hub import push_folder


def add_parsers(sub) -> None:
    p = sub.add_parser(
        "push",
        help="upload a checkpoint directory to the Hugging Face hub",
        description="Create REPO on the hub (if needed) and upload DIR with huggingface_hub "
        "(HfApi.create_repo + upload_folder). Log in first: `hf auth login` or HF_TOKEN.",
    )
    p.add_argument("ckpt", metavar="DIR", help="checkpoint directory (rsq quantize --out DIR)")
    p.add_argument("repo", metavar="REPO", help="hub repository id, NAME or ORG/NAME")
    p.add_argument("--private", action="store_true", help="create the repository private")
    p.add_argument("--revision", default=None, help="branch to upload to (default: main)")
    p.add_argument("--message", default=None, help="commit message")
    p.set_defaults(func=cmd_push)


def cmd_push(args) -> int:
    url = push_folder(
        args.ckpt, args.repo, private=args.private or None, revision=args.revision, commit_message=args.message
    )
    print(f"pushed {args.ckpt} to {url}")
    return 0
