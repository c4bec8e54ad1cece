"""Evaluate a trained model on the validation shards: correspondence, reconstruction, style, distributions.

    evaluation = evaluate_model(net, "data/shards", EvalConfig())      # compute: an Evaluation
    run_evaluation(load_params("params.yaml"))                         # the stage: its files and the model's run

Every validation sample is run twice per model: with its pseudo exemplar (a distorted copy of x_B with the
exact ground-truth flow) and with its real exemplar (another image, the task the model is for).

    corr/...    pseudo pairs: end-point error (px) and PCK at 1, 3, 5 px of the matched exemplar position,
                at full resolution (the finest level) and per level ("levels/l<i>/...": each level's matches
                upsampled to full resolution, so errors are in full-resolution pixels at every level)
    corr_identifiable/...  the same at the finest level over the pixels whose match is identifiable (the
                exemplar varies in every direction there: metrics.identifiable), and their share "fraction".
                In flat regions or along straight edges any position along the region or edge looks the same
    recon/...   pseudo pairs: PSNR (dB), SSIM and L1 of the output against x_B (on the [0, 1] scale), and sharpness
                (the output's mean |Laplacian| over x_B's: 1 as detailed, below 1 blurred)
    style/...   real exemplars. Synthetic source: colour_error = distance (0-255 RGB) between the mean colours
                of the output and of the ideal render(label_A, palette_B), per class present in both input and
                exemplar, averaged over (image, class); colour_error_warped = the same for the finest warped
                exemplar (the correspondence's share of the error); class_match = the share of a class's pixels
                whose finest match lands on the same class in the exemplar, averaged likewise; psnr_ideal = PSNR
                against that ideal; sharpness = recon's sharpness against that ideal. With VGG weights
                (evaluate.vgg_weights): vgg_colour, vgg_texture (style relevance) and semantic (consistency)
    dist/...    real exemplars vs the validation photos: swd (sliced Wasserstein of Laplacian-pyramid patches,
                x1e3, no weights needed) and fid (Fréchet distance of evaluate.fid_features: "vgg19" with VGG
                weights, or an Inception TorchScript file)
    collapse/   pseudo pairs: L1 of the output to its exemplar as given (not warped) and to the target x_B. A
                model that copies its exemplar instead of warping it is nearer the exemplar than the target:
                collapse/suspected is 1 then (the model's run gets the tag collapse=suspected, the stage says so)
    untrained/  the same metrics for the same architecture with fresh (seeded) weights: training must beat it
    identity/   corr metrics of matching every pixel to itself (the no-motion baseline)

Metrics that need weights which were not given are left out, and the reason is reported ("skipped").
"""
from __future__ import annotations

import inspect
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Literal, Mapping

import numpy as np
import torch
from tqdm import tqdm

from model import CoCosNet
from model.vgg import VGG19, load_vgg19
from pipeline import metrics as M
from pipeline import tracking, viz
from pipeline.data.imageio import atomic_write_bytes, atomic_write_json
from pipeline.data.loader import make_loader, to_model
from pipeline.data.sources.synthetic import SyntheticSource, render
from pipeline.mkl_vml import settle_vml_dispatch
from pipeline.model_files import load_model
from pipeline.params import from_mapping, section

CURVE_THRESHOLDS = tuple(float(t) for t in np.arange(0.0, 10.01, 0.5))  # PCK curve (px)


@dataclass(frozen=True)
class EvalConfig:
    """The `evaluate:` section of params.yaml."""

    split: str = "val"
    batch_size: int = 8
    max_samples: int | None = None  # evaluate the first N samples of the split (None: all)
    pck_thresholds: tuple[float, ...] = (1.0, 3.0, 5.0)
    vgg_weights: str | None = None  # vgg19_conv.pth / torchvision file, "imagenet", "random"; None: no VGG metrics
    fid_features: str | None = None  # "vgg19" (needs vgg_weights) or an Inception TorchScript file; None: no FID
    swd: bool = True
    compare_untrained: bool = True
    grid_rows: int = 6
    identifiable_gradient: float = 0.02  # corr_identifiable: grey-level change per pixel in every direction (0-1)
    seed: int = 0  # initialisation of the untrained model, SWD projections
    device: str = "cpu"
    loader_workers: int = 0
    verify_shards: Literal["full", "size", "none"] = "full"  # each shard against the manifest (pipeline/data/loader.py)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "EvalConfig":
        return from_mapping(cls, dict(values), "evaluate")


