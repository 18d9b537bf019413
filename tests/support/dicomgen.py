"""Generate valid DICOM files for tests and benchmarks (pydicom + stdlib only).

Files are Secondary Capture images, explicit VR little endian, with a file meta header,
fresh UIDs (pydicom.uid.generate_uid) and random 16-bit MONOCHROME2 pixel data. Orthanc
1.10.1 accepts them over REST (POST /instances) and over C-STORE (storescu).
``seed`` only makes the pixel data reproducible; UIDs are always new, so files from two
calls never collide inside one Orthanc.
"""

from __future__ import annotations

import math
import random
from pathlib import Path

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

# Bytes a file takes beyond its pixel data (meta header + other elements), roughly.
_OVERHEAD = 900


def _study_dataset(patient_id: str, patient_name: str, study_uid: str, study_no: int,
                   study_date: str = "20240101") -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.PatientID = patient_id
    ds.PatientName = patient_name
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "O"
    ds.StudyInstanceUID = study_uid
    ds.StudyID = str(study_no)
    ds.StudyDate = study_date
    ds.StudyTime = "120000"
    ds.AccessionNumber = f"ACC{study_no:06d}"
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = f"Test study {study_no}"
    ds.Modality = "OT"
    ds.ConversionType = "WSD"
    ds.ImageType = ["DERIVED", "SECONDARY"]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    return ds


def _write_instance(template: Dataset, out_dir: Path, series_uid: str, series_no: int,
                    instance_no: int, pixel_bytes: int, rng: random.Random) -> Path:
    """Write one instance of the series described by ``template``; return its path."""
    pixels = max(1, pixel_bytes // 2)
    cols = max(1, math.isqrt(pixels))
    rows = max(1, pixels // cols)
    sop_uid = generate_uid()
    ds = Dataset()
    ds.update(template)
    ds.SeriesInstanceUID = series_uid
    ds.SeriesNumber = series_no
    ds.SeriesDescription = f"Test series {series_no}"
    ds.InstanceNumber = instance_no
    ds.SOPInstanceUID = sop_uid
    ds.Rows = rows
    ds.Columns = cols
    ds.PixelData = rng.randbytes(rows * cols * 2)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta = meta
    path = out_dir / f"{sop_uid}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


def make_study(out_dir: Path | str, patient_id: str, patient_name: str, series: int = 1,
               instances_per_series: int = 2, pixel_bytes: int = 64 * 64 * 2,
               seed: int | None = None, study_date: str = "20240101") -> list[Path]:
    """Write one study of ``series`` x ``instances_per_series`` files into ``out_dir``.

    Each file carries about ``pixel_bytes`` of random pixel data; the study is of ``study_date``
    (YYYYMMDD). Files are named
    ``<SOPInstanceUID>.dcm``; the list is in series then instance order.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    template = _study_dataset(patient_id, patient_name, generate_uid(), rng.randrange(1, 10**6), study_date)
    paths = []
    for s in range(1, series + 1):
        series_uid = generate_uid()
        for i in range(1, instances_per_series + 1):
            paths.append(_write_instance(template, out, series_uid, s, i, pixel_bytes, rng))
    return paths


def make_instances(out_dir: Path | str, count: int,
                   size_range: tuple[int, int] = (10_000, 1_000_000),
                   seed: int = 0) -> list[Path]:
    """Write ``count`` files with sizes drawn uniformly from ``size_range`` (bytes).

    They are spread over a few patients (up to 10), each with 1-2 studies of 1-3 series;
    instances are dealt round-robin over the series. For benchmarks.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    series_list: list[tuple[Dataset, str, int]] = []
    study_no = 0
    for p in range(1, max(1, min(10, count // 50 + 1)) + 1):
        for _study in range(rng.randint(1, 2)):
            study_no += 1
            template = _study_dataset(f"BENCH{p:03d}", f"Bench^Patient{p}", generate_uid(),
                                      study_no)
            for s in range(1, rng.randint(1, 3) + 1):
                series_list.append((template, generate_uid(), s))
    lo, hi = size_range
    paths = []
    for n in range(count):
        template, series_uid, series_no = series_list[n % len(series_list)]
        size = rng.randint(lo, hi)
        paths.append(_write_instance(template, out, series_uid, series_no,
                                     n // len(series_list) + 1, max(2, size - _OVERHEAD), rng))
    return paths
