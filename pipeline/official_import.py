"""Official CoCosNet-v2 / CoCosNet (v1) release files -> this project's model folder (`cocosnet convert-official`).

    convert_official("latest_net_Corr.pth", "latest_net_G.pth", "opt.txt", "models/deepfashionhd")
    convert_official("latest_net_Corr.pth", "latest_net_G.pth", "opt.txt", "models/ade20k-v1", version=1)

The official code saves `torch.save(net.state_dict(), "<epoch>_net_<Corr|G>.pth")` and its options as
`opt.txt` (printed table) and `opt.pkl` (a pickled argparse.Namespace). Nothing is unpickled beyond
plain data: checkpoints load with torch.load(weights_only=True), and opt.pkl through an unpickler that
admits argparse.Namespace and nothing else. The folder written is the one `pipeline.model_files.load_model`
and `cocosnet translate` read: state_dict.pt, model_config.json, run.json (provenance and task).
"""
from __future__ import annotations

import ast
import hashlib
import pickle
import re
from pathlib import Path
from typing import Any, ClassVar, Mapping

import torch

from model import ModelConfig
from model.official import from_official, from_official_v1
from pipeline.data.errors import DataError
from pipeline.model_files import MODEL_CONFIG_FILE, export_model

# dataset_mode of the official options (v2 and v1) -> the task of this project's data stages
OFFICIAL_TASKS = {"deepfashionhd": "pose", "deepfashion": "pose", "ade20k": "mask", "ade20klayout": "mask",
                  "cocofull": "mask", "flickr": "mask", "celebahq": "mask", "celebahqedge": "edge"}
SOURCES = {1: "official CoCosNet (v1)", 2: "official CoCosNet-v2"}


def load_official_state(path: str | Path) -> dict[str, torch.Tensor]:
    """An official `*_net_Corr.pth` / `*_net_G.pth` -> its state dict (tensors only, never arbitrary objects)."""
    path = Path(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except pickle.UnpicklingError as exc:
        found = re.search(r"WeightsUnpickler error: (.*?)(?: Please|\n|$)", str(exc))
        reason = found.group(1).strip() if found else str(exc).splitlines()[0]
        raise DataError(f"{path}: refusing to load: it holds pickled objects that torch.load(weights_only=True) "
                        f"cannot load safely ({reason}); convert only state dicts saved with "
                        "torch.save(net.state_dict(), ...), from a source you trust") from None
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        raise DataError(f"{path}: not a PyTorch checkpoint ({type(exc).__name__}: {exc})") from None
    if isinstance(state, Mapping) and isinstance(state.get("state_dict"), Mapping):
        state = state["state_dict"]
    if not isinstance(state, Mapping) or not state:
        raise DataError(f"{path}: expected a state dict (parameter name -> tensor), got {type(state).__name__}")
    return dict(state)


def _option_value(text: str) -> Any:
    """One value of opt.txt as the official parser produced it: bool, None, int, float, list or str."""
    if text in ("True", "False", "None"):
        return {"True": True, "False": False, "None": None}[text]
    for convert in (int, float):
        try:
            return convert(text)
        except ValueError:
            pass
    if text.startswith(("[", "(", "{")):
        try:
            return ast.literal_eval(text)
        except (ValueError, SyntaxError):
            pass
    return text


def parse_opt_txt(text: str, where: str = "opt.txt") -> dict[str, Any]:
    """The official options table (`{key:>25}: {value:<30}\\t[default: ...]` lines between dashed rules)."""
    opt: dict[str, Any] = {}
    for line in text.splitlines():
        if line.startswith("-") or ":" not in line:
            continue
        key, _, rest = line.partition(":")
        opt[key.strip()] = _option_value(rest.split("\t[default:")[0].strip())
    if not opt:
        raise DataError(f"{where}: no 'key: value' options found (expected the official opt.txt)")
    return opt


class _OptUnpickler(pickle.Unpickler):
    """Admits an argparse.Namespace of plain values (what the official code pickles) and refuses everything else."""

    ALLOWED: ClassVar[frozenset[tuple[str, str]]] = frozenset(
        {("argparse", "Namespace"), ("copyreg", "_reconstructor"), ("builtins", "object")})

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"it references {module}.{name}; only argparse.Namespace with plain values "
                                     "is loaded")


def read_official_opt(path: str | Path) -> dict[str, Any]:
    """opt.txt or opt.pkl of an official run -> the option dict model.official.config_from_official reads."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    if path.suffix.lower() == ".txt":
        try:
            return parse_opt_txt(path.read_text(), str(path))
        except UnicodeDecodeError as exc:
            raise DataError(f"{path}: not a text file ({exc})") from None
    if path.suffix.lower() != ".pkl":
        raise DataError(f"{path}: official options must be opt.txt or opt.pkl")
    try:
        with path.open("rb") as f:
            opt = _OptUnpickler(f).load()
    except pickle.UnpicklingError as exc:
        raise DataError(f"{path}: refusing to unpickle: {exc}") from None
    except (EOFError, ValueError, TypeError, AttributeError, IndexError) as exc:
        raise DataError(f"{path}: not a pickled option namespace ({type(exc).__name__}: {exc})") from None
    opt = vars(opt) if not isinstance(opt, Mapping) and hasattr(opt, "__dict__") else opt
    if not isinstance(opt, Mapping):
        raise DataError(f"{path}: expected a pickled argparse.Namespace or dict, got {type(opt).__name__}")
    return dict(opt)


def official_task(opt: Mapping[str, Any]) -> str | None:
    """The input domain of an official model from its dataset_mode (None when unknown)."""
    return OFFICIAL_TASKS.get(str(opt.get("dataset_mode", "")).lower())


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def convert_official(corr: str | Path, gen: str | Path, opt: str | Path, out: str | Path,
                     image_size: tuple[int, int] | None = None, version: int = 2) -> ModelConfig:
    """Convert official netCorr + netG checkpoints and their options into a model folder at `out`.

    version: 2 (CoCosNet-v2, microsoft/CoCosNet-v2) or 1 (CoCosNet, microsoft/CoCosNet).
    image_size: (H, W), multiples of 32; default: the options' crop size (512x512 for the released v2 models,
    256x256 for v1). `out` is replaced atomically; an existing folder that is not a model folder is refused.
    """
    if version not in SOURCES:
        raise DataError(f"version must be 1 (CoCosNet) or 2 (CoCosNet-v2), got {version!r}")
    out, paths = Path(out), {"corr": Path(corr), "gen": Path(gen), "opt": Path(opt)}
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / MODEL_CONFIG_FILE).exists())):
        raise DataError(f"{out}: exists and is not a model folder; choose a new folder (it would be replaced)")
    options = read_official_opt(paths["opt"])
    corr_state, g_state = load_official_state(paths["corr"]), load_official_state(paths["gen"])
    try:
        net = (from_official_v1 if version == 1 else from_official)(corr_state, g_state, options, image_size)
    except ValueError as exc:
        hint = ""
        if version == 2 and "netCorr" not in options:
            hint = "; these look like CoCosNet v1 options (no netCorr): convert them with --version 1"
        raise DataError(f"{paths['corr']}, {paths['gen']} with {paths['opt']}: {exc}{hint}") from None
    run_info = {"source": SOURCES[version], "task": official_task(options), "name": options.get("name"),
                "which_epoch": options.get("which_epoch"), "dataset_mode": options.get("dataset_mode"),
                "files": {k: str(p.resolve()) for k, p in paths.items()},
                "sha256": {k: _sha256(p) for k, p in paths.items()}}
    export_model(out, net.state_dict(), net.cfg, run_info)
    return net.cfg
