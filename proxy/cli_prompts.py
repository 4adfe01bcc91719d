"""`llmrelay prompts push FILE`: a prompt kept in a YAML file, pushed to a running gateway's admin API.

The file holds the prompt's fields (`prompt_id` required, `name`, `description`, `tags`,
`starred`), one version's fields (`messages`, `model`, `temperature`, `variables`, ...,
`fallback_models`, `load_balance_models`) and optionally `deploy` and `commit_message`. The first
push creates the prompt and its version 1; a later one creates a new version only when the version
fields differ from the newest version's, and otherwise prints "unchanged".
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any
from urllib.parse import quote

import yaml

from proxy.cli_keys import DEFAULT_URL, AdminError, admin_request

PROMPT_FIELDS = ("name", "description", "tags", "starred")
PUSH_FIELDS = ("deploy", "commit_message")
# not compared: the file's `description` is the prompt's, and a commit message alone makes no new version
NOT_COMPARED = ("commit_message", "description")


def read_file(path: str) -> dict[str, Any]:
    try:
        data = yaml.safe_load(Path(path).read_text())
    except OSError as exc:
        raise AdminError(f"{path}: cannot read it: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise AdminError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise AdminError(f"{path}: expected a mapping of prompt fields")
    if not isinstance(data.get("prompt_id"), str) or not data["prompt_id"]:
        raise AdminError(f"{path}: prompt_id: required, so that later pushes find the prompt")
    return data


def _empty(value: Any) -> bool:
    return value is None or value == {} or value == []


def changed(wanted: dict[str, Any], latest: dict[str, Any] | None) -> bool:
    """Whether the file's version fields differ from the newest version's (absent = null = empty)."""
    if latest is None:
        return True
    for name in set(wanted) | {k for k in latest if k not in ("version", "is_draft", "is_deployed", "created_at",
                                                                "committed_at")}:
        if name in NOT_COMPARED:
            continue
        ours, theirs = wanted.get(name), latest.get(name)
        if not (ours == theirs or (_empty(ours) and _empty(theirs))):
            return True
    return False


def push(args: argparse.Namespace) -> int:
    data = read_file(args.file)
    prompt_id = data["prompt_id"]
    path = f"/api/prompts/{quote(prompt_id, safe='')}/"
    prompt_fields = {k: data[k] for k in PROMPT_FIELDS if k in data}
    version_fields = {k: v for k, v in data.items() if k not in (*PROMPT_FIELDS, *PUSH_FIELDS, "prompt_id")}
    deploy = data.get("deploy", False)
    current = admin_request(args, "GET", path)
    if current is None:
        admin_request(args, "POST", "/api/prompts/", {"prompt_id": prompt_id, **prompt_fields})
        print(f"created prompt {prompt_id}")
        latest = None
    else:
        edits = {k: v for k, v in prompt_fields.items() if current.get(k) != v}
        if edits:
            admin_request(args, "PATCH", path, edits)
            print(f"prompt {prompt_id}: updated {', '.join(sorted(edits))}")
        number = current.get("latest_version")
        latest = admin_request(args, "GET", f"{path}versions/{number}/") if number is not None else None
    if not changed(version_fields, latest):
        assert latest is not None
        if deploy and not latest["is_deployed"]:
            admin_request(args, "POST", f"{path}deployments/", {"version": latest["version"]})
            print(f"prompt {prompt_id}: unchanged; deployed version {latest['version']}")
        else:
            print(f"prompt {prompt_id}: unchanged (version {latest['version']})")
        return 0
    body = {**version_fields, "deploy": bool(deploy)}
    if "commit_message" in data:
        body["commit_message"] = data["commit_message"]
    made = admin_request(args, "POST", f"{path}versions/", body)
    state = "deployed" if made["is_deployed"] else "draft"
    print(f"prompt {prompt_id}: created version {made['version']} ({state})")
    return 0


def add_commands(commands: Any) -> None:
    prompts = commands.add_parser("prompts", help="push prompt templates to a running gateway")
    prompts.add_argument("--url", help=f"the gateway (default: LLMRELAY_URL, else {DEFAULT_URL})")
    prompts.add_argument("--admin-key", help="an admin key (default: LLMRELAY_ADMIN_KEY)")
    actions = prompts.add_subparsers(dest="action", required=True)
    p = actions.add_parser("push", help="create the prompt in FILE, or a new version of it when it changed")
    p.add_argument("file", help="a YAML file: prompt_id, name, messages, model, ... (see the README)")
    p.set_defaults(func=push)

