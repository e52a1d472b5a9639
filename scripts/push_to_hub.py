"""Upload a run's FINAL/ (model or LoRA adapter, tokenizer, config and model card) to the Hugging Face Hub.

Usage: python scripts/push_to_hub.py RUN_DIR_OR_FINAL OWNER/NAME [--private] [--base-model HUB_ID] [--dry-run]

--dry-run lists the files and prints the model card that would be uploaded, without touching the network.
--base-model sets the card's `base_model` when the run trained a local folder (the Hub accepts hub ids only); the
card names the hub model by itself when the folder says which it is (the demo model converted by
scripts/prepare_smollm2.py does), and a warning says when it names none.
Log in first with `huggingface-cli login` (or set HF_TOKEN).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from train.loop.card import front_matter  # noqa: E402  (after the path: scripts run from anywhere)

EXIT_USER_ERROR = 2


def final_folder(path: Path) -> Path:
    """The FINAL/ folder named by `path` (a run directory or FINAL/ itself)."""
    folder = path / "FINAL" if (path / "FINAL").is_dir() else path
    if not (folder / "config.json").exists() and not (folder / "adapter_config.json").exists():
        raise SystemExit(
            f"push_to_hub: {path} holds no model (no config.json or adapter_config.json); give a run's FINAL/"
        )
    return folder


def card_with_base_model(card: str, base_model: str) -> str:
    """The card with `base_model` set in its front matter."""
    meta = {"base_model": base_model, **{k: v for k, v in front_matter(card).items() if k != "base_model"}}
    body = card.split("---\n", 2)[2] if front_matter(card) else card
    return f"---\n{yaml.safe_dump(meta, sort_keys=False)}---\n{body}"


def upload_plan(folder: Path, base_model: str | None) -> tuple[list[tuple[str, int]], str]:
    """(relative path, bytes) of every file to upload, and the model card's text."""
    card_path = folder / "README.md"
    card = card_path.read_text() if card_path.exists() else "---\nlibrary_name: transformers\n---\n"
    if base_model:
        card = card_with_base_model(card, base_model)
    files = sorted((str(p.relative_to(folder)), p.stat().st_size) for p in folder.rglob("*") if p.is_file())
    if "README.md" not in {name for name, _ in files}:
        files.append(("README.md", len(card.encode())))
    return files, card


def push(folder: Path, repo_id: str, card: str, private: bool) -> str:
    from huggingface_hub import HfApi

    api = HfApi()
    url = api.create_repo(repo_id, private=private, exist_ok=True)
    api.upload_folder(
        folder_path=str(folder), repo_id=repo_id, ignore_patterns=["README.md"], commit_message="Upload Halyard model"
    )
    api.upload_file(path_or_fileobj=card.encode(), path_in_repo="README.md", repo_id=repo_id)
    return str(url)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("path", type=Path, help="a run directory or its FINAL/ folder")
    parser.add_argument("repo_id", help="the Hub repository, OWNER/NAME (created if missing)")
    parser.add_argument("--private", action="store_true", help="create the repository as private")
    parser.add_argument("--base-model", help="hub id of the base model, for the card's base_model")
    parser.add_argument("--dry-run", action="store_true", help="list what would be uploaded; no network")
    args = parser.parse_args(argv)
    folder = final_folder(args.path)
    files, card = upload_plan(folder, args.base_model)
    total = sum(size for _, size in files)
    print(f"{'would upload' if args.dry_run else 'uploading'} {len(files)} files ({total / 2**20:.1f} MB) "
          f"from {folder} to {args.repo_id}:")  # fmt: skip
    for name, size in files:
        print(f"  {name}  {size / 2**20:.2f} MB")
    if not front_matter(card).get("base_model"):
        print(f"warning: the model card names no base_model on the Hub (the run trained a local folder that does not say "
              f"which hub model it is); add --base-model ORG/NAME so that the Hub links {args.repo_id} to its base "
              f"model", file=sys.stderr)  # fmt: skip
    if args.dry_run:
        print("model card (README.md):\n" + card)
        return 0
    try:
        print(f"uploaded: {push(folder, args.repo_id, card, args.private)}")
    except Exception as error:  # the hub client raises many types (offline mode, HTTP, connection, auth)
        reason = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
        print(
            f"push_to_hub: could not upload to {args.repo_id} ({reason}). Check the network (HF_HUB_OFFLINE must be "
            f"unset), and log in with `huggingface-cli login` or set HF_TOKEN. Use --dry-run to see what would go.",
            file=sys.stderr,
        )
        return EXIT_USER_ERROR
    return 0


if __name__ == "__main__":
    sys.exit(main())
