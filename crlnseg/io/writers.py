"""Write masks and maps onto a reference image's grid, atomically and without losing geometry.

A NIfTI output of a NIfTI reference is written with nibabel from a copy of the reference header,
so qform, sform, their codes and the voxel sizes are reproduced bit for bit (SimpleITK would
recompute them from its own, float-rounded, direction matrix). Everything else goes through
SimpleITK with the reference's spacing, origin and direction. The file appears under its final
name only once complete (temporary name in the same folder, then :func:`os.replace`). Formats with a
separate data file (``.mhd``, ``.nhdr``) are written under their final names into a hidden
temporary folder, so that the header names the final data file; the data file(s) are moved into
place first and the header last, so a visible header always has its data.

An output that cannot be written (permissions, read-only file system, a folder in the way) is an
:class:`OutputExistsError` naming the output, never the temporary. A full disk or quota (ENOSPC,
EDQUOT, or the errno-less short-write errors nibabel, numpy, SimpleITK and torch report instead) is
a one-line :class:`RunFailure` naming the output, raised once the partial file is removed; other
``OSError`` stay as they are (runtime failures).
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import secrets
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from crlnseg.errors import DataError, OutputExistsError, RunFailure
from crlnseg.io.paths import H5_SUFFIXES, is_nifti, split_suffix
from crlnseg.io.volume import Volume

__all__ = ["write_image", "atomic_path", "write_atomic", "output_errors", "make_folder",
           "check_output", "check_outputs", "check_not_inputs", "file_key", "data_file",
           "native_stderr_held", "SPLIT_SUFFIXES"]

# Header + separate data file: what SimpleITK (with compression) writes beside the header.
DATA_SUFFIXES = {".mhd": ".zraw", ".nhdr": ".raw.gz"}
SPLIT_SUFFIXES = tuple(DATA_SUFFIXES)
# errno values meaning "this output cannot be written here" (bad output, exit 2), as opposed to
# ENOSPC, EIO... (runtime failures, exit 1).
_UNWRITABLE = frozenset({errno.EACCES, errno.EPERM, errno.EROFS, errno.EISDIR, errno.ENOTDIR,
                         errno.ENOENT})  # ENOENT: e.g. a folder that cannot exist (/proc/x)
_FULL = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded"}
# What libraries report when a write came up short and they dropped the errno: numpy's tofile
# (also under nibabel), torch.save's zip writer, SimpleITK's NRRD and NIfTI writers.
_SHORT_WRITE = re.compile(r"\d+ requested and \d+ written|PytorchStreamWriter failed writing|"
                          r"inline_container\.cc|expected to write \d+ bytes, but only wrote|"
                          r"wrote only \d+ of \d+ bytes", re.IGNORECASE)
_NEARLY_FULL = 1 << 20  # free bytes below which a short write is taken for a full disk


def write_image(array: np.ndarray, reference: Volume, path: Path, overwrite: bool = False) -> None:
    """Write ``array`` (``(X, Y, Z)`` or ``(C, X, Y, Z)``) with ``reference``'s geometry.

    The dtype follows the array (bool -> uint8, float64 -> float32); a 4D array is written as a
    channel (vector) image. Refuses to replace an existing file unless ``overwrite``.
    """
    path = Path(path)
    array = _storable(np.asarray(array))
    if array.ndim not in (3, 4) or array.shape[-3:] != reference.spatial_shape:
        raise DataError(f"{path}: array shape {array.shape} does not match the reference "
                        f"grid {reference.spatial_shape}")
    if split_suffix(path)[1].lower() in H5_SUFFIXES:
        raise DataError(f"{path}: writing HDF5 is not supported; use .nii.gz, .nrrd or .mha")
    header = reference.header
    if is_nifti(path) and header is not None and _is_nifti_header(header):
        write_atomic(path, lambda tmp: _write_nibabel(array, header, tmp), overwrite)
    else:
        write_atomic(path, lambda tmp: _write_sitk(array, reference, tmp), overwrite)


def atomic_path(path: Path) -> Path:
    """A hidden temporary name next to ``path``, same extension (so writers pick the format)."""
    stem, suffix = split_suffix(path)
    return path.with_name(f".{stem}.tmp-{secrets.token_hex(4)}{suffix}")


@contextlib.contextmanager
def output_errors(path: Path) -> Iterator[None]:
    """Report an OSError that means "cannot write here" as a one-line error naming ``path``."""
    try:
        yield
    except OSError as err:
        if err.errno not in _UNWRITABLE:
            raise
        raise OutputExistsError(f"{path}: cannot write ({err.strerror or err})") from None


def make_folder(folder: Path) -> None:
    """``mkdir -p`` of an output folder; a folder that cannot be created is a bad output."""
    with output_errors(folder):
        Path(folder).mkdir(parents=True, exist_ok=True)


def data_file(path: Path) -> Path | None:
    """The separate data file written with a ``.mhd`` / ``.nhdr`` header (else None)."""
    stem, suffix = split_suffix(path)
    data = DATA_SUFFIXES.get(suffix.lower())
    return None if data is None else Path(path).with_name(stem + data)


def check_output(path: Path, overwrite: bool) -> None:
    """Refuse ``path`` as a file output: a folder in the way (always), an existing file (without
    ``overwrite``), a missing or non-folder parent."""
    path = Path(path)
    if path.is_dir():
        raise OutputExistsError(f"{path}: is a folder; expected a file name")
    if path.exists() and not overwrite:
        raise OutputExistsError(f"{path}: output exists; use --overwrite to replace it")
    if not path.parent.is_dir():
        problem = "is not a folder" if path.parent.exists() else "does not exist"
        raise OutputExistsError(f"{path}: output folder {path.parent} {problem}")


def _writable_folder(path: Path) -> None:
    """Refuse ``path`` when its folder (or the nearest existing ancestor) cannot take files."""
    probe = path.parent
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise OutputExistsError(f"{path}: cannot write (output folder is not writable: "
                                f"{probe} is not a folder)")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise OutputExistsError(f"{path}: cannot write (output folder {probe} is not writable)")


def file_key(path: Path) -> tuple[int, int] | None:
    """The identity of an existing file (device, inode): links, ``..`` and a case-insensitive
    file system's spellings all give the same key; None when ``path`` does not exist."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def check_not_inputs(outputs: list[Path], inputs: list[Path]) -> None:
    """Refuse an output that is an input file: even --overwrite never replaces an input."""
    sources = {file_key(p): p for p in inputs}
    sources.pop(None, None)
    for out in outputs:
        source = sources.get(file_key(out))  # a missing output is no input: inputs exist
        if source is not None:
            what = "an input" if str(out) == str(source) else f"the input {source}"
            raise OutputExistsError(f"{out}: output is {what}; choose another output "
                                    "(input files are never overwritten)")


