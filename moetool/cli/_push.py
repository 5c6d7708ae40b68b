"""``--push-to-hub`` in the write commands: checked before the work, run after the output is published."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.markup import escape

from moetool.cli._output import stdout
from moetool.cli._progress import progress_enabled, status
from moetool.errors import UsageError

__all__ = ["PushTarget", "add_push", "push_output", "push_target", "render_push"]


@dataclass(frozen=True)
class PushTarget:
    """Where and how to upload (the ``--push-to-hub``, ``--private``, ``--create-pr``, ``--token`` values)."""

    repo_id: str
    private: bool
    create_pr: bool
    token: str | None


def push_target(
    repo_id: str | None,
    *,
    private: bool,
    create_pr: bool,
    token: str | None,
    offline: bool,
    dry_run: bool = False,
) -> PushTarget | None:
    """Check the push options before any work; ``None`` without ``--push-to-hub``.

    Raises:
        UsageError: ``--private``/``--create-pr`` without ``--push-to-hub``, with ``--dry-run``, a malformed
            repo id, or offline mode.
        HubPushError: no Hub token (``HUB_AUTH``).
    """
    if repo_id is None:
        if private or create_pr:
            raise UsageError(
                f"{'--private' if private else '--create-pr'} only applies with --push-to-hub",
                hint="add --push-to-hub owner/name, or drop the option",
            )
        return None
    if dry_run:
        raise UsageError("--dry-run writes nothing, so there is nothing to --push-to-hub", hint="drop one of the two")
    from moetool.io.hub import check_push_target

    check_push_target(repo_id, token=token, offline=offline)
    return PushTarget(repo_id=repo_id, private=private, create_pr=create_pr, token=token)


def push_output(target: PushTarget | None, folder: str | Path, *, command: str, json_output: bool) -> Any:
    """Verify the published folder and upload it (see :func:`moetool.io.hub.push_folder`); ``None`` without a target."""
    if target is None:
        return None
    from moetool.io.hub import push_folder

    show = progress_enabled(json_output)
    if not show:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()  # huggingface_hub's tqdm bars would interleave with --json or a log
    with status(f"uploading {folder} to {target.repo_id}", enabled=show):
        return push_folder(
            Path(folder),
            target.repo_id,
            private=target.private,
            create_pr=target.create_pr,
            token=target.token,
            commit_message=f"Upload {Path(folder).name} made with `moetool {command}`",
        )


def add_push(document: dict[str, Any], pushed: Any) -> dict[str, Any]:
    """The ``--json`` document with a ``hub`` object when the output was uploaded."""
    return {**document, "hub": pushed.to_json()} if pushed is not None else document


def render_push(pushed: Any) -> None:
    """One line saying where the output went."""
    if pushed is None:
        return
    where = pushed.pr_url or pushed.commit_url or pushed.repo_url
    kind = "opened a pull request on" if pushed.pr_url else "uploaded to"
    stdout().print(
        f"{kind} [bold]{escape(pushed.repo_id)}[/bold]: {len(pushed.files)} files  {escape(str(where))}",
        highlight=False,
    )