# ---------------------------------------------------------------- ground truth of the synthetic source


class SyntheticTruth:
    """Label maps and palettes of the synthetic scenes, rebuilt from the source settings the manifest records:
    the ideal translation of input A with exemplar B is render(label_A, palette_B)."""

    def __init__(self, manifest: Mapping[str, Any]):
        recorded = manifest["prepared"]["source"]
        settings = inspect.signature(SyntheticSource).parameters
        self.source = SyntheticSource(**{k: v for k, v in recorded.items() if k in settings})

    def labels(self, name: str) -> np.ndarray:
        return self.source.scene(int(name))[0]

    def ideal(self, metas: list[dict]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[list[int]]]:
        """-> ideal images (B, 3, H, W) in [-1, 1], input and exemplar labels (B, H, W) each, classes in both."""
        images, labels, exemplar_labels, shared = [], [], [], []
        for meta in metas:
            a, b = self.labels(meta["name"]), self.labels(meta["exemplar"])
            images.append(render(a, meta["exemplar_palette"]))
            labels.append(a)
            exemplar_labels.append(b)
            shared.append(sorted(set(np.unique(a).tolist()) & set(np.unique(b).tolist())))
        ideal = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 127.5 - 1
        as_tensor = lambda maps: torch.from_numpy(np.stack(maps).astype(np.int64))  # noqa: E731
        return ideal, as_tensor(labels), as_tensor(exemplar_labels), shared


# ---------------------------------------------------------------- feature extractors for FID


def fid_extractor(spec: str, vgg: VGG19 | None, device: torch.device) -> Callable[[torch.Tensor], torch.Tensor]:
    """(B, 3, H, W) in [-1, 1] -> (B, D) features.

    "vgg19": global average of VGG19's relu5_4 (needs evaluate.vgg_weights). A path: an Inception TorchScript
    file with the convention of the FID reference port (`module(x, return_features=True)`, x in [0, 255] at
    299x299 -> (B, 2048)). TorchScript archives load code and tensors, never pickled Python objects.
    """
    if spec == "vgg19":
        if vgg is None:
            raise ValueError("evaluate.fid_features=vgg19 needs evaluate.vgg_weights")
        return lambda x: vgg(x, ("r54",))[0].mean(dim=(2, 3))
    try:
        with warnings.catch_warnings():  # TorchScript is deprecated in torch 2.13, and the format FID files use
            warnings.simplefilter("ignore", DeprecationWarning)
            module = torch.jit.load(spec, map_location=device).eval()
    except (RuntimeError, ValueError, FileNotFoundError) as exc:
        raise ValueError(f"{spec}: not a TorchScript Inception file ({exc})") from None

    def inception(x: torch.Tensor) -> torch.Tensor:
        x = torch.nn.functional.interpolate((x.float() + 1) * 127.5, size=(299, 299), mode="bilinear",
                                            align_corners=False)
        return module(x, return_features=True).flatten(1)

    return inception


# ---------------------------------------------------------------- accumulating scores over batches


@dataclass
class Scores:
    """Running sums of one model's metrics over the validation batches."""

    thresholds: tuple[float, ...]
    flow: dict[str, dict[str, float]] = field(default_factory=dict)  # level name -> sums
    curve: np.ndarray = field(default_factory=lambda: np.zeros(len(CURVE_THRESHOLDS)))
    values: dict[str, list[float]] = field(default_factory=dict)
    outputs: list[torch.Tensor] = field(default_factory=list)  # real-exemplar outputs, for SWD/FID

    def add_flow(self, level: str, errors: torch.Tensor) -> None:
        """End-point errors (valid pixels) of one level; "full" (the finest level) also feeds the PCK curve."""
        sums = M.error_sums(errors, self.thresholds)
        into = self.flow.setdefault(level, dict.fromkeys(sums, 0.0))
        for key, value in sums.items():
            into[key] += value
        if level == "full":
            self.curve += np.array([float((errors <= t).sum()) for t in CURVE_THRESHOLDS])

    def add_identifiable(self, errors: torch.Tensor, batch: Mapping[str, Any]) -> None:
        """(B, 1, H, W) finest-level errors: those of the identifiable pixels."""
        self.add_flow("identifiable", errors[batch["flow_identifiable"]])

    def add(self, name: str, values: torch.Tensor | Iterable[float]) -> None:
        values = values.tolist() if isinstance(values, torch.Tensor) else list(values)
        self.values.setdefault(name, []).extend(float(v) for v in values)

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for level, sums in self.flow.items():
            n = max(sums["count"], 1.0)
            scores = {key: value / n for key, value in sums.items() if key != "count"}
            if level == "full":
                out["corr"] = {**scores, **out.get("corr", {})}
            elif level == "identifiable":
                out["corr_identifiable"] = {**scores, "fraction": sums["count"] / max(self.flow["full"]["count"], 1.0)}
            else:
                out.setdefault("corr", {}).setdefault("levels", {})[level] = scores
        for name, values in self.values.items():
            group, key = name.split("/", 1)
            out.setdefault(group, {})[key] = M.mean_or_nan(values)
        return out