def check_outside(out: Path, folder: Path, name: str, what: str = "output folder") -> None:
    """Refuse an output folder that is the input ``folder`` or lies inside it: its files would
    be read back as cases of that input."""
    dst, src = Path(out).resolve(), Path(folder).resolve()
    if dst == src or src in dst.parents:
        where = "is" if dst == src else "is inside"
        raise OutputExistsError(f"-o {out}: {where} the {name} folder {folder}; the {what} "
                                "must be outside its inputs (inputs are never modified)")


def check_outputs(paths: list[Path], overwrite: bool) -> None:
    """Refuse before writing anything: folders where files go, existing outputs (without
    overwrite), unwritable folders (where the process can tell up front; root can write almost
    anywhere, so the writers map write-time errors too)."""
    folders = [p for p in paths if p.is_dir()]
    if folders:
        raise OutputExistsError(f"{folders[0]}: is a folder; expected a file name")
    existing = [p for p in paths if p.exists()]
    existing += [d for p in paths if (d := data_file(p)) is not None and d.exists()]
    if existing and not overwrite:
        more = f" (and {len(existing) - 1} more)" if len(existing) > 1 else ""
        raise OutputExistsError(f"{existing[0]}: output exists{more}; use --overwrite to "
                               "replace it")
    first_per_folder: dict[Path, Path] = {}
    for p in paths:
        first_per_folder.setdefault(p.parent, p)
    for path in first_per_folder.values():
        _writable_folder(path)


