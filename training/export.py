"""Export a checkpoint's test-time feature extractor for deployment.

    python -m training.export --checkpoint run/final.pt --format torchscript|onnx --out FILE
        [--modality both|visible|infrared]

The exported model is the recipe's test descriptor through one modality's stem (the evaluation
protocols' and ``training.index``'s features), ImageNet normalisation included. Its input is a float32
(B, 3, H, W) RGB batch in [0, 1] at the training size (H, W in the metadata); its output the (B, D)
features (not normalised; rank by cosine).

* ``torchscript`` (traced): one file with a method per modality, ``m.visible(x)`` and
  ``m.infrared(x)`` (``forward`` = the first exported one); the metadata is the extra file
  ``reid_kernels.json`` (``torch.jit.load(FILE, _extra_files={"reid_kernels.json": ""})``). Loads with
  plain torch: the toolkit is not needed.
* ``onnx``: one graph per file, so one ``--modality`` (visible or infrared; run twice for both);
  input ``images``, output ``features``, dynamic batch; the metadata in the model's
  ``metadata_props``. Runs with onnxruntime. Needs ``pip install onnx``.

An existing FILE is kept (name a new one).
"""
from __future__ import annotations

import json
import os
import sys
import warnings
from typing import List, Optional

import torch
from torch import nn

from .gallery import IndexDirError, sha256_of

FORMATS = ("torchscript", "onnx")
METADATA = "reid_kernels.json"


class FeatureExtractor(nn.Module):
    """ImageNet normalisation, then ``model.extract(x, modality, descriptor)``, one method per modality."""

    def __init__(self, model: nn.Module, descriptor: str, modality: str = "visible"):
        super().__init__()
        from .data.transforms import IMAGENET_MEAN, IMAGENET_STD

        self.model = model.eval().requires_grad_(False)  # inference only: outputs need no autograd
        self.descriptor = descriptor
        self.modality = modality
        self.register_buffer("mean", IMAGENET_MEAN.view(1, 3, 1, 1).clone())
        self.register_buffer("std", IMAGENET_STD.view(1, 3, 1, 1).clone())

    def _features(self, x: torch.Tensor, modality: str) -> torch.Tensor:
        return self.model.extract((x - self.mean) / self.std, modality, self.descriptor)

    def visible(self, x: torch.Tensor) -> torch.Tensor:
        return self._features(x, "visible")

    def infrared(self, x: torch.Tensor) -> torch.Tensor:
        return self._features(x, "infrared")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._features(x, self.modality)


def metadata(cfg: dict, descriptor: str, dim: int, modalities: List[str], checkpoint: str) -> dict:
    return {"format": "reid_kernels.export/1", "recipe": cfg["recipe"], "descriptor": descriptor, "dim": dim,
            "height": cfg["data"]["height"], "width": cfg["data"]["width"], "modalities": modalities,
            "input": "float32 (B, 3, H, W) RGB in [0, 1]; ImageNet normalisation is inside the model",
            "output": "float32 (B, dim) features; rank by cosine", "checkpoint_sha256": sha256_of(checkpoint)}


def export_torchscript(extractor: FeatureExtractor, example: torch.Tensor, modalities: List[str], meta: dict,
                       out: str) -> None:
    from .engine.durable import atomic_write

    extractor.modality = modalities[0]
    methods = {"forward": example, **{m: example for m in modalities}}
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TracerWarnings of shape arithmetic that is constant at a fixed H, W
        traced = torch.jit.trace_module(extractor, methods, check_trace=True)
    files = {METADATA: json.dumps(meta)}
    atomic_write(out, lambda tmp: torch.jit.save(traced, tmp, _extra_files=files))


def export_onnx(extractor: FeatureExtractor, example: torch.Tensor, modality: str, meta: dict, out: str) -> None:
    try:
        import onnx
    except ImportError as error:
        raise IndexDirError(f"--format onnx: the onnx package is not installed ({error}); `pip install onnx "
                            "onnxruntime`, or use --format torchscript") from None
    from .engine.durable import atomic_write

    extractor.modality = modality

    def write(tmp: str) -> None:
        with torch.no_grad(), warnings.catch_warnings():
            # the legacy exporter's deprecation notice: it is the exporter that needs no onnxscript
            warnings.simplefilter("ignore")
            torch.onnx.export(extractor, (example,), tmp, input_names=["images"], output_names=["features"],
                              dynamic_axes={"images": {0: "batch"}, "features": {0: "batch"}}, dynamo=False)
        model = onnx.load(tmp)
        for key, value in meta.items():
            entry = model.metadata_props.add()
            entry.key, entry.value = key, json.dumps(value)
        onnx.save(model, tmp)

    atomic_write(out, write)


def run(args) -> int:
    from .index import load_model

    if os.path.exists(args.out):
        raise IndexDirError(f"--out: {args.out} exists; name a new file")
    if args.format == "onnx" and args.modality == "both":
        raise IndexDirError("--modality: an ONNX file holds one graph, so one modality: give --modality visible or "
                            "--modality infrared (run twice for both)")
    model, cfg, descriptor, _ = load_model(args.checkpoint, "cpu")
    modalities = ["visible", "infrared"] if args.modality == "both" else [args.modality]
    meta = metadata(cfg, descriptor, int(model.feat_dim), modalities, args.checkpoint)
    extractor = FeatureExtractor(model, descriptor).eval()
    example = torch.rand(2, 3, cfg["data"]["height"], cfg["data"]["width"], generator=torch.Generator().manual_seed(0))
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    if args.format == "torchscript":
        export_torchscript(extractor, example, modalities, meta, args.out)
    else:
        export_onnx(extractor, example, modalities[0], meta, args.out)
    print(f"wrote {args.out}: {args.format}, {', '.join(modalities)}, input (B, 3, {meta['height']}, {meta['width']}) "
          f"in [0, 1], output (B, {meta['dim']}) {descriptor} features")
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    from .cli import one_line_failures, parser as cli_parser
    from .engine.checkpoint import CheckpointError

    parser = cli_parser("export", description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="a checkpoint written by training.train")
    parser.add_argument("--format", required=True, choices=FORMATS)
    parser.add_argument("--out", required=True, help="the file to write (must not exist)")
    parser.add_argument("--modality", default="both", choices=("both", "visible", "infrared"),
                        help="which stems to export (onnx: one of visible / infrared)")
    args = parser.parse_args(argv)
    return one_line_failures(lambda: run(args), (CheckpointError, IndexDirError, FileNotFoundError))


if __name__ == "__main__":
    sys.exit(main())
