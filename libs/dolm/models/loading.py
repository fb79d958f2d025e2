"""``load(spec)``: resolve a model spec to a folder, load model + tokenizer, describe it.

Resolution order for ``spec``:

1. ``toy`` -> ``$DOLM_TOY_MODEL`` or ``<repo>/models/toy`` (found from this package's
   file). Not built -> InputError telling how to build it (``dolm-toy train``).
2. an existing local folder (must hold ``config.json``). No network.
3. something that looks like a path (``/``, ``./``, ``../``, ``~``) but does not exist ->
   InputError.
4. a hub id (``org/name`` or ``name``): first the local HF cache (no network), then -
   unless ``HF_HUB_OFFLINE``/``TRANSFORMERS_OFFLINE`` is set - a download of the config,
   tokenizer and weights, with the token from ``HF_TOKEN`` only (never a token file).
   Failure -> InputError saying what was tried.

``weights_sha256``: sha256 of the single weight file, or for several files the sha256
of ``sha256sum``-style lines (``<hash>  <name>\\n``, sorted by name). Weight files are
``*.safetensors`` (else ``*.bin``/``*.pt``). Per-file hashes are cached on disk in
``$DOLM_CACHE_DIR`` (default ``$XDG_CACHE_HOME/dolm`` or ``~/.cache/dolm``) keyed by
real path, size and mtime; HF-cache blobs named by their sha256 are not re-read.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import warnings
from pathlib import Path

from dolm.errors import DolmRuntimeError, InputError

DTYPES = ("auto", "float32", "float16", "bfloat16")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[\w.\-]+)?$")
_TRUTHY = {"1", "true", "yes", "on"}


def repo_root() -> Path:
    """The repository root (``libs/dolm/models/loading.py`` -> three levels up)."""
    return Path(__file__).resolve().parents[3]


def toy_model_path() -> Path:
    env = os.environ.get("DOLM_TOY_MODEL")
    return Path(env).expanduser() if env else repo_root() / "models" / "toy"


def _offline() -> bool:
    return any(
        os.environ.get(k, "").strip().lower() in _TRUTHY
        for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    )


def _check_folder(path: Path, spec: str) -> Path:
    if not (path / "config.json").is_file():
        raise InputError(
            f"--model {spec!r}: folder {path} has no config.json (expected a Hugging Face "
            "model folder: config.json, weights, tokenizer files)"
        )
    return path


def resolve_spec(spec: str, revision: str | None = None, trust_remote_code: bool = False):
    """Return ``(folder, source, resolved_revision)``; source is toy/local/cache/hub."""
    if not isinstance(spec, str) or not spec.strip():
        raise InputError(
            "--model: expected 'toy', a local folder or a hub id, found an empty value")
    spec = spec.strip()
    if spec == "toy":
        path = toy_model_path()
        if not (path / "config.json").is_file():
            raise InputError(
                f"--model toy: the toy model is not built (nothing at {path}); build it with "
                "`dolm-toy train` (or point DOLM_TOY_MODEL at a built copy)"
            )
        return path, "toy", None
    path = Path(spec).expanduser()
    if path.is_dir():
        return _check_folder(path, spec), "local", None
    if path.exists():
        raise InputError(f"--model {spec!r}: is a file; expected a model folder or a hub id")
    looks_like_path = spec.startswith(("/", "./", "../", "~", ".\\")) or spec.count("/") > 1
    if looks_like_path or not _HUB_ID.match(spec):
        raise InputError(
            f"--model {spec!r}: no such local folder, and not a valid hub id "
            "(expected 'toy', an existing folder, or a hub id like 'org/name')"
        )
    return _resolve_hub(spec, revision, trust_remote_code)


def _snapshot_revision(folder: str) -> str | None:
    p = Path(folder)
    return p.name if p.parent.name == "snapshots" else None


def _hf_cache_dir() -> str | None:
    """The HF hub cache named by the environment *now* (huggingface_hub reads it at
    import); None -> the library default."""
    env = os.environ
    for key in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if env.get(key):
            return str(Path(env[key]).expanduser())
    if env.get("HF_HOME"):
        return str(Path(env["HF_HOME"]).expanduser() / "hub")
    return None


def _resolve_hub(spec: str, revision: str | None, trust_remote_code: bool):
    from huggingface_hub import snapshot_download

    tried = [f"local folder {spec!r} (does not exist)"]
    rev_txt = f" at revision {revision!r}" if revision else ""
    cache_dir = _hf_cache_dir()
    try:
        folder = snapshot_download(spec, revision=revision, local_files_only=True,
                                   cache_dir=cache_dir)
        if (Path(folder) / "config.json").is_file():
            return Path(folder), "cache", _snapshot_revision(folder) or revision
        tried.append(f"HF cache{rev_txt} (snapshot without config.json)")
    except Exception as exc:  # not cached, or a bad revision
        tried.append(f"HF cache{rev_txt} (not found: {type(exc).__name__})")
    if _offline():
        tried.append("hub (skipped: offline mode, HF_HUB_OFFLINE/TRANSFORMERS_OFFLINE is set)")
        raise InputError(f"--model {spec!r}: model not found; tried " + "; ".join(tried))
    token = os.environ.get("HF_TOKEN") or False
    patterns = ["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken", "tokenizer*"]
    if trust_remote_code:
        patterns.append("*.py")
    try:
        folder = snapshot_download(spec, revision=revision, token=token, cache_dir=cache_dir,
                                   allow_patterns=patterns)
        if not _weight_files(Path(folder)):
            folder = snapshot_download(spec, revision=revision, token=token, cache_dir=cache_dir,
                                       allow_patterns=patterns + ["*.bin"])
    except Exception as exc:
        name = type(exc).__name__
        if "GatedRepo" in name or "401" in str(exc) or "403" in str(exc):
            why = "access denied (gated or private repo: set HF_TOKEN)"
        elif "RepositoryNotFound" in name:
            why = "no such repository (or private: set HF_TOKEN)"
        elif "RevisionNotFound" in name:
            why = f"no revision {revision!r}"
        elif "LocalEntryNotFound" in name or "Connect" in name or "Connect" in str(exc):
            why = "hub unreachable (no network?); set HF_HUB_OFFLINE=1 to skip it"
        else:
            first = str(exc).splitlines()[0][:200] if str(exc) else ""
            why = f"could not download ({name}: {first})"
        tried.append(f"hub{rev_txt}: {why}")
        raise InputError(f"--model {spec!r}: model not found; tried " + "; ".join(tried)) from None
    if not (Path(folder) / "config.json").is_file():
        raise InputError(f"--model {spec!r}: hub repository has no config.json")
    return Path(folder), "hub", _snapshot_revision(folder) or revision


# --------------------------------------------------------------------- weights hash
def _weight_files(folder: Path) -> list[Path]:
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        files = sorted(list(folder.glob("*.bin")) + list(folder.glob("*.pt")))
    return [f for f in files if f.is_file()]


def _cache_file() -> Path:
    base = os.environ.get("DOLM_CACHE_DIR")
    if base:
        return Path(base).expanduser() / "weights_sha256.json"
    xdg = os.environ.get("XDG_CACHE_HOME")
    root = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return root / "dolm" / "weights_sha256.json"


_MEM_CACHE: dict[str, str] = {}


def write_cache_json(path: Path, data: dict) -> None:
    """Replace a JSON cache file atomically; a cache that cannot be written is skipped."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data, indent=0, sort_keys=True))
        os.replace(tmp, path)
    except OSError:
        pass


