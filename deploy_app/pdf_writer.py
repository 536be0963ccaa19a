"""DICOM Encapsulated PDF writer: the reader's PDF report as an instance of the source study.

Encapsulated PDF Storage (1.2.840.10008.5.1.4.1.1.104.1) in a new DOC series of the source study: the patient,
general study and patient study modules are copied from the source, the document is titled and coded as a
diagnostic imaging report (LOINC 18748-4), refers to the images it was made from (SourceInstanceSequence),
takes its content date from the source and its UIDs from the study and the algorithm, so that a re-run writes
the same bytes. highdicom 0.28.2 has no encapsulated-document class, so the dataset is built with pydicom; the
module and attribute lists come from highdicom's copy of the standard, so nothing is hand-listed twice.
(The SDK's own PDF writer is not used: it rejects every PDF unless pypdf is installed and does not derive UIDs.)
"""

from __future__ import annotations

import datetime
import logging
import os
from collections.abc import Sequence
from functools import cache
from pathlib import Path

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sr.codedict import codes
from pydicom.uid import EncapsulatedPDFStorage, ExplicitVRLittleEndian

from deploy_app.dicom_output import MANUFACTURER, Algorithm, derive_uid, source_datetime, write_atomic

logger = logging.getLogger(__name__)

PDF_SERIES_NUMBER = 9000  # the report is study-level: one series number for it, away from the SEG/SR offsets
REPORT_CONCEPT = codes.LN.DiagnosticImagingReport  # LN 18748-4 "Diagnostic Imaging Report"
COPIED_MODULES = ("patient", "general-study", "patient-study")
MAX_TITLE = 64  # DocumentTitle is ST, but PACS lists show it like an LO: keep it short


@cache
def _module_attributes(module: str) -> tuple[tuple[str, str], ...]:
    """(keyword, type) of a module's top-level attributes, from highdicom's table of the standard (the pinned
    highdicom's own cached parse: the SEG and SR writers read the same table, a 0.7 s parse per copy)."""
    from highdicom._standard_utils import get_module_attribute_map

    return tuple((a["keyword"], a["type"]) for a in get_module_attribute_map()[module] if not a["path"])


def pdf_uids(study_uid: str, algorithm: Algorithm) -> tuple[str, str]:
    """(series UID, SOP instance UID) of the report: fixed by the study and the algorithm that made it."""
    series = derive_uid(study_uid, algorithm.name, algorithm.version, "pdf")
    return series, derive_uid(series, "instance", "1")


def _source_items(source: Dataset, referenced_series: Sequence[tuple[str, Sequence[Dataset]]]) -> list[Dataset]:
    refs: list[Dataset] = []
    groups = referenced_series or [(source.SeriesInstanceUID, [source])]
    for series_uid, datasets in groups:
        if not datasets:
            raise ValueError(f"referenced series {series_uid} has no datasets")
        for ds in datasets:
            if ds.get("SeriesInstanceUID") != series_uid:
                raise ValueError(
                    f"a referenced image of series {ds.get('SeriesInstanceUID')} was listed under {series_uid}"
                )
            if ds.get("StudyInstanceUID") != source.StudyInstanceUID:
                raise ValueError("a referenced image belongs to another study than the source")
            item = Dataset()
            item.ReferencedSOPClassUID = ds.SOPClassUID
            item.ReferencedSOPInstanceUID = ds.SOPInstanceUID
            refs.append(item)
    return refs


