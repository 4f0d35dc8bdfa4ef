"""Which file holds which checkpoint: official names, Hugging Face folder names, URLs, sizes,
hashes and licences, and finding a checkpoint on disk.

Torch-free: `zdepth weights`, `zdepth serve --fetch-weights` and the broker side use it without
the model. Loading the files is `zdepth.model.checkpoints`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from . import protocol as P
from .errors import CheckpointNotFound

_SIZE_NAMES = {"vits": "Small", "vitb": "Base", "vitl": "Large", "vitg": "Giant"}
_HF_METRIC_NAMES = {"hypersim": "Indoor", "vkitti": "Outdoor"}
_OFFICIAL_METRIC_NAMES = {"hypersim": "Hypersim", "vkitti": "VKITTI"}
_URL = "https://huggingface.co/depth-anything/{repo}/resolve/main/{file}?download=true"


# --------------------------------------------------------------------------------------------
# Names, URLs and the known-files table
# --------------------------------------------------------------------------------------------


def check_names(encoder: str, dataset: str) -> None:
    """Raise ValueError unless `encoder` and `dataset` are names from `protocol.ENCODERS` / `DATASETS`."""
    if encoder not in P.ENCODERS:
        raise ValueError(f"unknown encoder {encoder!r}; expected one of {sorted(P.ENCODERS)}")
    if dataset not in P.DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; expected one of {list(P.DATASETS)}")


def official_filename(encoder: str, dataset: str) -> str:
    """File name of the official release (also for vitg, whose weights were never released)."""
    check_names(encoder, dataset)
    if dataset == "relative":
        return f"depth_anything_v2_{encoder}.pth"
    return f"depth_anything_v2_metric_{dataset}_{encoder}.pth"


def hf_dirname(encoder: str, dataset: str) -> str:
    """Folder name of the transformers conversion (the hub repo name: Indoor = hypersim, Outdoor = vkitti)."""
    check_names(encoder, dataset)
    size = _SIZE_NAMES[encoder]
    if dataset == "relative":
        return f"Depth-Anything-V2-{size}-hf"
    return f"Depth-Anything-V2-Metric-{_HF_METRIC_NAMES[dataset]}-{size}-hf"


def _official_repo(encoder: str, dataset: str) -> str:
    size = _SIZE_NAMES[encoder]
    if dataset == "relative":
        return f"Depth-Anything-V2-{size}"
    return f"Depth-Anything-V2-Metric-{_OFFICIAL_METRIC_NAMES[dataset]}-{size}"


def _released(encoder: str, dataset: str) -> bool:
    # Giant was announced ("coming soon") but never published, relative or metric.
    return encoder != "vitg"


def download_url(encoder: str, dataset: str) -> str | None:
    """Direct download URL of the official file, or None where no official file was released (vitg)."""
    check_names(encoder, dataset)
    if not _released(encoder, dataset):
        return None
    return _URL.format(repo=_official_repo(encoder, dataset), file=official_filename(encoder, dataset))


_NC_NOTE = (
    "the main README puts Base/Large weights under CC-BY-NC-4.0 while the HF metric pages are tagged "
    "apache-2.0; treat as non-commercial unless confirmed"
)


# About how large each encoder's file is (relative and metric alike: the same network), as the
# README's table says; shown with a "~" where the exact size above is not documented.
APPROX_SIZE_BYTES = {"vits": 99_200_000, "vitb": 390_000_000, "vitl": 1_340_000_000, "vitg": 5_000_000_000}


def _build_table() -> dict[tuple[str, str], dict[str, Any]]:
    # Only values the fact sheet states as documented; anything approximate or unverified is None.
    known: dict[tuple[str, str], tuple[int | None, str | None, str]] = {
        ("vits", "relative"): (
            99_218_434,
            "715fade13be8f229f8a70cc02066f656f2423a59effd0579197bbf57860e1378",
            "Apache-2.0",
        ),
        ("vitb", "relative"): (
            389_961_218,
            "0d2b7002e62d39d655571c371333340bd88f67ab95050c03591555aa05645328",
            "CC-BY-NC-4.0",
        ),
        ("vitl", "relative"): (None, None, "CC-BY-NC-4.0"),
        ("vitg", "relative"): (None, None, "CC-BY-NC-4.0"),
        ("vits", "hypersim"): (None, None, "Apache-2.0"),
        ("vitb", "hypersim"): (None, None, "CC-BY-NC-4.0"),
        ("vitl", "hypersim"): (None, None, "CC-BY-NC-4.0"),
        ("vits", "vkitti"): (None, "9203e538d35255c90dda4b7fedb47ff33fe725497bcca3b1e53b3a65ee63f0cb", "Apache-2.0"),
        ("vitb", "vkitti"): (
            389_964_656,
            "4dad67a7cc10b462bca48e6b8569c762b8eb3c1adada170a3851a6d3ba37bb3e",
            "CC-BY-NC-4.0",
        ),
        ("vitl", "vkitti"): (
            1_341_401_064,
            "239b1054a369e66da2576e9a118d6d7c12d90dc8ebe609579a9a09cd8e05fe38",
            "CC-BY-NC-4.0",
        ),
    }
    table: dict[tuple[str, str], dict[str, Any]] = {}
    for (encoder, dataset), (size, sha, licence) in known.items():
        entry: dict[str, Any] = {
            "filename": official_filename(encoder, dataset),
            "url": download_url(encoder, dataset),
            "size_bytes": size,
            "sha256": sha,
            "licence": licence,
            "hf_dirname": hf_dirname(encoder, dataset),
        }
        if encoder == "vitg":
            entry["note"] = "not released: the authors list Giant as 'coming soon'; no official download"
        elif licence == "CC-BY-NC-4.0" and dataset != "relative":
            entry["note"] = _NC_NOTE
        table[(encoder, dataset)] = entry
    return table


CHECKPOINTS: dict[tuple[str, str], dict[str, Any]] = _build_table()


# --------------------------------------------------------------------------------------------
# Locating files
# --------------------------------------------------------------------------------------------


def get_command(encoder: str, dataset: str) -> str:
    return f"zdepth weights get {encoder} --dataset {dataset}"


def find_checkpoint(checkpoint_dir: str | Path, encoder: str, dataset: str) -> Path:
    """The official ``.pth`` if present, else the HF folder; the official file wins when both exist."""
    check_names(encoder, dataset)
    root = Path(checkpoint_dir)
    official = root / official_filename(encoder, dataset)
    if official.is_file():
        return official
    hf = root / hf_dirname(encoder, dataset)
    if (hf / "config.json").is_file() and (hf / "model.safetensors").is_file():
        return hf

    url = download_url(encoder, dataset)
    lines = [f"no {encoder}/{dataset} checkpoint in {root}: expected the official file {official}"]
    if hf.is_dir():
        missing = [n for n in ("config.json", "model.safetensors") if not (hf / n).is_file()]
        lines.append(f"(the folder {hf} exists but lacks {', '.join(missing)})")
    else:
        lines.append(f"or a Hugging Face folder {hf}/ with config.json and model.safetensors")
    if url:
        lines.append(f"download {official_filename(encoder, dataset)} from {url}")
        lines.append(f"or run: {get_command(encoder, dataset)}")
    else:
        lines.append(
            f"{official_filename(encoder, dataset)} was not released officially (no download URL); "
            f"`{get_command(encoder, dataset)}` cannot fetch it either"
        )
    raise CheckpointNotFound("\n".join(lines))