def _file_sha256(path: Path, disk: dict) -> tuple[str, bool]:
    real = path.resolve()
    if real.parent.name == "blobs" and re.fullmatch(r"[0-9a-f]{64}", real.name):
        return real.name, False  # HF cache: LFS blobs are named by their sha256
    st = real.stat()
    key = f"{real}|{st.st_size}|{st.st_mtime_ns}"
    hit = _MEM_CACHE.get(key) or disk.get(key)
    if hit:
        _MEM_CACHE[key] = hit
        return hit, False
    h = hashlib.sha256()
    with open(real, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            h.update(chunk)
    digest = h.hexdigest()
    _MEM_CACHE[key] = digest
    disk[key] = digest
    return digest, True


def weights_sha256(folder) -> str | None:
    """Hash of the weight files in ``folder`` (see module docstring); None if none."""
    files = _weight_files(Path(folder))
    if not files:
        return None
    cache_path = _cache_file()
    try:
        disk = json.loads(cache_path.read_text())
        if not isinstance(disk, dict):
            disk = {}
    except (OSError, ValueError):
        disk = {}
    hashes, new = [], False
    for f in files:
        digest, fresh = _file_sha256(f, disk)
        hashes.append((f.name, digest))
        new |= fresh
    if new:
        write_cache_json(cache_path, disk)
    if len(hashes) == 1:
        return hashes[0][1]
    lines = "".join(f"{d}  {n}\n" for n, d in hashes)
    return hashlib.sha256(lines.encode()).hexdigest()


# --------------------------------------------------------------------- load
def pick_device(device: str | None) -> str:
    import torch

    if device in (None, "", "auto"):
        if torch.cuda.is_available():
            return "cuda"
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            return "mps"
        return "cpu"
    return str(device)


def _config_dtype(config):
    import torch

    dt = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(dt, str):
        dt = getattr(torch, dt, None)
    return dt if isinstance(dt, torch.dtype) else None


def load(
    spec: str,
    revision: str | None = None,
    dtype: str = "auto",
    device: str = "auto",
    device_map=None,
    load_in_4bit: bool = False,
    load_in_8bit: bool = False,
    trust_remote_code: bool = False,
    verify: bool = True,
):
    """Load a causal LM and its tokenizer and wrap them in a :class:`LoadedModel`.

    ``spec``: ``toy``, a local folder, or a hub id (see module docstring).
    ``dtype``: ``auto`` (the checkpoint's dtype; float16 checkpoints load as float32 on
    CPU), ``float32``, ``float16``, ``bfloat16``. ``device``: ``auto`` (cuda, mps, cpu)
    or a torch device string; ignored when ``device_map`` is given (e.g. ``"auto"``:
    accelerate places layers over the devices). ``load_in_4bit``/``load_in_8bit``:
    bitsandbytes quantization (nf4 / LLM.int8), placed on ``device`` unless
    ``device_map`` says otherwise. The model is put in eval mode with parameters frozen
    (``requires_grad=False``); activations can still require grad.

    Before a (transformers version, model type, adapter row) is served the first time,
    :mod:`dolm.models.verify` checks its identities on a short prompt (the verdict is
    cached); a failure is an InputError naming the identity. ``verify=False`` skips it
    (``dolm-validate --model`` then runs it itself).
    """
    if dtype not in DTYPES:
        raise InputError(f"--dtype: expected one of {', '.join(DTYPES)}, found {dtype!r}")
    if load_in_4bit and load_in_8bit:
        raise InputError("--load-in-4bit and --load-in-8bit: choose one")
    folder, source, resolved_rev = resolve_spec(spec, revision, trust_remote_code)
    if source in ("toy", "local") and revision:
        resolved_rev = revision  # recorded as given; a local folder has no revisions

    import transformers

    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # loading chatter off; restored below
    try:
        return _load(spec, folder, source, resolved_rev, dtype, device, device_map,
                     load_in_4bit, load_in_8bit, trust_remote_code, verify)
    finally:
        transformers.logging.set_verbosity(verbosity)


def check_quantized_layers(model, quant: str, spec: str) -> None:
    """Run every bitsandbytes layer once on a one-row input; refuse the model if one fails.

    A backend's kernels can reject layer shapes (bitsandbytes 0.50.2's CPU 4-bit kernel packs
    weights in blocks: out_features must be a multiple of 32 and in_features of the
    quantization block size, 64). Without this check the first forward pass of a tool dies
    in a bitsandbytes traceback; here the InputError names the layer and its shape. The
    probe is what a first forward would do anyway (CPU kernels repack weights then).
    """
    import torch

    for name, module in model.named_modules():
        if not type(module).__module__.startswith("bitsandbytes"):
            continue
        n_in = getattr(module, "in_features", None)
        n_out = getattr(module, "out_features", None)
        if n_in is None:
            continue
        weight = getattr(module, "weight", None)
        device = weight.device if weight is not None else torch.device("cpu")
        dtype = getattr(module, "compute_dtype", None) or torch.float32
        if device.type == "cpu" and dtype == torch.float16:
            dtype = torch.float32
        try:
            with torch.no_grad():
                module(torch.zeros(1, n_in, device=device, dtype=dtype))
        except (RuntimeError, AssertionError, ValueError) as exc:
            import bitsandbytes

            hint = ("The CPU 4-bit kernel needs in_features a multiple of 64 and out_features "
                    "a multiple of 32. ") if quant == "4bit" and device.type == "cpu" else ""
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise InputError(
                f"--model {spec!r} --load-in-{quant}: layer {name} (in_features {n_in}, "
                f"out_features {n_out}) cannot be quantized on this backend (bitsandbytes "
                f"{bitsandbytes.__version__}, device {device}): {first}. {hint}Load the "
                "model without --load-in-4bit/--load-in-8bit, or on a GPU"
            ) from None


def _load(spec, folder, source, resolved_rev, dtype, device, device_map, load_in_4bit,
          load_in_8bit, trust_remote_code, verify=True):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from dolm.models.adapters import arch_for, refuse_config
    from dolm.models.loaded import LoadedModel
    from dolm.models.verify import ensure_verified

    try:
        config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    except Exception as exc:
        raise InputError(f"--model {spec!r}: cannot read {folder}/config.json: {exc}") from None
    refuse_config(config, where=f"--model {spec!r}")

    dev = pick_device(device)
    kwargs: dict = {"trust_remote_code": trust_remote_code}
    if dtype == "auto":
        cdt = _config_dtype(config)
        if dev == "cpu" and cdt == torch.float16:
            kwargs["dtype"] = torch.float32
        else:
            kwargs["dtype"] = "auto"
    else:
        kwargs["dtype"] = getattr(torch, dtype)
    quant = None
    if load_in_4bit or load_in_8bit:
        try:
            import bitsandbytes  # noqa: F401
            from transformers import BitsAndBytesConfig
        except ImportError:
            raise InputError(
                "--load-in-4bit/--load-in-8bit need bitsandbytes: pip install 'dolm[gpu]'"
            ) from None
        if load_in_4bit:
            compute = kwargs["dtype"] if isinstance(kwargs["dtype"], torch.dtype) else None
            compute = compute or _config_dtype(config) or torch.float32
            if dev == "cpu" and compute == torch.float16:
                compute = torch.float32
            kwargs["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute
            )
            quant = "4bit"
        else:
            kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
            quant = "8bit"
            # bitsandbytes warns on every int8 matmul that inputs are cast to float16
            warnings.filterwarnings("ignore", message="MatMul8bitLt: inputs will be cast")
    if device_map is not None:
        kwargs["device_map"] = device_map
    elif quant is not None or dev != "cpu":
        kwargs["device_map"] = {"": dev}
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, **kwargs)
    except ImportError as exc:
        raise InputError(f"--model {spec!r}: missing dependency: {exc}") from None
    except (OSError, ValueError) as exc:
        raise InputError(f"--model {spec!r}: cannot load the model from {folder}: {exc}") from None
    except RuntimeError as exc:
        raise DolmRuntimeError(f"--model {spec!r}: loading failed: {exc}") from None
    model.eval()
    model.requires_grad_(False)
    if quant is not None:
        check_quantized_layers(model, quant, spec)
    try:
        arch = arch_for(model)
    except InputError as exc:
        raise InputError(f"--model {spec!r}: {exc}") from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
    except Exception as exc:
        raise InputError(
            f"--model {spec!r}: cannot load a tokenizer from {folder}: {exc}") from None

    try:
        n_params = int(model.num_parameters())
    except Exception:  # pragma: no cover
        n_params = int(sum(p.numel() for p in model.parameters()))
    info = {
        "spec": spec,
        "path": str(folder),
        "source": source,
        "revision": resolved_rev,
        "architecture": (getattr(config, "architectures", None) or [type(model).__name__])[0],
        "model_type": config.model_type,
        "adapter": arch.name,
        "weights_sha256": weights_sha256(folder),
        "dtype": str(model.dtype).replace("torch.", ""),
        "quantization": quant,
        "device": dev if device_map is None else f"device_map={device_map}",
        "n_params": n_params,
    }
    lm = LoadedModel(model, tokenizer, arch, info)
    if verify:
        ensure_verified(lm, where=f"--model {spec!r}")
    return lm
