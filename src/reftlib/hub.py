"""The Hugging Face Hub: finding a saved folder by repo id, and uploading one with a model card.

``huggingface_hub`` is imported only when a repo is actually fetched or uploaded. Re-exported by
:mod:`reftlib.io`.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .atomic import atomic_write_bytes
from .errors import CheckpointError, ReftConfigError
from .folders import WEIGHTS_NAME

if TYPE_CHECKING:
    from .model import ReftModel

__all__ = ["model_card", "push_to_hub", "resolve_folder"]


def resolve_folder(path_or_repo_id: str | os.PathLike, **hub_kwargs: Any) -> Path:
    """A local folder as is, otherwise a Hub snapshot (from the local cache when offline)."""
    path = Path(path_or_repo_id)
    if path.is_dir():
        subfolder = hub_kwargs.get("subfolder")
        if subfolder:
            if not (path / subfolder).is_dir():
                raise CheckpointError(f"{path} has no subfolder {subfolder!r}")
            return path / subfolder
        return path
    if path.exists():
        raise CheckpointError(f"{path} is a file; pass the folder that contains {WEIGHTS_NAME}")
    repo_id = str(path_or_repo_id)
    if repo_id.count("/") != 1 or repo_id.startswith(("/", ".")):
        raise CheckpointError(f"{repo_id!r} is neither an existing folder nor a Hub repo id ('user/name')")
    from huggingface_hub import snapshot_download

    allowed = {"revision", "cache_dir", "token", "local_files_only", "subfolder"}
    unknown = set(hub_kwargs) - allowed
    if unknown:
        raise ReftConfigError(f"unknown argument(s) {sorted(unknown)}; allowed: {sorted(allowed)}")
    subfolder = hub_kwargs.pop("subfolder", None)
    try:
        folder = Path(snapshot_download(repo_id, **hub_kwargs))
    except Exception as exc:
        raise CheckpointError(
            f"{repo_id!r} is not a local folder and could not be fetched from the Hugging Face Hub "
            f"({type(exc).__name__}: {exc}). Check the name, your network, or set HF_HUB_OFFLINE=1 to use the cache"
        ) from exc
    return folder / subfolder if subfolder else folder


def model_card(reft_model: ReftModel) -> str:
    """The ``README.md`` uploaded with the interventions: base model, a table of the interventions, usage."""
    base = reft_model.reft_config.base_model_name_or_path or "unknown"
    rows = []
    for name in reft_model.adapter_names:
        for rep in reft_model.reft_configs[name].representations:
            iv = rep.intervention.get_config()
            rows.append(
                f"| {name} | {rep.name} | {rep.layer} | {rep.component} | {iv['type']} | "
                f"{iv.get('low_rank_dimension', '')} | {rep.positions or 'all / per call'} |"
            )
    params = reft_model.count_parameters(trainable_only=False)
    return (
        "---\nlibrary_name: reftlib\n"
        + (f"base_model: {base}\n" if base != "unknown" else "")
        + "tags:\n- reftlib\n- reft\n- representation-fine-tuning\n---\n\n"
        + f"# Interventions for {base}\n\n"
        + f"Representation interventions trained with reftlib ({params:,d} parameters).\n\n"
        + "| adapter | key | layer | component | type | rank | positions |\n|---|---|---|---|---|---|---|\n"
        + "\n".join(rows)
        + "\n\n## Usage\n\n```python\nfrom transformers import AutoModelForCausalLM\nfrom reftlib import ReftModel\n\n"
        + f'model = AutoModelForCausalLM.from_pretrained("{base}")\n'
        + 'reft_model = ReftModel.from_pretrained("<this repo>", model)\n```\n'
    )


def push_to_hub(reft_model: ReftModel, repo_id: str, *, private: bool | None = None, token: str | None = None,
                commit_message: str = "Upload reftlib interventions", api=None, **kwargs: Any):
    """Save to a temporary folder with a model card and upload it with ``huggingface_hub``."""
    from huggingface_hub import HfApi

    api = api or HfApi(token=token)
    with tempfile.TemporaryDirectory() as tmp:
        reft_model.save_pretrained(tmp)
        atomic_write_bytes(Path(tmp) / "README.md", model_card(reft_model).encode())
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        return api.upload_folder(folder_path=tmp, repo_id=repo_id, commit_message=commit_message, **kwargs)
