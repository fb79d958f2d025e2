"""dolm file formats: schema-checked Parquet, HDF5, JSON and safetensors with provenance.

See docs/CONVENTIONS.md. Readers validate before work starts; writers validate, then
rename atomically; every file carries ``dolm.schema`` and the ``dolm.provenance`` chain.
"""

from dolm.formats.h5 import (
    check_h5,
    describe_h5,
    finish_h5,
    open_h5_for_write,
    partial_path,
    read_h5,
    read_h5_meta,
)
from dolm.formats.io import (
    all_or_none,
    atomic_path,
    check_output,
    describe_safetensors,
    json_safe,
    load_safetensors,
    read_json,
    read_meta,
    read_table,
    save_safetensors,
    sniff,
    to_arrow,
    validate_file,
    write_error,
    write_json,
    write_table,
)
from dolm.formats.lock import output_locks
from dolm.formats.provenance import FileMeta, Run, sha256_bytes, sha256_file
from dolm.formats.schema import available_schemas, frame, load_schema, schema_dir

__all__ = [
    "FileMeta",
    "Run",
    "all_or_none",
    "atomic_path",
    "available_schemas",
    "check_h5",
    "check_output",
    "describe_h5",
    "describe_safetensors",
    "finish_h5",
    "frame",
    "json_safe",
    "load_safetensors",
    "load_schema",
    "open_h5_for_write",
    "output_locks",
    "partial_path",
    "read_h5",
    "read_h5_meta",
    "read_json",
    "read_meta",
    "read_table",
    "save_safetensors",
    "schema_dir",
    "sha256_bytes",
    "sha256_file",
    "sniff",
    "to_arrow",
    "validate_file",
    "write_error",
    "write_json",
    "write_table",
]
