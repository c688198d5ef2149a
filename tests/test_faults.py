"""Faults fed to the I/O layer: a full disk, symbolic link cycles, damaged checkpoints, headers
that claim more voxels than their file holds. Each is one line naming the file, with the right exit
status, no library text on stderr and nothing half-written."""

from __future__ import annotations

import errno
import gzip
import os
import pickle
import re
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
import torch
from typer.testing import CliRunner

from crlnseg.checkpoint import load_checkpoint
from crlnseg.data.discovery import discover_cases, discover_single
from crlnseg.errors import CheckpointError, DataError, RunFailure
from crlnseg.io import read_image, write_image, writers
from crlnseg.io.readers import read_header
from crlnseg.io.writers import write_atomic

SHAPE = (12, 10, 8)
DEV_FULL = Path("/dev/full")  # every write fails with ENOSPC
needs_dev_full = pytest.mark.skipif(not DEV_FULL.exists(), reason="no /dev/full")


def _cli(*args: str | Path):
    from crlnseg.cli.app import app

    return CliRunner().invoke(app, [str(a) for a in args])


def _error_line(result, code: int) -> str:
    """The one stderr line of a failed command (progress lines aside)."""
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output and "Warning" not in result.output
    lines = [ln for ln in result.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, result.stderr
    return lines[0]


def _noise_nifti(path: Path, shape: tuple[int, ...] = SHAPE) -> Path:
    data = np.random.default_rng(0).random(shape).astype(np.float32)
    nib.save(nib.Nifti1Image(data, np.eye(4)), path)
    return path


# --- a full disk -----------------------------------------------------------------------------


@pytest.fixture
def full_file_system(monkeypatch: pytest.MonkeyPatch) -> None:
    """statvfs reports no free space (what a full disk looks like after a short write)."""
    class Full:
        f_bavail, f_frsize = 0, 4096

    monkeypatch.setattr(writers.os, "statvfs", lambda path: Full())


def _partial_then(fail):
    """A writer that leaves half a file in the temporary, then fails as ``fail`` does."""
    def write(tmp: Path) -> None:
        tmp.write_bytes(b"\0" * 4096)
        fail()
    return write


@needs_dev_full
@pytest.mark.parametrize("library", ["numpy", "torch", "errno", "quota", "sitk-meta"])
def test_a_full_disk_is_one_line_naming_the_output_and_leaves_nothing(
        tmp_path: Path, full_file_system: None, library: str) -> None:
    def numpy() -> None:  # numpy (and nibabel through it): "N requested and M written"
        np.zeros(100_000).tofile(str(DEV_FULL))

    def torch_save() -> None:  # "[enforce fail at inline_container.cc:...] . unexpected pos"
        torch.save({"w": torch.zeros(100_000)}, str(DEV_FULL))

    def plain() -> None:  # a plain write: ENOSPC itself
        with open(DEV_FULL, "wb", buffering=0) as f:
            f.write(b"x" * 100)

    def quota() -> None:
        raise OSError(errno.EDQUOT, os.strerror(errno.EDQUOT))

    def meta() -> None:  # SimpleITK's MetaImage writer
        raise RuntimeError("Exception thrown in SimpleITK ImageFileWriter_Execute: itkMetaImageIO"
                           ".cxx:1110:\nITK ERROR: MetaImageIO: File cannot be written: x.mha\n"
                           "Reason: No space left on device")

    fail = {"numpy": numpy, "torch": torch_save, "errno": plain, "quota": quota,
            "sitk-meta": meta}[library]
    target = tmp_path / "out.pt"
    with pytest.raises(RunFailure) as info:
        write_atomic(target, _partial_then(fail))
    reason = "disk quota exceeded" if library == "quota" else "no space left on device"
    assert str(info.value) == f"cannot write {target}: {reason} (the partial file was removed)"
    assert info.value.exit_code == 1
    assert list(tmp_path.iterdir()) == []


@needs_dev_full
def test_a_short_write_on_a_disk_with_room_is_not_called_a_full_disk(tmp_path: Path) -> None:
    target = tmp_path / "values.npy"
    with pytest.raises(RunFailure) as info:
        write_atomic(target, _partial_then(lambda: np.zeros(1000).tofile(str(DEV_FULL))))
    message = str(info.value)
    assert message.startswith(f"cannot write {target}: only part of the data could be written")
    assert "requested and" not in message and "\n" not in message
    assert list(tmp_path.iterdir()) == []


def test_image_writers_on_a_full_disk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                      full_file_system: None, capfd) -> None:
    ref = read_image(_noise_nifti(tmp_path / "ref.nii.gz"))
    nrrd_ref = tmp_path / "ref.nrrd"  # no NIfTI header: a .nii.gz output goes through SimpleITK
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros(SHAPE[::-1], np.float32)), str(nrrd_ref))
    other = read_image(nrrd_ref)
    out = tmp_path / "out"
    out.mkdir()
    mask = np.ones(SHAPE, np.uint8)

    def nibabel_full(self, filename) -> None:
        Path(filename).write_bytes(b"\0" * 1000)
        raise OSError("283360 requested and 44000 written")

    def meta_full(image, filename, *args, **kwargs) -> None:
        Path(filename).write_bytes(b"\0" * 1000)
        os.write(2, b"MetaImage: M_WriteElementsData: file stream is fail after write\n")
        raise RuntimeError("ITK ERROR: MetaImageIO: File cannot be written\nReason: No space "
                           "left on device")

    def nifti_silently_short(image, filename, *args, **kwargs) -> None:
        Path(filename).write_bytes(b"\0" * 1000)  # niftilib prints, and reports success
        os.write(2, b"** ERROR: NWAD: wrote only 65184 of 256000 bytes to file\n")

    capfd.readouterr()
    monkeypatch.setattr(nib.Nifti1Image, "to_filename", nibabel_full)
    with pytest.raises(RunFailure, match=re.escape(f"cannot write {out / 'm.nii.gz'}: no space "
                                                   "left on device (the partial file was")):
        write_image(mask, ref, out / "m.nii.gz")
    monkeypatch.setattr(sitk, "WriteImage", meta_full)
    with pytest.raises(RunFailure, match="m.mha: no space left on device"):
        write_image(mask, ref, out / "m.mha")
    with pytest.raises(RunFailure, match=r"m.mhd: no space .*\(the partial files were removed\)"):
        write_image(mask, ref, out / "m.mhd")
    monkeypatch.setattr(sitk, "WriteImage", nifti_silently_short)
    with pytest.raises(RunFailure, match="m2.nii.gz: no space left on device"):
        write_image(mask, other, out / "m2.nii.gz")  # a truncated file is never renamed in
    assert list(out.iterdir()) == []
    assert capfd.readouterr().err == ""  # the libraries' own lines are held back