def write_atomic(path: Path, write: Callable[[Path], None], overwrite: bool = False) -> None:
    """Call ``write(tmp)`` then rename ``tmp`` to ``path``; the temporary is removed on failure.

    For header + data formats (:data:`SPLIT_SUFFIXES`) ``write`` receives the final name inside
    a hidden temporary folder instead (see the module docstring). A full disk is a one-line
    :class:`RunFailure` naming ``path``, raised after the partial file is gone.
    """
    path = Path(path)
    check_output(path, overwrite)
    if split_suffix(path)[1].lower() in SPLIT_SUFFIXES:
        _write_split(path, write, overwrite)
        return
    tmp = atomic_path(path)
    try:
        with output_errors(path):
            # Created here, not by the writer: a folder we cannot write to fails as an OSError
            # (SimpleITK would report a RuntimeError), and the mode follows the umask.
            open(tmp, "xb").close()
        write(tmp)
        with output_errors(path):
            os.replace(tmp, path)
    except Exception as err:
        reason = _disk_full(err, path.parent)  # asked before the partial file frees its space
        if reason is None:
            raise
        tmp.unlink(missing_ok=True)
        raise RunFailure(f"cannot write {path}: {reason} "
                         f"({_removed([tmp], 'the partial file')})") from None
    finally:
        tmp.unlink(missing_ok=True)


def _write_split(path: Path, write: Callable[[Path], None], overwrite: bool) -> None:
    stage = path.with_name(f".{split_suffix(path)[0]}.tmp-{secrets.token_hex(4)}")
    with output_errors(path):
        stage.mkdir()
    moved: list[Path] = []
    try:
        write(stage / path.name)
        data = sorted(p for p in stage.iterdir() if p.name != path.name)
        taken = [path.with_name(p.name) for p in data if path.with_name(p.name).exists()]
        if taken and not overwrite:
            raise OutputExistsError(f"{taken[0]}: data file of {path.name} already exists "
                                    "(use --overwrite to replace it)")
        with output_errors(path):
            for p in data:  # data first: a visible header always has its data
                os.replace(p, path.with_name(p.name))
                moved.append(path.with_name(p.name))
            os.replace(stage / path.name, path)
            moved.clear()
    except Exception as err:
        reason = _disk_full(err, path.parent)
        for p in moved:  # data files whose header never arrived
            with contextlib.suppress(OSError):
                p.unlink()
        if reason is None:
            raise
        shutil.rmtree(stage, ignore_errors=True)
        raise RunFailure(f"cannot write {path}: {reason} "
                         f"({_removed([stage, *moved], 'the partial files')})") from None
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def _disk_full(err: BaseException, folder: Path) -> str | None:
    """Why a failed write ran out of room ("no space left on device", "disk quota exceeded"), or
    None when ``err`` (or an exception it wraps) is no such failure.

    An errno says so directly. A library's errno-less short-write message counts as a full disk
    when ``folder``'s file system is (nearly) full; otherwise it is reported as a short write.
    """
    chain: list[BaseException] = []
    link: BaseException | None = err
    while link is not None and all(link is not e for e in chain):
        chain.append(link)
        link = link.__cause__ or (None if link.__suppress_context__ else link.__context__)
    for e in chain:
        if isinstance(e, OSError) and e.errno in _FULL:
            return _FULL[e.errno]
    for e in chain:
        text = str(e).lower()  # e.g. SimpleITK's "Reason: No space left on device"
        for reason in _FULL.values():
            if reason in text:
                return reason
    if not any(_SHORT_WRITE.search(str(e)) for e in chain):
        return None
    try:
        st = os.statvfs(folder)
        full = st.f_bavail * st.f_frsize < _NEARLY_FULL
    except (OSError, AttributeError):  # no statvfs (Windows): say what is known
        full = False
    return _FULL[errno.ENOSPC] if full else "only part of the data could be written (disk full?)"