def flow_errors(positions: torch.Tensor, batch: Mapping[str, Any]) -> torch.Tensor:
    """(B, 2, H, W) matched positions -> end-point errors (px) of the pixels with a valid ground truth."""
    return M.endpoint_errors(positions, batch["flow"])[batch["flow_valid"]]


def run_model(net: CoCosNet, batch: Mapping[str, Any], scores: Scores,
              ideal: tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[list[int]]] | None,
              vgg: VGG19 | None) -> Any:
    """Both passes of one batch through `net`, adding to `scores`; ideal: SyntheticTruth.ideal of the batch.
    -> the real-exemplar output."""
    size = tuple(batch["image"].shape[-2:])
    pseudo = net(batch["input_map"], batch["pseudo"], batch["pseudo_map"])
    for i, matches in enumerate(pseudo.matches):
        errors = flow_errors(M.upsample_matches(matches, size), batch)
        scores.add_flow(f"l{i}", errors)
    scores.add_flow("full", errors)  # the finest level
    scores.add_identifiable(M.endpoint_errors(M.upsample_matches(pseudo.matches[-1], size), batch["flow"]), batch)
    scores.add("recon/psnr", M.psnr(pseudo.image, batch["image"]))
    scores.add("recon/ssim", M.ssim(pseudo.image, batch["image"]))
    scores.add("recon/l1", M.l1(pseudo.image, batch["image"]))
    scores.add("recon/sharpness", M.sharpness(pseudo.image, batch["image"]))
    scores.add("collapse/to_exemplar", M.l1(pseudo.image, batch["pseudo"]))
    scores.add("collapse/to_target", M.l1(pseudo.image, batch["image"]))

    real = net(batch["input_map"], batch["exemplar"], batch["exemplar_map"])
    if ideal is not None:
        images, labels, exemplar_labels, shared = ideal
        scores.add("style/colour_error", M.class_colour_errors(real.image, images, labels, shared))
        scores.add("style/class_match", M.class_match_rates(M.upsample_matches(real.matches[-1], size), labels,
                                                            exemplar_labels, shared))
        warped = torch.nn.functional.interpolate(real.warped[-1], size=size, mode="bilinear", align_corners=False)
        scores.add("style/colour_error_warped", M.class_colour_errors(warped, images, labels, shared))
        scores.add("style/psnr_ideal", M.psnr(real.image, images))
        scores.add("style/sharpness", M.sharpness(real.image, images))
    if vgg is not None:
        for key, values in M.style_scores(vgg, real.image, batch["exemplar"], batch["image"]).items():
            scores.add(f"style/{key}", values)
    scores.outputs.append(real.image.cpu())
    return real