def test_a_data_file_whose_header_cannot_follow_is_removed(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ref = read_image(_noise_nifti(tmp_path / "ref.nii.gz"))
    out = tmp_path / "out"
    out.mkdir()
    real = os.replace

    def header_fails(src, dst):
        if str(dst).endswith(".mhd"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(src, dst)

    monkeypatch.setattr(writers.os, "replace", header_fails)
    with pytest.raises(RunFailure, match=r"m.mhd: no space .*\(the partial files were removed\)"):
        write_image(np.ones(SHAPE, np.uint8), ref, out / "m.mhd")
    assert list(out.iterdir()) == []  # no m.zraw without its header


def test_cli_full_disk_exits_1_with_one_line(tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("pred", "gt"):
        (tmp_path / name).mkdir()
        mask = np.zeros(SHAPE, np.uint8)
        mask[2:6, 2:6, 2:6] = 1
        nib.save(nib.Nifti1Image(mask, np.eye(4)), tmp_path / name / "a.nii.gz")
    real = Path.write_text

    def full(self: Path, text: str, *args, **kwargs) -> int:
        real(self, text[: len(text) // 2], *args, **kwargs)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(Path, "write_text", full)
    report = tmp_path / "report.json"
    line = _error_line(_cli("evaluate", tmp_path / "pred", tmp_path / "gt", "-o", report), 1)
    assert line == (f"error: cannot write {report}: no space left on device "
                    "(the partial file was removed)")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gt", "pred"]


# --- symbolic link cycles ----------------------------------------------------------------------


def test_symlink_cycles_are_cycles_not_broken_links(tmp_path: Path) -> None:
    split = tmp_path / "split"
    (split / "images").mkdir(parents=True)
    _noise_nifti(split / "images" / "c.nii.gz")
    (split / "images" / "a.nii.gz").symlink_to("b.nii.gz")
    (split / "images" / "b.nii.gz").symlink_to("a.nii.gz")
    with pytest.raises(DataError) as info:
        discover_cases(split)
    message = str(info.value)
    assert re.fullmatch(rf"{re.escape(str(split / 'images'))}/[ab]\.nii\.gz: symbolic link cycle "
                        rf"at \S+/[ab]\.nii\.gz", message), message
    assert "broken" not in message
    with pytest.raises(DataError, match="a.nii.gz: symbolic link cycle at .*a.nii.gz"):
        discover_single(split / "images" / "a.nii.gz")
    with pytest.raises(DataError, match="a.nii.gz: symbolic link cycle at"):
        read_image(split / "images" / "a.nii.gz")
    # A link into the cycle names where the cycle is, not itself.
    (tmp_path / "z.nii.gz").symlink_to(split / "images" / "a.nii.gz")
    with pytest.raises(DataError, match=rf"z.nii.gz: symbolic link cycle at "
                                        rf"{re.escape(str(split))}/images/a.nii.gz$"):
        read_header(tmp_path / "z.nii.gz")
    # A link to itself, and a folder link through itself.
    (split / "images" / "b.nii.gz").unlink()
    (split / "images" / "a.nii.gz").unlink()
    (split / "images" / "self.nii.gz").symlink_to("self.nii.gz")
    with pytest.raises(DataError, match="self.nii.gz: symbolic link cycle at"):
        discover_cases(split)
    (split / "images" / "self.nii.gz").unlink()
    (split / "labels").symlink_to("labels/x")
    with pytest.raises(DataError, match=r"labels: symbolic link cycle at .*split/labels$"):
        discover_cases(split)
    # A dangling link is still called broken.
    (split / "labels").unlink()
    (split / "images" / "gone.nii.gz").symlink_to(tmp_path / "moved.nii.gz")
    with pytest.raises(DataError, match="gone.nii.gz: broken symbolic link"):
        discover_cases(split)


def test_a_folder_link_to_its_own_parent_is_a_cycle(tmp_path: Path) -> None:
    root = tmp_path / "h5"
    (root / "case1").mkdir(parents=True)
    import h5py

    with h5py.File(root / "case1" / "mri_norm2.h5", "w") as f:
        f["image"] = np.zeros((4, 4, 4), np.float32)
        f["label"] = np.zeros((4, 4, 4), np.uint8)
    assert [c.id for c in discover_cases(root)] == ["case1"]
    (root / "loop").symlink_to(".")
    with pytest.raises(DataError, match=r"h5/loop: symbolic link cycle at .*h5/loop \(it leads "
                                        r"back to .*h5, a folder that contains it\)"):
        discover_cases(root)
    paired = tmp_path / "paired"
    paired.mkdir()
    (paired / "images").symlink_to("..")
    with pytest.raises(DataError, match="paired/images: symbolic link cycle"):
        discover_cases(paired)


def test_cli_prepare_reports_the_cycle(tmp_path: Path) -> None:
    data = tmp_path / "data"
    (data / "images").mkdir(parents=True)
    (data / "labels").mkdir()
    _noise_nifti(data / "images" / "c.nii.gz")
    nib.save(nib.Nifti1Image(np.zeros(SHAPE, np.uint8), np.eye(4)), data / "labels" / "c.nii.gz")
    (data / "images" / "a.nii.gz").symlink_to("b.nii.gz")
    (data / "images" / "b.nii.gz").symlink_to("a.nii.gz")
    line = _error_line(_cli("prepare", data, "-o", tmp_path / "cache"), 2)
    assert "symbolic link cycle at" in line and "broken" not in line
    assert not (tmp_path / "cache").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]  # no staging folder left


# --- damaged checkpoints -----------------------------------------------------------------------


class NotAllowed:  # a pickled object that weights_only loading refuses
    pass


def _checkpoint_files(folder: Path) -> dict[str, Path]:
    good = folder / "good.pt"
    torch.save({"format": "crlnseg-checkpoint", "w": torch.rand(2000)}, good)
    whole = good.read_bytes()
    files = {"truncated": whole[: len(whole) // 2], "random": np.random.default_rng(0).bytes(5000),
             "text": b"junk\n", "empty": b""}
    paths = {}
    for name, content in files.items():
        paths[name] = folder / f"{name}.pt"
        paths[name].write_bytes(content)
    paths["zip"] = folder / "zip.pt"
    with zipfile.ZipFile(paths["zip"], "w") as z:
        z.writestr("hello.txt", "not a checkpoint")
    paths["globals"] = folder / "globals.pt"
    torch.save({"model": NotAllowed()}, paths["globals"])
    paths["pickle"] = folder / "pickle.pt"  # a plain pickle (protocol 4: torch warns about it)
    paths["pickle"].write_bytes(pickle.dumps({"a": 1}, protocol=4))
    return paths


def test_damaged_checkpoints_are_one_clean_line(tmp_path: Path, capfd) -> None:
    expected = {"truncated": "truncated or corrupt file", "random": "not a PyTorch file",
                "text": "not a PyTorch file", "empty": "empty file",
                "zip": "a zip archive, but not a PyTorch file",
                "globals": "not a weights-only crlnseg checkpoint",
                "pickle": "not a PyTorch file"}
    capfd.readouterr()
    for name, path in _checkpoint_files(tmp_path).items():
        with pytest.raises(CheckpointError) as info:
            load_checkpoint(path)
        message = str(info.value)
        assert message.startswith(f"{path}: "), message
        assert expected[name] in message, message
        assert "\x1b[" not in message and "\n" not in message and "\t" not in message, message
        assert re.search(r"[\w)]$", message) and len(message) < len(str(path)) + 160, message
        assert "weights_only" not in message and "torch.load" not in message, message
    with pytest.raises(CheckpointError, match=r"it needs the Python object \S*NotAllowed to load"):
        load_checkpoint(tmp_path / "globals.pt")
    captured = capfd.readouterr()
    assert captured.err == "" and captured.out == ""  # no torch warning printed


def test_long_library_messages_are_cut_at_a_word() -> None:
    from crlnseg.checkpoint import clean_message as _clean

    assert _clean("\x1b[1mbold\x1b[0m text. More advice follows here.") == "bold text"
    assert _clean("[enforce fail at inline_container.cc:180] . file in archive: a") == \
        "file in archive: a"
    cut = _clean("averyveryverylongword " * 20)
    assert cut.endswith("averyveryverylongword...") and len(cut) <= 124


def test_cli_predict_with_a_foreign_checkpoint(tmp_path: Path) -> None:
    paths = _checkpoint_files(tmp_path)
    scan = _noise_nifti(tmp_path / "scan.nii.gz", (16, 16, 16))
    line = _error_line(_cli("predict", "-m", paths["globals"], scan, "-o", tmp_path / "m.nii.gz"),
                       2)
    assert line.startswith(f"error: {paths['globals']}: not a weights-only crlnseg checkpoint")
    assert not (tmp_path / "m.nii.gz").exists()


# --- headers that claim more voxels than the file holds ----------------------------------------


def _claiming(path: Path, dims: tuple[int, int, int], compress: bool = False) -> Path:
    """A 10^3 float32 NIfTI whose header is patched to claim ``dims``."""
    image = nib.Nifti1Image(np.random.default_rng(0).random((10, 10, 10)).astype(np.float32),
                            np.eye(4))
    raw = bytearray(image.to_bytes())
    header = image.header.copy()
    header.set_data_shape(dims)
    raw[: len(header.binaryblock)] = header.binaryblock
    path.write_bytes(gzip.compress(bytes(raw)) if compress else bytes(raw))
    return path


@pytest.mark.parametrize("compress", [False, True])
def test_a_header_claiming_more_voxels_than_the_file_holds(tmp_path: Path, compress: bool,
                                                           capfd) -> None:
    suffix = ".nii.gz" if compress else ".nii"
    bigger = _claiming(tmp_path / f"bigger{suffix}", (20, 20, 20), compress)
    message = (f"{bigger}: the header claims 20 x 20 x 20 voxels but the file holds fewer "
               "(truncated or corrupt file)")
    with pytest.raises(DataError) as info:
        read_image(bigger)
    assert str(info.value) == message
    if not compress:  # the size alone tells: refused at the header check already
        with pytest.raises(DataError, match=re.escape(message)):
            read_header(bigger)
    # Absurd dims: refused from the file size, never allocated (27e12 float32 voxels).
    absurd = _claiming(tmp_path / f"absurd{suffix}", (30000, 30000, 30000), compress)
    for read in (read_header, read_image):
        with pytest.raises(DataError, match="claims 30000 x 30000 x 30000 voxels but the file "
                                            r"holds fewer \(truncated or corrupt file\)"):
            read(absurd)
    assert "Warning" not in capfd.readouterr().err


def test_a_truncated_file_says_so(tmp_path: Path, capfd) -> None:
    image = nib.Nifti1Image(np.random.default_rng(0).random((10, 10, 10)).astype(np.float32),
                            np.eye(4))
    whole = image.to_bytes()
    cut = tmp_path / "cut.nii.gz"
    cut.write_bytes(gzip.compress(whole)[:2000])
    plain = tmp_path / "cut.nii"
    plain.write_bytes(whole[:2000])
    meta = tmp_path / "cut.mha"
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((10, 10, 10), np.float32)), str(meta))
    meta.write_bytes(meta.read_bytes()[:-1000])
    nrrd = tmp_path / "cut.nrrd"
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((10, 10, 10), np.float32)), str(nrrd))
    nrrd.write_bytes(nrrd.read_bytes()[:-1000])
    capfd.readouterr()
    for path in (cut, plain, meta, nrrd):
        with pytest.raises(DataError) as info:
            read_image(path)
        assert str(info.value) == (f"{path}: the header claims 10 x 10 x 10 voxels but the file "
                                   "holds fewer (truncated or corrupt file)")
    assert capfd.readouterr().err == ""  # MetaIO's "data not read completely" is held back


@pytest.mark.parametrize("suffix", [".mha", ".nrrd", ".mhd", ".nhdr"])
def test_absurd_dims_in_other_formats_are_refused_before_reading(tmp_path: Path,
                                                                 suffix: str) -> None:
    path = tmp_path / f"img{suffix}"
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((10, 10, 10), np.float32)), str(path),
                    useCompression=True)
    text = path.read_bytes()
    key = b"DimSize = 10 10 10" if suffix in (".mha", ".mhd") else b"sizes: 10 10 10"
    assert key in text
    path.write_bytes(text.replace(key, key.replace(b"10 10 10", b"100000 100000 100000")))
    for read in (read_header, read_image):
        with pytest.raises(DataError, match=r"claims 100000 x 100000 x 100000 voxels but the "
                                            r"file holds fewer"):
            read(path)