def _removed(paths: list[Path], what: str) -> str:
    """``"the partial file was removed"``, or where what could not be removed remains."""
    left = [p for p in paths if os.path.lexists(p)]
    if left:
        return f"{what} {left[0]} could not be removed"
    return f"{what} {'were' if what.endswith('s') else 'was'} removed"


@contextlib.contextmanager
def native_stderr_held(replay: bool = True) -> Iterator[list[str]]:
    """Hold what native code prints on file descriptor 2 while the block runs.

    C++ libraries (MetaIO, niftilib, Teem) print raw lines on stderr beside the exception they
    raise, or instead of one (SimpleITK's NIfTI writer reports a short write only there). The
    yielded list receives that text when the block ends. After a failure it is dropped (the
    error says what went wrong); after a success it is passed on to stderr when ``replay``.
    File descriptor 2 is process-wide: meant for the main thread's reads and writes.
    """
    held: list[str] = []
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError, AttributeError):  # no usable fd 2: nothing to hold
        yield held
        return
    try:
        sink = tempfile.TemporaryFile()
    except OSError:  # e.g. the temporary folder is on the full disk
        os.close(saved)
        yield held
        return
    ok = False
    try:
        os.dup2(sink.fileno(), 2)
        try:
            yield held
            ok = True
        finally:
            os.dup2(saved, 2)
            sink.seek(0)
            text = sink.read()
            held.append(text.decode("utf-8", "replace"))
            if ok and replay and text:
                os.write(2, text)
    finally:
        os.close(saved)
        sink.close()


def _storable(array: np.ndarray) -> np.ndarray:
    if array.dtype == bool:
        return array.astype(np.uint8)
    if array.dtype.kind == "f" and array.dtype != np.float32:
        return array.astype(np.float32)
    if array.dtype.kind in "iu" and array.dtype.itemsize > 4:
        return array.astype(np.int32 if array.dtype.kind == "i" else np.uint32)
    return array


def _is_nifti_header(header: object) -> bool:
    import nibabel as nib

    return isinstance(header, nib.Nifti1Header)


def _write_nibabel(array: np.ndarray, reference_header, tmp: Path) -> None:
    import nibabel as nib

    header = reference_header.copy()
    data = np.moveaxis(array, 0, -1) if array.ndim == 4 else array  # NIfTI: channels last
    header.set_data_dtype(data.dtype)
    header.set_data_shape(data.shape)
    # The reference's intensity scaling and display range do not apply to a mask or a map.
    header.set_slope_inter(1.0, 0.0)
    header["cal_min"] = header["cal_max"] = 0
    header.set_intent("none")
    image_class = nib.Nifti2Image if isinstance(header, nib.Nifti2Header) else nib.Nifti1Image
    image = image_class(data, None, header=header)
    # affine=None keeps the header's own qform/sform (codes included) instead of recomputing them.
    image.to_filename(str(tmp))


def _write_sitk(array: np.ndarray, reference: Volume, tmp: Path) -> None:
    import SimpleITK as sitk

    if array.ndim == 4:  # (C, X, Y, Z) -> (Z, Y, X, C) vector image
        image = sitk.GetImageFromArray(np.ascontiguousarray(array.transpose(3, 2, 1, 0)),
                                       isVector=True)
    else:
        image = sitk.GetImageFromArray(np.ascontiguousarray(array.transpose(2, 1, 0)))
    g = reference.geometry
    image.SetSpacing(g.spacing)
    image.SetOrigin(g.origin)
    image.SetDirection(g.direction)
    with native_stderr_held(replay=False) as printed:
        sitk.WriteImage(image, str(tmp), useCompression=True)
    text = "".join(printed)
    short = re.search(r"wrote only \d+ of \d+ bytes", text)
    if short:  # SimpleITK's NIfTI writer prints a short write and returns as if all went well
        raise OSError(f"SimpleITK {short.group(0)} to {tmp.name}")
    if text:
        sys.stderr.write(text)