def untrained_copy(net: CoCosNet, seed: int) -> CoCosNet:
    """The same architecture with the weights a training run would start from (seeded)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        fresh = CoCosNet(net.cfg)
    return fresh.to(next(net.parameters()).device).eval()


@dataclass
class Evaluation:
    metrics: dict[str, Any]  # nested, numbers only: metrics/eval.json
    skipped: dict[str, str]  # metric -> why it was not computed
    curves: dict[str, list[float]]  # PCK over CURVE_THRESHOLDS: trained, untrained, identity
    grid: np.ndarray | None  # (H', W', 3) uint8: input | exemplar | warped per level | output | ideal or target
    samples: int


def evaluate_model(net: CoCosNet, shards: str, cfg: EvalConfig, progress: bool = True) -> Evaluation:
    """Run `net` (and its untrained twin) over the split; see the module docstring for the metrics."""
    device = torch.device(cfg.device)
    net = net.to(device).eval()
    settle_vml_dispatch()  # before the first forward pass of this process
    size, label_nc = net.cfg.image_size, net.cfg.label_nc
    loader = make_loader(shards, batch_size=cfg.batch_size, split=cfg.split, real_exemplar_prob=1.0, with_flow=True,
                         num_workers=cfg.loader_workers, seed=cfg.seed, shuffle=False, pin_memory=device.type == "cuda",
                         verify=cfg.verify_shards)
    loader.check_fits(net.cfg, "the model")
    manifest = loader.manifest
    skipped: dict[str, str] = {}
    truth = SyntheticTruth(manifest) if manifest["source"] == "synthetic" else None
    if truth is None:
        skipped["style/colour_error"] = f"needs the synthetic source's palettes (shards are {manifest['source']})"
    vgg = load_vgg19(cfg.vgg_weights).to(device) if cfg.vgg_weights else None
    if vgg is None:
        skipped["style/vgg_scores"] = "no VGG19 weights (evaluate.vgg_weights)"
    features = None
    if cfg.fid_features:
        features = fid_extractor(cfg.fid_features, vgg, device)
    else:
        skipped["dist/fid"] = "no feature extractor (evaluate.fid_features: vgg19 or an Inception TorchScript file)"

    models = {"trained": net}
    if cfg.compare_untrained:
        models["untrained"] = untrained_copy(net, cfg.seed)
    scores = {name: Scores(cfg.pck_thresholds) for name in models}
    identity = Scores(cfg.pck_thresholds)
    photos: list[torch.Tensor] = []
    grid, seen = None, 0
    total = min(loader.samples, cfg.max_samples or loader.samples)
    with torch.no_grad(), tqdm(total=total, desc="evaluate", unit="sample", disable=not progress) as bar:
        for batch in loader:
            if seen >= total:
                break
            batch = to_model(trim(batch, total - seen), label_nc, device)
            batch["flow_identifiable"] = M.identifiable(batch["pseudo"], batch["flow"], batch["flow_valid"],
                                                        cfg.identifiable_gradient)
            ideal = None
            if truth is not None:
                ideal = tuple(t.to(device) if isinstance(t, torch.Tensor) else t for t in truth.ideal(batch["meta"]))
            for name, model in models.items():
                real = run_model(model, batch, scores[name], ideal, vgg)
                if name == "trained" and grid is None:
                    target = ideal[0] if ideal is not None else batch["image"]
                    shown = {"input_map": batch["input_map"], "exemplar": batch["exemplar"], "image": target}
                    grid = viz.sample_grid(shown, real.image, real.warped, rows=cfg.grid_rows)
            no_motion = M.identity_positions(size, len(batch["key"])).to(device)
            identity.add_flow("full", flow_errors(no_motion, batch))
            identity.add_identifiable(M.endpoint_errors(no_motion, batch["flow"]), batch)
            photos.append(batch["image"].cpu())
            seen += len(batch["key"])
            bar.update(len(batch["key"]))
    if seen == 0:
        raise ValueError(f"{shards}: no {cfg.split!r} samples to evaluate")

    results: dict[str, Any] = {}
    real_photos = torch.cat(photos)
    for name, s in scores.items():
        summary = s.summary()
        outputs = torch.cat(s.outputs)
        dist = {}
        if cfg.swd:
            levels = M.swd(outputs, real_photos, seed=cfg.seed)
            dist["swd"] = float(np.mean(levels))
            dist.update({f"swd_{i}": v for i, v in enumerate(levels)})
        if features is not None and seen >= 2:
            feats = [torch.cat([features(x[i:i + cfg.batch_size].to(device)).cpu()
                                for i in range(0, len(x), cfg.batch_size)]).numpy() for x in (outputs, real_photos)]
            dist["fid"] = M.frechet_distance(*feats)
        if dist:
            summary["dist"] = dist
        results[name] = summary
    for summary in results.values():
        collapse = summary["collapse"]
        collapse["suspected"] = float(collapse["to_exemplar"] < collapse["to_target"])
    baseline = identity.summary()
    metrics = {**results.pop("trained"), **results, "identity": baseline["corr"],
               "identity_identifiable": baseline["corr_identifiable"], "samples": seen}
    curves = {name: (s.curve / max(s.flow["full"]["count"], 1.0)).tolist()
              for name, s in {**scores, "identity": identity}.items()}
    return Evaluation(metrics=drop_nan(metrics), skipped=skipped, curves=curves, grid=grid, samples=seen)


def trim(batch: dict[str, Any], n: int) -> dict[str, Any]:
    """The first n samples of a batch (max_samples may end inside one)."""
    if len(batch["key"]) <= n:
        return batch
    return {k: v[:n] for k, v in batch.items()}


def drop_nan(tree: Any) -> Any:
    """NaN means "no data" (e.g. no class shared with the exemplar); JSON and DVC want it absent."""
    if isinstance(tree, dict):
        return {k: drop_nan(v) for k, v in tree.items() if not (isinstance(v, float) and math.isnan(v))}
    return tree


def write_pck_csv(curves: Mapping[str, list[float]], path: Path) -> None:
    """PCK against the threshold (px), one column per model, for `dvc plots`."""
    lines = ["threshold_px," + ",".join(curves)]
    for i, t in enumerate(CURVE_THRESHOLDS):
        lines.append(f"{t:g}," + ",".join(f"{values[i]:.5f}" for values in curves.values()))
    atomic_write_bytes(path, ("\n".join(lines) + "\n").encode())


def run_evaluation(params: Mapping[str, Any], *, model_ref: str = "models", shards: str = "data/shards",
                   metrics_path: str | Path = "metrics/eval.json", reports_dir: str | Path = "reports",
                   progress: bool = True) -> Evaluation:
    """The evaluate stage: the Evaluation of the model on the validation shards -> metrics_path and
    reports_dir/eval_pck.csv, eval_pck.png, eval_samples.png, all also published to the model's MLflow run."""
    cfg = EvalConfig.from_dict(section(params, "evaluate"))
    uri = tracking.tracking_uri(tracking.MlflowConfig.from_params(params))
    result = evaluate_model(load_model(model_ref, cfg.device, tracking_uri=uri), shards, cfg, progress=progress)

    reports, figure = Path(reports_dir), viz.pck_figure(CURVE_THRESHOLDS, result.curves)
    atomic_write_json(metrics_path, result.metrics)
    write_pck_csv(result.curves, reports / "eval_pck.csv")
    if result.grid is not None:
        atomic_write_bytes(reports / "eval_samples.png", viz.png_bytes(result.grid))
    run_id = tracking.model_run_id(model_ref, uri)
    if run_id:
        tracking.publish_evaluation(uri, run_id, result.metrics, skipped=result.skipped, grid=result.grid,
                                    curves={"threshold_px": list(CURVE_THRESHOLDS), **result.curves},
                                    pck_figure=figure, tags={"eval.model_ref": str(model_ref),
                                                             "collapse": collapse_state(result.metrics)})
    atomic_write_bytes(reports / "eval_pck.png", viz.figure_png(figure))
    say_summary(result, run_id)
    return result


