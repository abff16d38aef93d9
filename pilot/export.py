"""python -m pilot.export: a pruned model of a ``python -m pilot.train`` run as a compressed sparse checkpoint.

    python -m pilot.export runs/r20 --sparsity 0.95 --out r20-95.safetensors

Reads RUN_DIR/pruned-<100*S>.pt (the state dict with exact zeros that the run wrote at sparsity S) and
RUN_DIR/config.json, builds the architecture with :func:`pilot.models.build_model`, and writes the weights with
:func:`pilot.save_sparse`. The metadata records method, model, data, num_classes, in_channels and input_size, so
that the model can be built again to load it::

    info = pilot.read_sparse_metadata(path)
    model = pilot.models.build_model(info["model"], int(info["num_classes"]), int(info["in_channels"]),
                                     int(info["input_size"]))
    pilot.load_sparse(path, model)

The file is read back into a fresh model and compared bit for bit before the command reports success.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from .models import build_model
from .sparse_checkpoint import SparseCheckpointError, dense_fp32_bytes, load_sparse, save_sparse
from .sparse_encoding import same_bits

__all__ = ["export_run", "main"]

CONFIG = "config.json"
PRUNED_KEYS = ("state_dict", "model", "num_classes", "in_channels", "input_size")


class ExportError(Exception):
    """The run cannot be exported as asked; the message says why and what to do."""


def pruned_file(run_dir: Path, sparsity: float) -> Path:
    """RUN_DIR/pruned-<100*S>.pt, the name pilot.train gives it; an error lists the sparsities the run has."""
    if not 0 < sparsity < 1:
        raise ExportError(f"--sparsity {sparsity:g}: need a fraction in (0, 1), e.g. 0.95")
    path = run_dir / f"pruned-{100 * sparsity:g}.pt"
    if not path.is_file():
        found = sorted(p.name for p in run_dir.glob("pruned-*.pt"))
        raise ExportError(f"{path} does not exist; this run has {', '.join(found) or 'no pruned models'}"
                          + (" (pass the sparsity as a fraction: pruned-95.pt is --sparsity 0.95)" if found else
                             " (is it a finished python -m pilot.train run directory?)"))
    return path


def _read_run(run_dir: Path, sparsity: float) -> tuple[dict[str, Any], dict[str, Any]]:
    """(config.json, the pruned file's contents), with what the export needs checked."""
    try:
        config = json.loads((run_dir / CONFIG).read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise ExportError(f"{run_dir / CONFIG} is unreadable ({error}); RUN_DIR must be a python -m pilot.train run "
                          "directory") from error
    path = pruned_file(run_dir, sparsity)
    try:
        pruned = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch.load raises many types for a damaged or foreign file
        raise ExportError(f"{path} cannot be read ({type(error).__name__}: {error})") from error
    missing = [key for key in PRUNED_KEYS if not isinstance(pruned, dict) or key not in pruned]
    if missing or "method" not in config:
        raise ExportError(f"{path} lacks {missing} or {run_dir / CONFIG} lacks 'method': not written by "
                          "python -m pilot.train")
    return config, pruned


def export_run(run_dir: Path, sparsity: float, out: Path) -> tuple[dict[str, str], int]:
    """Write the run's model pruned to ``sparsity`` to ``out`` as a sparse checkpoint and check that it loads back
    bit for bit; returns its metadata and :func:`pilot.dense_fp32_bytes` of the model, to compare its size with."""
    run_dir, out = Path(run_dir), Path(out)
    if not out.parent.is_dir():
        raise ExportError(f"--out {out}: the directory {out.parent} does not exist; create it or write elsewhere")
    config, pruned = _read_run(run_dir, sparsity)
    shape = {key: int(pruned[key]) for key in ("num_classes", "in_channels", "input_size")}
    model = build_model(pruned["model"], **shape)
    model.load_state_dict(pruned["state_dict"])
    metadata = {"data": str(config.get("data", pruned.get("data"))), "run": run_dir.resolve().name,
                "target_sparsity": repr(float(pruned.get("target_sparsity", sparsity))),
                **{key: str(value) for key, value in shape.items()}}
    info = save_sparse(model, out, model_name=pruned["model"], method=str(config["method"]), metadata=metadata)
    loaded = build_model(pruned["model"], **shape)
    load_sparse(out, loaded)
    expected = model.state_dict()
    differ = [name for name, tensor in loaded.state_dict().items() if not same_bits(tensor, expected[name])]
    if differ:
        raise ExportError(f"{out} does not load back bit for bit ({differ[:5]}); this is a bug in pilot")
    return info, dense_fp32_bytes(model)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pilot.export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="a python -m pilot.train run directory")
    parser.add_argument("--sparsity", type=float, required=True, metavar="S",
                        help="which pruned model: the fraction pilot.train pruned to (0.95 reads pruned-95.pt)")
    parser.add_argument("--out", type=Path, required=True, metavar="FILE", help="the .safetensors file to write")
    args = parser.parse_args(argv)
    try:
        info, dense = export_run(args.run_dir, args.sparsity, args.out)
    except (ExportError, SparseCheckpointError) as error:
        print(f"python -m pilot.export: {error}", file=sys.stderr)
        return 2
    size = args.out.stat().st_size
    print(f"wrote {args.out}: {info['model']} trained with {info['method']} on {info['data']}, "
          f"{float(info['sparsity']):.2%} of the prunable weights zero; {size:,} bytes, {size / dense:.3f}x the "
          f"dense fp32 state dict ({dense:,} bytes); loads back bit for bit")
    return 0


if __name__ == "__main__":
    sys.exit(main())
