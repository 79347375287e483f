"""Upload a checkpoint directory to the Hugging Face hub (`rsq push DIR REPO`), with huggingface_hub's
upload API: ``HfApi().create_repo`` then ``upload_folder``. Network and authorisation failures
become one-line :class:`rsq.errors.HubError` messages."""

from __future__ import annotations

from pathlib import Path

from rsq.errors import ConfigError, HubError

# written by rsq quantize but not part of a model repo's weights; uploaded unless excluded
IGNORE = ["*.partial", "*.tmp", "state.json", "layer-*.safetensors"]


def _reason(exc: BaseException) -> str:
    """The first line of the innermost cause (a DNS or connection error reads better than its wrapper)."""
    while exc.__cause__ is not None or exc.__context__ is not None:
        exc = exc.__cause__ or exc.__context__
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {text}"[:240]


def push_folder(
    folder: str | Path,
    repo_id: str,
    *,
    private: bool | None = None,
    token: str | None = None,
    revision: str | None = None,
    commit_message: str | None = None,
) -> str:
    """Create ``repo_id`` (if needed) and upload ``folder``; returns the commit URL."""
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise ConfigError(f"{folder} has no config.json: push a checkpoint directory (rsq quantize --out DIR)")
    if repo_id.count("/") > 1 or not repo_id.strip("/"):
        raise ConfigError(f"repo id {repo_id!r} should look like NAME or ORG/NAME")
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    step = "create the repository"
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        step = "upload the folder"
        info = api.upload_folder(
            folder_path=str(folder),
            repo_id=repo_id,
            repo_type="model",
            revision=revision,
            commit_message=commit_message or f"rsq checkpoint {folder.name}",
            ignore_patterns=IGNORE,
        )
    except Exception as exc:  # connection, DNS, offline mode, 401/403/404 from the hub
        raise HubError(
            f"could not {step} {repo_id} on the Hugging Face hub ({_reason(exc)}); check the network, "
            "then log in (`hf auth login` or HF_TOKEN) with write access"
        ) from exc
    return str(getattr(info, "commit_url", info))