def collapse_state(metrics: Mapping[str, Any]) -> str:
    return "suspected" if metrics["collapse"]["suspected"] else "no"


def say_summary(result: Evaluation, run_id: str | None) -> None:
    flat = tracking.flatten(result.metrics, "/")

    def line(name: str, key: str, fmt: str) -> str:
        trained, untrained = flat.get(key), flat.get(f"untrained/{key}")
        parts = [f"trained {trained:{fmt}}" if trained is not None else "trained -"]
        if untrained is not None:
            parts.append(f"untrained {untrained:{fmt}}")
        return f"  {name:28s} " + "   ".join(parts)
    print(f"evaluate: {result.samples} validation samples" + (f" (MLflow run {run_id})" if run_id else ""))
    print(line("PCK@3px (higher is better)", "corr/pck_3", ".4f"))
    print(line("EPE px (lower is better)", "corr/epe", ".2f"))
    print(line("PCK@3px, identifiable pixels", "corr_identifiable/pck_3", ".4f")
          + f"   identity {flat.get('identity_identifiable/pck_3', float('nan')):.4f}"
          + f"   ({flat.get('corr_identifiable/fraction', 0):.0%} of the pixels)")
    print(line("colour error (lower better)", "style/colour_error", ".1f"))
    print(line("colour error of the warp", "style/colour_error_warped", ".1f"))
    print(line("class match of the warp", "style/class_match", ".3f"))
    print(line("PSNR pseudo pairs dB", "recon/psnr", ".2f"))
    print(line("sharpness (1: as the target)", "recon/sharpness", ".2f"))
    print(f"  collapse watch: L1 to the exemplar {flat['collapse/to_exemplar']:.3f}, to the target "
          f"{flat['collapse/to_target']:.3f}" + ("  COLLAPSE SUSPECTED: the outputs copy their exemplars"
                                                 if collapse_state(result.metrics) == "suspected" else ""))
    for name, reason in result.skipped.items():
        print(f"  skipped {name}: {reason}")