def test_highly_compressible_images_are_not_refused(tmp_path: Path) -> None:
    # An all-zero mask compresses ~1000:1, close to deflate's limit: still a valid file.
    zeros = np.zeros((128, 128, 128), np.uint8)
    path = tmp_path / "zeros.nii.gz"
    path.write_bytes(gzip.compress(nib.Nifti1Image(zeros, np.eye(4)).to_bytes(), 9))
    assert read_image(path).array.shape == zeros.shape
    for suffix in (".mha", ".nrrd", ".mhd", ".nhdr"):
        other = tmp_path / f"zeros{suffix}"
        sitk.WriteImage(sitk.GetImageFromArray(zeros), str(other), useCompression=True,
                        compressionLevel=9)
        assert read_header(other).shape == zeros.shape
        assert read_image(other).array.shape == zeros.shape


def test_cli_prepare_refuses_the_damaged_header_before_writing(tmp_path: Path) -> None:
    data = tmp_path / "data"
    (data / "images").mkdir(parents=True)
    (data / "labels").mkdir()
    _claiming(data / "images" / "a.nii", (30000, 30000, 30000))
    nib.save(nib.Nifti1Image(np.zeros((10, 10, 10), np.uint8), np.eye(4)),
             data / "labels" / "a.nii")
    line = _error_line(_cli("prepare", data, "-o", tmp_path / "cache"), 2)
    assert line == (f"error: {data / 'images' / 'a.nii'}: the header claims 30000 x 30000 x "
                    "30000 voxels but the file holds fewer (truncated or corrupt file)")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]

