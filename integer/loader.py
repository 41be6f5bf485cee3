"""Loading an export: verify it and choose its engine (matmul-only or integer-only)."""

from __future__ import annotations

import os

from integer import export_format
from integer.intonly_engine import IntOnlyTransformer
from integer.matmul_engine import IntTransformer


def load_engine(export_dir: str) -> IntTransformer:
    """Load and verify an export: format version, SHA-256 of model.npz and spm.model,
    integer weights. Any problem is an ExportError naming the file. An integer-only export
    gives an IntOnlyTransformer, any other an IntTransformer."""
    manifest = export_format.read_manifest(export_dir)
    arrays = export_format.load_arrays(export_dir, manifest)
    export_format.verify_file(os.path.join(export_dir, export_format.SPM), manifest["spm"]["sha256"],
                              "spm model")
    engine_class = IntOnlyTransformer if manifest["model"].get("integer_only") else IntTransformer
    engine = engine_class(arrays, manifest["model"])
    engine.manifest = manifest
    return engine