def build_pdf_dataset(
    source: Dataset,
    pdf_bytes: bytes,
    *,
    title: str,
    algorithm: Algorithm,
    referenced_series: Sequence[tuple[str, Sequence[Dataset]]] = (),
    series_number: int = PDF_SERIES_NUMBER,
    content_datetime: datetime.datetime | None = None,
) -> Dataset:
    """The Encapsulated PDF dataset (see :func:`write_pdf`), not written."""
    if not isinstance(pdf_bytes, bytes | bytearray) or not bytes(pdf_bytes[:5]) == b"%PDF-":
        raise ValueError("pdf_bytes is not a PDF document (it does not start with %PDF-)")
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID"):
        if keyword not in source:
            raise ValueError(f"the source image has no {keyword}")
    title = (title or "").strip()
    if not title or len(title) > MAX_TITLE:
        raise ValueError(f"title must be 1-{MAX_TITLE} characters, got {title!r}")
    when = content_datetime or source_datetime(source)
    series_uid, sop_uid = pdf_uids(source.StudyInstanceUID, algorithm)

    ds = Dataset()
    if "SpecificCharacterSet" in source:
        ds.SpecificCharacterSet = source.SpecificCharacterSet
    for module in COPIED_MODULES:  # patient, study and patient-study modules as the source has them
        for keyword, kind in _module_attributes(module):
            if keyword in source:
                ds[keyword] = source[keyword]
            elif kind == "2" and module != "patient-study":  # Type 2: present, empty when unknown
                setattr(ds, keyword, None)

    ds.SOPClassUID = EncapsulatedPDFStorage
    ds.SOPInstanceUID = sop_uid
    ds.Modality = "DOC"
    ds.SeriesInstanceUID = series_uid
    ds.SeriesNumber = int(series_number)
    ds.SeriesDate = when.strftime("%Y%m%d")
    ds.SeriesTime = when.strftime("%H%M%S")
    ds.SeriesDescription = f"{MANUFACTURER} report (not for diagnostic use)"
    ds.Manufacturer = MANUFACTURER
    ds.ManufacturerModelName = algorithm.name
    ds.SoftwareVersions = algorithm.version
    ds.ConversionType = "WSD"  # workstation: the document was generated, not scanned
    ds.InstanceNumber = 1
    ds.ContentDate = when.strftime("%Y%m%d")
    ds.ContentTime = when.strftime("%H%M%S")
    ds.AcquisitionDateTime = None  # Type 2: the document was not acquired
    ds.BurnedInAnnotation = "YES"  # it shows patient name and ID
    concept = Dataset()
    concept.CodeValue = REPORT_CONCEPT.value
    concept.CodingSchemeDesignator = REPORT_CONCEPT.scheme_designator
    concept.CodeMeaning = REPORT_CONCEPT.meaning
    ds.ConceptNameCodeSequence = [concept]
    ds.DocumentTitle = title
    ds.SourceInstanceSequence = _source_items(source, referenced_series)
    ds.MIMETypeOfEncapsulatedDocument = "application/pdf"
    data = bytes(pdf_bytes)
    ds.EncapsulatedDocumentLength = len(data)  # the length without the padding byte
    ds.EncapsulatedDocument = data + b"\x00" * (len(data) % 2)  # OB values have even length (PS3.5 7.1)

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta = meta
    return ds


def write_pdf(
    source: Dataset,
    pdf_bytes: bytes,
    out_path: str | os.PathLike,
    *,
    title: str,
    algorithm: Algorithm,
    referenced_series: Sequence[tuple[str, Sequence[Dataset]]] = (),
    series_number: int = PDF_SERIES_NUMBER,
    content_datetime: datetime.datetime | None = None,
) -> Path:
    """Write ``pdf_bytes`` as a DICOM Encapsulated PDF into ``out_path`` (atomically); return the path.

    Args:
        source: one image of the study (its patient and study modules are copied; its series and, without
            ``content_datetime``, its date give the content date).
        pdf_bytes: the PDF, e.g. from :func:`deploy_app.pdf_report.render_report_pdf`.
        title: DocumentTitle, e.g. "CalciMap calcium report".
        algorithm: the app's name and version: ManufacturerModelName / SoftwareVersions, and part of the UIDs.
        referenced_series: (series UID, datasets) of every series the report was made from; each image is
            listed in SourceInstanceSequence. Default: the source image itself.
        series_number: of the new DOC series.
        content_datetime: ContentDate/Time and SeriesDate/Time; default the source series' date and time.

    UIDs derive from the study UID and the algorithm (:func:`pdf_uids`): a re-run replaces the report instead of
    adding a second one. Raises ValueError for input that does not fit (not a PDF, missing UIDs, images of
    another study, an empty or long title).
    """
    ds = build_pdf_dataset(
        source,
        pdf_bytes,
        title=title,
        algorithm=algorithm,
        referenced_series=referenced_series,
        series_number=series_number,
        content_datetime=content_datetime,
    )
    path = write_atomic(ds, Path(out_path))
    logger.info("wrote encapsulated PDF %s (%d bytes of PDF) to %s", ds.SOPInstanceUID, len(pdf_bytes), path)
    return path
