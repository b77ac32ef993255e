"""``uniformerv2-eval``: multi-view testing of a trained model (top-1/top-5, per-class accuracy,
confusion matrix plot).

Every video is tested with ``num_clips`` temporal clips (fixed offsets inside the TSN segments) times
``num_crops`` spatial crops (1 = centre, 3 = left/centre/right after a short-side resize); the softmax
probabilities of all views are averaged, as in the official test (``TEST.ADD_SOFTMAX``).

Examples::

    uniformerv2-eval --checkpoint runs/synthetic/best.pt                  # the run's own validation data
    uniformerv2-eval --checkpoint runs/k400/best.pt --list k400/val.txt --clips 4 --crops 3 \\
        --labels k400/labels.txt --output-dir runs/k400/test
    torchrun --nproc_per_node 8 -m uniformerv2.evaluate --checkpoint ... --list ...

Writes ``results.json`` (accuracies, per-class accuracy, confusion matrix, skipped videos),
``per_class.csv`` and ``confusion.png`` to ``--output-dir`` (default: next to the checkpoint).
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import sys
import time

import torch
import torch.nn as nn

from . import distributed as du
from .augment import to_device
from .data import FailureReporter, read_labels
from .loading import read_checkpoint_file
from .runtime import (INPUT_ERRORS, ShardSampler, at_least_one, autocast_context, build_dataset, check_data_files,
                      input_error_message, make_loader, progress_bar, resolve_fused)

logger = logging.getLogger("uniformerv2")


@torch.no_grad()
def evaluate_model(model: nn.Module, dataset, cfg: dict, info: du.DistInfo, num_classes: int,
                   progress: bool = True, reporter: FailureReporter | None = None, desc: str = "eval") -> dict:
    """Multi-view evaluation, sharded over ranks; every rank returns the same metrics dict."""
    reporter = reporter or FailureReporter()
    device = info.device
    sampler = ShardSampler(len(dataset), info.rank, info.world_size, shuffle=False, drop_last=False)
    loader = make_loader(dataset, int(cfg["eval"]["batch_size"]), sampler, cfg["data"]["num_workers"], 0,
                         device.type == "cuda")
    was_training = model.training
    model.eval()
    amp = cfg["train"]["amp"]

    def forward(video):
        with autocast_context(device, amp):
            return model(video)

    if cfg["eval"].get("cuda_graph") and device.type == "cuda":
        from .cuda_graph import GraphedInference

        # the bare module: a DDP wrapper's forward would broadcast buffers inside the capture
        forward = GraphedInference(getattr(model, "module", model),
                                   context=lambda: autocast_context(device, amp, cache_enabled=False))
    probs, labels, indices, failed = [], [], [], []
    t0 = time.time()
    bar = progress_bar(total=len(loader), desc=desc, disable=not (info.is_main and progress), leave=False)
    for batch in loader:
        reporter(batch["failed"])
        failed += batch["failed"]
        bar.update(1)
        if batch["video"] is None:
            continue
        video = to_device(batch["video"], device, cfg, train=False)  # augment_on=gpu: views made there
        if video.dim() == 5:  # one view per video
            video = video.unsqueeze(1)
        b, v = video.shape[:2]
        logits = forward(video.flatten(0, 1))
        # kept on the device until the end: a copy to the host per batch would wait for the GPU and keep the
        # host from queueing the next batch meanwhile
        probs.append(logits.float().softmax(-1).view(b, v, -1).mean(1))
        labels.append(batch["label"])
        indices.append(batch["index"])
    bar.close()
    if was_training:
        model.train()
    elapsed = time.time() - t0
    local = (torch.cat(probs).cpu() if probs else torch.zeros(0, num_classes),
             torch.cat(labels) if labels else torch.zeros(0, dtype=torch.long),
             torch.cat(indices) if indices else torch.zeros(0, dtype=torch.long), failed)
    gathered = du.all_gather_objects(local, info)
    all_probs = torch.cat([g[0] for g in gathered])
    all_labels = torch.cat([g[1] for g in gathered])
    all_index = torch.cat([g[2] for g in gathered])
    skipped = sorted({path for g in gathered for path, _ in g[3]})
    order = torch.argsort(all_index)
    result = metrics_from_probs(all_probs[order], all_labels[order], num_classes)
    result["indices"] = all_index[order].tolist()
    result["skipped"] = skipped
    result["clips_per_s"] = len(all_labels) / max(elapsed, 1e-9)
    result["time_s"] = elapsed
    return result


def metrics_from_probs(probs: torch.Tensor, labels: torch.Tensor, num_classes: int) -> dict:
    """Top-1/top-5 (%), mean NLL of the averaged probabilities, per-class accuracy, confusion matrix
    (rows = true class, columns = predicted)."""
    n = len(labels)
    if n == 0:
        return {"n": 0, "acc1": float("nan"), "acc5": float("nan"), "loss": float("nan"),
                "mean_class_acc": float("nan"), "per_class": [None] * num_classes,
                "confusion": [[0] * num_classes for _ in range(num_classes)], "predictions": []}
    k = min(5, num_classes)
    top = probs.topk(k, dim=-1).indices
    acc1 = (top[:, 0] == labels).float().mean().item() * 100
    acc5 = (top == labels[:, None]).any(-1).float().mean().item() * 100
    loss = -probs.gather(1, labels[:, None]).clamp_min(1e-12).log().mean().item()
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.long)
    confusion.index_put_((labels, top[:, 0]), torch.ones(n, dtype=torch.long), accumulate=True)
    counts = confusion.sum(1)
    per_class = [(confusion[c, c].item() / counts[c].item() * 100) if counts[c] else None
                 for c in range(num_classes)]
    return {"n": n, "acc1": acc1, "acc5": acc5, "loss": loss, "per_class": per_class,
            "confusion": confusion.tolist(), "predictions": top[:, 0].tolist(),
            "mean_class_acc": sum(a for a in per_class if a is not None) / max(1, sum(a is not None
                                                                                       for a in per_class))}


def plot_confusion(confusion, names: list[str] | None, path: str, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    cm = np.asarray(confusion, dtype=np.float64)
    k = cm.shape[0]
    norm = cm / np.maximum(cm.sum(1, keepdims=True), 1)
    size = min(4 + 0.35 * k, 30)
    fig, ax = plt.subplots(figsize=(size, size))
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="fraction of the true class")
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    if names and k <= 60:
        ax.set_xticks(range(k), names, rotation=90, fontsize=8)
        ax.set_yticks(range(k), names, fontsize=8)
    if k <= 20:
        for i in range(k):
            for j in range(k):
                if cm[i, j]:
                    ax.text(j, i, int(cm[i, j]), ha="center", va="center", fontsize=8,
                            color="white" if norm[i, j] > 0.5 else "black")
    if title:
        ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------------
# loading a trained model


def load_trained(checkpoint: str, cfg_overrides: list[str] | None = None, config_file: str | None = None,
                 model_name: str | None = None, device: torch.device | None = None,
                 fused: str | bool = "auto") -> tuple[nn.Module, dict, list[str] | None]:
    """Model + configuration from one of our training checkpoints, or from an official/other checkpoint
    when ``model_name`` (a ``uniformerv2.list_models()`` name) says what to build. Returns
    (model in eval mode, cfg, class names or None)."""
    import uniformerv2

    from .recipes import DEFAULTS, build_config, check_config, load_yaml, merge, parse_override

    if not os.path.isfile(checkpoint):
        raise FileNotFoundError(f"checkpoint {checkpoint!r} not found")
    ckpt = read_checkpoint_file(checkpoint)
    ours = isinstance(ckpt, dict) and "model_build" in ckpt and "model_state" in ckpt
    if ours:
        cfg = merge(DEFAULTS, {k: v for k, v in ckpt["cfg"].items()})
        if config_file:
            cfg = merge(cfg, load_yaml(config_file))
        for o in cfg_overrides or []:
            cfg = merge(cfg, parse_override(o))
        check_config(cfg)
        build = dict(ckpt["model_build"])
        model = uniformerv2.build_model(**build)
        model.load_state_dict(ckpt["model_state"])
        names = ckpt.get("classes")
    else:
        if not model_name and not config_file:
            raise ValueError(f"{checkpoint} is not a uniformerv2-train checkpoint: pass --model NAME "
                             "(see uniformerv2.list_models()) and the data settings")
        cfg = build_config(None, config_file, cfg_overrides)
        explicit: dict = {}  # data settings the user gave; the rest follows the model
        if config_file:
            explicit = load_yaml(config_file)
        for o in cfg_overrides or []:
            explicit = _deep_update(explicit, parse_override(o))
        name = model_name or cfg["model"]["name"]
        kwargs = dict(cfg["model"].get("overrides") or {})
        given = explicit.get("data", {})
        if "num_frames" in given:
            kwargs["num_frames"] = cfg["data"]["num_frames"]
        classes = cfg["model"]["num_classes"] or _head_size(ckpt)
        if classes:
            kwargs["num_classes"] = classes
        model = uniformerv2.build_model(name, **kwargs)
        uniformerv2.load_checkpoint(model, ckpt)
        if "num_frames" not in given:
            cfg["data"]["num_frames"] = model.config["t_size"]
        if "crop_size" not in given:
            cfg["data"]["crop_size"] = model.config["input_resolution"]
        names = None
    del ckpt
    if cfg["data"]["crop_size"] != model.config["input_resolution"]:
        raise ValueError(f"data.crop_size={cfg['data']['crop_size']} but the model takes "
                         f"{model.config['input_resolution']}x{model.config['input_resolution']} crops")
    if cfg["data"].get("labels"):
        names = read_labels(cfg["data"]["labels"])
    if resolve_fused(fused):
        model.set_fused(True)
    if device is not None:
        model.to(device)
    model.eval()
    return model, cfg, names


def _deep_update(base: dict, update: dict) -> dict:
    out = dict(base)
    for k, v in update.items():
        out[k] = _deep_update(out.get(k, {}), v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _head_size(ckpt) -> int | None:
    """Number of classes of the classification head in a (possibly nested) checkpoint."""
    state = ckpt
    for key in ("model_state", "state_dict", "model", "module"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        return None
    for k, v in state.items():
        if (k.endswith("transformer.proj.2.weight") or k.endswith("cls_head.fc_cls.weight")) and hasattr(v, "shape"):
            return int(v.shape[0])
    return None


# ----------------------------------------------------------------------------------------------------
# command line


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="uniformerv2-eval", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--list", help="`path label` list of test videos (default: the run's validation data)")
    p.add_argument("--root", help="folder the listed paths are relative to")
    p.add_argument("--labels", help="class names, one per line")
    p.add_argument("--clips", type=at_least_one, help="temporal views per video")
    p.add_argument("--crops", type=int, choices=(1, 3), help="spatial views per clip")
    p.add_argument("--batch-size", type=at_least_one, help="videos per batch and process")
    p.add_argument("--num-workers", type=int)
    p.add_argument("--model", help="model name, for checkpoints not written by uniformerv2-train")
    p.add_argument("--config", help="YAML with data settings (for foreign checkpoints)")
    p.add_argument("--fused", default="auto", help="auto | true | false")
    p.add_argument("--output-dir")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("overrides", nargs="*", help="section.key=value")
    return p


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_intermixed_args(argv)
    if args.num_workers is not None and args.num_workers < 0:
        parser.error(f"argument --num-workers: expected an integer >= 0, got {args.num_workers}")
    logging.basicConfig(level=logging.INFO if int(os.environ.get("RANK", "0")) == 0 else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(message)s")
    overrides = list(args.overrides)
    if args.list:
        overrides += ["data.dataset=video_list", f"data.val_list={args.list}"]
    if args.root:
        overrides.append(f"data.root={args.root}")
    if args.labels:
        overrides.append(f"data.labels={args.labels}")
    if args.clips:
        overrides.append(f"eval.num_clips={args.clips}")
    if args.crops:
        overrides.append(f"eval.num_crops={args.crops}")
    if args.batch_size:
        overrides.append(f"eval.batch_size={args.batch_size}")
    if args.num_workers is not None:
        overrides.append(f"data.num_workers={args.num_workers}")
    info = du.setup()
    ok = False
    try:
        try:  # a missing file or a bad setting: a usage error, not a traceback
            model, cfg, names = load_trained(args.checkpoint, overrides, args.config, args.model, info.device,
                                             args.fused)
            check_data_files(cfg, ("val",))
            dataset = build_dataset(cfg, train=False, device=info.device)
        except INPUT_ERRORS as exc:
            parser.error(input_error_message(exc))
        num_classes = model.transformer.proj[2].out_features
        result = evaluate_model(model, dataset, cfg, info, num_classes, progress=not args.no_progress)
        if result["n"] == 0:
            parser.error(f"data.val_list={cfg['data']['val_list']}: none of its {len(result['skipped'])} videos "
                         "could be read (each is named in a warning above)")
        if info.is_main:
            out_dir = args.output_dir or os.path.join(os.path.dirname(os.path.abspath(args.checkpoint)), "eval")
            os.makedirs(out_dir, exist_ok=True)
            views = f"{cfg['eval']['num_clips']}x{cfg['eval']['num_crops']}"
            summary = {k: result[k] for k in ("n", "acc1", "acc5", "mean_class_acc", "loss", "skipped")}
            summary["views"] = views
            with open(os.path.join(out_dir, "results.json"), "w") as fh:
                json.dump({**summary, "classes": names, "per_class": result["per_class"],
                           "confusion": result["confusion"]}, fh, indent=1)
            with open(os.path.join(out_dir, "per_class.csv"), "w", newline="") as fh:
                w = csv.writer(fh)
                w.writerow(["class", "name", "count", "accuracy"])
                for c, acc in enumerate(result["per_class"]):
                    w.writerow([c, names[c] if names and c < len(names) else "", sum(result["confusion"][c]),
                                "" if acc is None else f"{acc:.2f}"])
            plot_confusion(result["confusion"], names, os.path.join(out_dir, "confusion.png"),
                           f"top-1 {result['acc1']:.2f}% ({views} views, {result['n']} videos)")
            print(f"videos: {result['n']} (skipped {len(result['skipped'])})  views: {views}")
            print(f"top-1: {result['acc1']:.2f}%  top-5: {result['acc5']:.2f}%  "
                  f"mean class accuracy: {result['mean_class_acc']:.2f}%")
            print(f"wrote {out_dir}/results.json, per_class.csv, confusion.png")
        ok = True
    finally:
        du.cleanup(info, sync=ok)
    return 0


if __name__ == "__main__":
    sys.exit(main())
