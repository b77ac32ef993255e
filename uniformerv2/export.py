"""Export a UniFormerV2 for deployment: a torch.export program (.pt2) and/or ONNX, with a dynamic batch.

    uniformerv2-export runs/k400/best.pt --output exports/k400_b16          # .pt2 and .onnx, fp32
    uniformerv2-export model.pth --model k400_b16_f8x224 --format onnx --dtype fp16
    uniformerv2-export k400_b16_f8x224 --output exports/random              # a preset, random weights

After writing each file the command loads it back, runs it on a random clip (another batch size than the
one it was traced with) and prints its difference from the eager model: the .pt2 through torch.export.load,
the ONNX file through onnxruntime when it is installed (``pip install uniformerv2-kernels[onnx]``).

- The .pt2 keeps the fused operators (when the model runs fused) with backend "auto": each one picks its
  backend where the program runs, and the reference where no kernel can. Loading it needs
  ``import uniformerv2`` (which registers the operators) before ``torch.export.load``.
- The ONNX file holds each fused op's reference math in standard ONNX operators (opset 17 or newer, no
  custom domain), whether the model was fused or not, so onnxruntime and TensorRT parse it as it is.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
from torch import nn

FORMATS = ("pt2", "onnx")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16}
# A check's tolerance on max |exported - eager| / max |eager|: the exported graph computes the same
# function in another order (and ONNX runs the reference math where the eager model may run kernels)
CHECK_TOLERANCE = {torch.float32: 1e-4, torch.float16: 1e-2}
INPUT_NAME, OUTPUT_NAME = "video", "logits"
# torch.onnx.export(dynamo=True) builds opset 18 graphs; its conversion down to 17 fails on them
DEFAULT_OPSET = MIN_OPSET = 18
MAX_BATCH = 4096


def clip_shape(model: nn.Module) -> tuple[int, int, int, int]:
    """(3, T, H, W) of one input clip of ``model``, from its configuration."""
    config = model.config
    return 3, config["t_size"], config["input_resolution"], config["input_resolution"]


def random_clip(model: nn.Module, batch: int, dtype: torch.dtype, device, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, *clip_shape(model), generator=gen).to(device=device, dtype=dtype)


def _dynamic_shapes(dynamic_batch: bool):
    if not dynamic_batch:
        return None
    return ({0: torch.export.Dim("batch", min=1, max=MAX_BATCH)},)


def export_program(model: nn.Module, example: torch.Tensor, dynamic_batch: bool = True):
    """torch.export of ``model`` (in eval mode, without gradients) on ``example``; dimension 0 (the batch)
    dynamic unless ``dynamic_batch`` is False. Fused ops are recorded with backend "auto"."""
    with torch.no_grad():
        return torch.export.export(model.eval(), (example,), dynamic_shapes=_dynamic_shapes(dynamic_batch))


def export_onnx(model_or_program, example: torch.Tensor | None = None, dynamic_batch: bool = True,
                opset: int = DEFAULT_OPSET) -> torch.onnx.ONNXProgram:
    """The ONNX program of ``model_or_program`` (``.save(path)`` writes it): a model, traced on ``example``,
    or an ExportedProgram (e.g. a loaded .pt2), whose fused operators are first replaced by their reference
    math. Standard ONNX operators only; input "video", output "logits"."""
    from uniformerv2_kernels.library import reference_decompositions

    if isinstance(model_or_program, torch.export.ExportedProgram):
        table = torch.export.default_decompositions()
        table.update(reference_decompositions())
        program = model_or_program.run_decompositions(table)
        onnx_program = torch.onnx.export(program, dynamo=True, opset_version=opset, verbose=False,
                                         input_names=[INPUT_NAME], output_names=[OUTPUT_NAME])
    else:
        if example is None:
            raise ValueError("export_onnx: a model needs an example input")
        with torch.no_grad():
            onnx_program = torch.onnx.export(
                model_or_program.eval(), (example,), dynamo=True, opset_version=opset, verbose=False,
                dynamic_shapes=_dynamic_shapes(dynamic_batch), input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME])
    return onnx_program


def nonstandard_nodes(model_proto) -> list[str]:
    """Node types of an ONNX model (its functions included) outside the standard ONNX domain."""
    nodes = list(model_proto.graph.node) + [n for f in model_proto.functions for n in f.node]
    return sorted({f"{n.domain}::{n.op_type}" for n in nodes if n.domain not in ("", "ai.onnx")})


def relative_difference(got: torch.Tensor, expected: torch.Tensor) -> float:
    """max |got - expected| / max |expected|, in fp64."""
    got, expected = got.double().cpu(), expected.double().cpu()
    return float((got - expected).abs().max() / expected.abs().max().clamp_min(1e-30))


def run_program(path: str, clip: torch.Tensor) -> torch.Tensor:
    program = torch.export.load(path)
    with torch.no_grad():
        return program.module()(clip)


def onnxruntime_providers(device: torch.device) -> list[str] | None:
    """onnxruntime execution providers for ``device`` (CUDA first on a GPU when onnxruntime has it), or None
    when onnxruntime is not installed."""
    try:
        import onnxruntime
    except ImportError:
        return None
    available = onnxruntime.get_available_providers()
    if device.type == "cuda" and "CUDAExecutionProvider" in available:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def run_onnx(path: str, clip: torch.Tensor, providers: list[str]) -> torch.Tensor:
    import onnxruntime

    session = onnxruntime.InferenceSession(path, providers=providers)
    (logits,) = session.run([OUTPUT_NAME], {INPUT_NAME: clip.cpu().numpy()})
    return torch.from_numpy(logits)


def metadata(model: nn.Module, dtype: torch.dtype, classes: list[str] | None) -> dict:
    """What a deployment needs besides the graph: the clip shape and normalisation, the configuration, class
    names. Stored in the .pt2 (extra file ``uniformerv2.json``) and the ONNX file (metadata_props)."""
    _, T, H, W = clip_shape(model)
    return {"input": {"name": INPUT_NAME, "shape": ["batch", 3, T, H, W], "dtype": str(dtype).split(".")[-1],
                      "pixels": "RGB on a [0, 1] scale, normalised with mean 0.45 and std 0.225"},
            "output": {"name": OUTPUT_NAME, "shape": ["batch", model.config["num_classes"]]},
            "config": model.config, "classes": classes}


# ----------------------------------------------------------------------------------------------------
# command line


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="uniformerv2-export", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", help="a uniformerv2-train checkpoint, an official / mmaction2 checkpoint (with "
                                  "--model), or a model name from uniformerv2.list_models() (random weights)")
    p.add_argument("--model", help="model name, for checkpoints not written by uniformerv2-train")
    p.add_argument("--config", help="YAML with settings for checkpoints not written by uniformerv2-train")
    p.add_argument("--output", help="path prefix of the files written: PREFIX.pt2, PREFIX.onnx "
                                    "(default: the source's name in the current directory)")
    p.add_argument("--format", default="pt2,onnx", help="pt2, onnx or pt2,onnx (default)")
    p.add_argument("--dtype", default="fp32", help="fp32 (default) or fp16")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda: where the model is traced and checked")
    p.add_argument("--fused", default="auto",
                   help="auto | true | false: the .pt2 records the fused ops (auto: on CUDA); ONNX holds the "
                        "reference math either way")
    p.add_argument("--static-batch", action="store_true", help="fix the batch size to --batch")
    p.add_argument("--batch", type=int, default=2, help="batch size of the example clip traced (default 2)")
    p.add_argument("--opset", type=int, default=DEFAULT_OPSET, help=f"ONNX opset (default and minimum "
                                                                     f"{MIN_OPSET})")
    p.add_argument("--no-check", action="store_true", help="skip running the exported files")
    return p


def _parse_args(argv) -> argparse.Namespace:
    """Arguments, every mistake a usage error (exit 2) before anything is loaded or written."""
    parser = build_parser()
    args = parser.parse_args(argv)
    formats = [f.strip().lower() for f in args.format.split(",") if f.strip()]
    bad = [f for f in formats if f not in FORMATS]
    if bad or not formats:
        parser.error(f"--format {args.format!r}: expected pt2, onnx or pt2,onnx")
    args.formats = list(dict.fromkeys(formats))
    if args.dtype not in DTYPES:
        parser.error(f"--dtype {args.dtype!r}: expected one of {sorted(DTYPES)}")
    if args.device not in ("auto", "cpu", "cuda"):
        parser.error(f"--device {args.device!r}: expected auto, cpu or cuda")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    if args.fused not in ("auto", "true", "false"):
        parser.error(f"--fused {args.fused!r}: expected auto, true or false")
    if args.batch < 1:
        parser.error(f"--batch {args.batch}: expected a positive number of clips")
    if not args.static_batch and args.batch == 1:
        # torch.export specialises a dimension of size 1, which would fix the batch
        parser.error("--batch 1 cannot be traced with a dynamic batch: use --batch 2 or more, or --static-batch")
    if args.opset < MIN_OPSET:
        parser.error(f"--opset {args.opset}: expected {MIN_OPSET} or newer")
    if "onnx" in args.formats:
        missing = [m for m in ("onnx", "onnxscript") if not _importable(m)]
        if missing:
            parser.error(f"--format onnx needs {' and '.join(missing)}: pip install 'uniformerv2-kernels[onnx]'")
    import uniformerv2

    if args.model is not None and args.model not in uniformerv2.list_models():
        parser.error(f"--model {args.model!r}: not a model name; expected one of uniformerv2.list_models()")
    if not os.path.isfile(args.source) and args.source not in uniformerv2.list_models():
        parser.error(f"{args.source!r} is neither a checkpoint file nor a model name (see "
                     f"uniformerv2.list_models())")
    if args.output is None:
        args.output = os.path.splitext(os.path.basename(args.source))[0]
    out_dir = os.path.dirname(os.path.abspath(args.output))
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        parser.error(f"--output {args.output!r}: {out_dir} is not a directory")
    return args


def _importable(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def _load(args, device: torch.device) -> tuple[nn.Module, list[str] | None]:
    import uniformerv2

    from .evaluate import load_trained
    from .runtime import INPUT_ERRORS, input_error_message

    if not os.path.isfile(args.source):
        print(f"uniformerv2-export: {args.source} with random weights (no checkpoint)")
        return uniformerv2.build_model(args.source).eval(), None
    try:
        model, _, names = load_trained(args.source, [], args.config, args.model, None, False)
    except INPUT_ERRORS as exc:
        build_parser().error(input_error_message(exc))
    return model, names


def main(argv=None) -> int:
    args = _parse_args(argv)
    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    model, classes = _load(args, device)
    model = model.to(device=device, dtype=dtype).eval()
    if args.fused == "true" or (args.fused == "auto" and device.type == "cuda"):
        model.set_fused(True)
    example = random_clip(model, args.batch, dtype, device, seed=0)
    check_batch = args.batch if args.static_batch else args.batch + 1
    clip = random_clip(model, check_batch, dtype, device, seed=1)
    with torch.no_grad():
        expected = None if args.no_check else model(clip)
    info = metadata(model, dtype, classes)
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    failed = False
    for fmt in args.formats:
        path = f"{args.output}.{fmt}"
        if fmt == "pt2":
            program = export_program(model, example, dynamic_batch=not args.static_batch)
            torch.export.save(program, path, extra_files={"uniformerv2.json": json.dumps(info)})
            got = None if args.no_check else run_program(path, clip)
            how = "torch.export.load"
        else:
            onnx_program = export_onnx(model, example, dynamic_batch=not args.static_batch, opset=args.opset)
            onnx_program.model.metadata_props["uniformerv2"] = json.dumps(info)
            onnx_program.save(path)
            import onnx

            bad = nonstandard_nodes(onnx.load(path, load_external_data=False))
            if bad:  # the fused ops' reference math leaves none: this would be a bug of ours
                raise RuntimeError(f"{path}: operators outside the standard ONNX domain: {bad}")
            providers = None if args.no_check else onnxruntime_providers(device)
            if providers is None and not args.no_check:
                print(f"wrote {path} (not checked: onnxruntime is not installed; pip install "
                      f"'uniformerv2-kernels[onnx]')")
                continue
            got = None if args.no_check else run_onnx(path, clip, providers)
            how = f"onnxruntime {providers[0]}" if providers else ""
        if got is None:
            print(f"wrote {path}")
            continue
        diff = relative_difference(got, expected)
        ok = diff <= CHECK_TOLERANCE[dtype]
        failed |= not ok
        print(f"wrote {path}: {how} on a random clip of batch {check_batch}, {args.dtype}: max |diff| / "
              f"max |eager| = {diff:.2e} ({'ok' if ok else 'FAILED'}, tolerance {CHECK_TOLERANCE[dtype]:.0e})")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
