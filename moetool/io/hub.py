"""``--push-to-hub``: upload a finished, verified output folder to a Hugging Face Hub repository.

A command publishes its output folder only after its own checks passed; :func:`push_folder` then
checks the published folder against its ``moetool-manifest.json`` (every byte as written) and its model
card (metadata the Hub accepts), and only then creates the repository (``exist_ok``) and uploads the
folder with ``HfApi.upload_folder`` in one commit, or one pull request with ``create_pr``. A failed
check uploads nothing. Re-running after an interrupted upload is cheap: the Hub keeps the large files
it already has (content-addressed), so only what is missing is sent again.

:func:`check_push_target` runs before any work: a malformed repo id, ``--offline``, or no token at all
fail in a second, not after an hour of quantization.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moetool.errors import MoetoolError, UsageError

__all__ = ["HubPushError", "PushResult", "check_push_target", "push_folder"]


class HubPushError(MoetoolError):
    """The upload was refused or failed (codes ``PUSH_REFUSED``, ``HUB_AUTH``, ``HUB_UPLOAD_FAILED``)."""

    default_code = "HUB_UPLOAD_FAILED"


@dataclass
class PushResult:
    """What :func:`push_folder` uploaded.

    Attributes:
        repo_id: the repository, ``owner/name``.
        repo_url: its page on the Hub.
        commit_url: the commit (or, with ``create_pr``, the pull request's commit).
        pr_url: the pull request, when one was opened.
        private: whether ``--private`` was asked (it applies when the repository is created).
        files: the files uploaded.
        bytes: their total size.
    """

    repo_id: str
    repo_url: str
    commit_url: str | None
    pr_url: str | None
    private: bool
    files: list[str] = field(default_factory=list)
    bytes: int = 0

    def to_json(self) -> dict[str, Any]:
        """The ``hub`` object added to a command's ``--json`` document."""
        return {
            "repo_id": self.repo_id,
            "repo_url": self.repo_url,
            "commit_url": self.commit_url,
            "pr_url": self.pr_url,
            "private": self.private,
            "files": self.files,
            "bytes": self.bytes,
        }


def _offline_env() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def check_push_target(repo_id: str, *, token: str | None = None, offline: bool | None = None) -> None:
    """Refuse a push that cannot work, before the command does its work.

    Args:
        repo_id: the ``--push-to-hub`` value.
        token: the ``--token`` value (``None``: ``HF_TOKEN`` or the token saved by ``hf auth login``).
        offline: ``--offline``; ``HF_HUB_OFFLINE=1`` counts too.

    Raises:
        UsageError: a malformed repo id (``HUB_REPO_ID``), or offline mode (``PUSH_OFFLINE``).
        HubPushError: no token anywhere (``HUB_AUTH``).
    """
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as exc:
        raise UsageError(
            f"--push-to-hub {repo_id!r} is not a Hub repo id: {str(exc).splitlines()[0]}",
            hint="use owner/name, e.g. my-org/tiny-moe-w4",
            code="HUB_REPO_ID",
        ) from None
    if "/" not in repo_id:
        raise UsageError(
            f"--push-to-hub {repo_id!r} has no owner",
            hint="use owner/name (your user name or an organization), e.g. my-org/tiny-moe-w4",
            code="HUB_REPO_ID",
        )
    if offline or _offline_env():
        raise UsageError(
            "--push-to-hub needs the network, but offline mode is on (--offline or HF_HUB_OFFLINE=1)",
            hint="drop --offline / unset HF_HUB_OFFLINE, or push later with `hf upload`",
            code="PUSH_OFFLINE",
        )
    if token is None:
        from huggingface_hub import get_token

        token = get_token()
    if not token:
        raise HubPushError(
            "--push-to-hub needs a Hub token with write access, and none was found",
            hint="run `hf auth login`, set HF_TOKEN, or pass --token",
            code="HUB_AUTH",
        )


def _check_folder(folder: Path) -> list[str]:
    """The folder's files, after checking it against its manifest and its card; raises on any difference."""
    from moetool.io.manifest import MANIFEST_NAME, verify_folder
    from moetool.io.model_card import README_NAME, CardError, validate_model_card

    check = verify_folder(folder)
    if not check.ok:
        details = [
            f"{label}: {', '.join(names[:5])}" + (f" and {len(names) - 5} more" if len(names) > 5 else "")
            for label, names in (("changed", check.changed), ("missing", check.missing), ("extra", check.extra))
            if names
        ]
        raise HubPushError(
            f"{folder} does not match its {MANIFEST_NAME} ({'; '.join(details)}); nothing was uploaded",
            hint=f"run `moetool verify {folder}` for the list, and rerun the command to rebuild the output",
            code="PUSH_REFUSED",
        )
    card = folder / README_NAME
    if card.is_file():
        try:
            validate_model_card(card)
        except CardError as exc:
            raise HubPushError(f"{exc.message}; nothing was uploaded", hint=exc.hint, code="PUSH_REFUSED") from None
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


def _hub_error(exc: Exception, repo_id: str) -> HubPushError:
    status = getattr(getattr(exc, "response", None), "status_code", None)
    first = str(exc).splitlines()[0] if str(exc).strip() else type(exc).__name__
    if status in (401, 403):
        return HubPushError(
            f"the Hub refused the upload to {repo_id} ({status}): {first}",
            hint="use a token with write access to that namespace (`hf auth login`, HF_TOKEN or --token)",
            code="HUB_AUTH",
        )
    return HubPushError(
        f"uploading to {repo_id} failed: {first}",
        hint="rerun the same command with --overwrite, or upload the folder with `hf upload`; files already "
        "on the Hub are not sent again",
    )


def push_folder(
    folder: Path,
    repo_id: str,
    *,
    private: bool = False,
    create_pr: bool = False,
    token: str | None = None,
    commit_message: str | None = None,
    api: Any = None,
) -> PushResult:
    """Verify a published output folder, then upload it to a Hub model repository.

    Args:
        folder: the published output folder (it must hold ``moetool-manifest.json``).
        repo_id: the target repository, ``owner/name``; created if missing.
        private: create the repository private (an existing repository keeps its visibility).
        create_pr: open a pull request instead of committing to the main branch.
        token: a Hub token (``None``: ``HF_TOKEN`` or the saved login).
        commit_message: the commit title (default: "Upload <folder name> with moetool").
        api: an ``HfApi``-like object (tests pass a stand-in); default ``HfApi(token=token)``.

    Returns:
        The repository, commit and pull-request URLs and what was uploaded.

    Raises:
        HubPushError: ``PUSH_REFUSED`` (the folder does not match its manifest, or its card is
            invalid; nothing was uploaded), ``HUB_AUTH`` (401/403), ``HUB_UPLOAD_FAILED``.
        ManifestError: the folder has no readable manifest.
    """
    folder = Path(folder)
    files = _check_folder(folder)
    if api is None:
        from huggingface_hub import HfApi

        api = HfApi(token=token)
    message = commit_message or f"Upload {folder.name} with moetool"
    try:
        repo_url = api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        commit = api.upload_folder(
            folder_path=str(folder),
            repo_id=repo_id,
            repo_type="model",
            commit_message=message,
            create_pr=create_pr,
        )
    except Exception as exc:  # HTTP errors, dropped connections (httpx's own classes), bad answers
        raise _hub_error(exc, repo_id) from None
    return PushResult(
        repo_id=getattr(repo_url, "repo_id", None) or repo_id,
        repo_url=str(repo_url),
        commit_url=getattr(commit, "commit_url", None),
        pr_url=getattr(commit, "pr_url", None),
        private=private,
        files=files,
        bytes=sum((folder / name).stat().st_size for name in files),
    )
