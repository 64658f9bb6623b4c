"""What the CPU benchmarks on tiny models share: their two command-line options and the pipeline load."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from inference.models import Family, ModelSpec
from inference.pipelines import load_pipeline
from inference.tiny import TINY_MODEL_IDS, ensure_tiny_models, tiny_model_specs


def add_tiny_model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument(
        "--models-dir", type=Path, default=Path(".cache/models"), help="tiny models (built once)"
    )


def load_tiny_pipeline(family: Family, args: argparse.Namespace):
    """The family's tiny random-weight pipeline, built offline on first use, on ``args.threads`` threads."""
    torch.set_num_threads(args.threads)
    ensure_tiny_models(args.models_dir)
    spec = next(s for s in tiny_model_specs(args.models_dir) if s["id"] == TINY_MODEL_IDS[family])
    return load_pipeline(ModelSpec(**spec))
