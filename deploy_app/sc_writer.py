"""Secondary Capture series: the scored source slices with the calcium overlay, for PACS viewers that show
neither SEG nor SR (optional: ``--secondary-capture`` or ``CALCIMAP_SECONDARY_CAPTURE=1``).

One RGB Secondary Capture image per source slice from the first to the last slice holding scored calcium (the
contiguous slab, so that the reader scrolls through the calcium with its context, as in the SEG), at the source
slice's size and pixel spacing, each referencing its source slice. A calcium-free series gets one image, the
middle slice, marked "No calcium detected". The overlay is the PDF's (:mod:`deploy_app.overlay`): the path's
window, the voxels the score counts in their segment colours. Burned into each image: the app and path, the
source series and image number, the window, the segments present in the slice in their colours, and "not for
diagnostic use" (hence BurnedInAnnotation YES). Uncompressed, as the source is: 0.75 MB an image at 512 x 512.
"""

from __future__ import annotations

import datetime
import functools
import logging
import os
import re
from collections.abc import Iterator, Sequence
from pathlib import Path

import highdicom as hd
import matplotlib
import numpy as np
from PIL import Image, ImageDraw, ImageFont
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import ExplicitVRLittleEndian

from deploy_app.dicom_output import (
    MANUFACTURER,
    Algorithm,
    check_source_series,
    derive_uid,
    make_deterministic,
    source_datetime,
    write_atomic,
)
from deploy_app.overlay import WINDOWS, labelled_slices, orientation_label, overlay_rgb, scored_voxels
from deploy_app.segment_sets import SegmentSet, default_algorithm, get_segment_set

logger = logging.getLogger(__name__)

SC_SERIES_NUMBER_OFFSET = 3000  # SC series number = source series number + this (SEG +1000, SR +2000)
SC_FILE_PATTERN = re.compile(r"^(coronary|ica)_sc_\d{4}\.dcm$")
SC_TITLES = {"coronary": "coronary calcium", "ica": "ICA calcium"}
MIN_SIZE_PX = 512  # smaller slices are enlarged by a whole factor (pixel spacing divided by it) to hold the text
NOT_FOR_DIAGNOSTIC_USE = "Research software \u2014 not for diagnostic use"
_STUDY_ATTRIBUTES_COPIED = ("StudyDescription", "PatientAge", "PatientSize", "PatientWeight")
_FONT_DIR = Path(matplotlib.get_data_path()) / "fonts" / "ttf"  # DejaVu Sans, shipped with matplotlib


def sc_file_name(path: str, n: int) -> str:
    return f"{path}_sc_{n:04d}.dcm"


def sc_series_uid(source_series_uid: str, segment_set: str, algorithm: Algorithm) -> str:
    """The SC series UID: fixed by the source series, the segment set and the algorithm (a re-run replaces)."""
    return derive_uid(source_series_uid, "SC", segment_set, algorithm.name, algorithm.version)


def sc_slices(scored: np.ndarray) -> list[int]:
    """Source slice indices the series shows: the slab holding scored calcium, else the middle slice."""
    ks = labelled_slices(scored)
    return list(range(int(ks[0]), int(ks[-1]) + 1)) if ks.size else [scored.shape[0] // 2]


@functools.lru_cache(maxsize=8)
def _font(size: int, bold: bool = False) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(str(_FONT_DIR / ("DejaVuSans-Bold.ttf" if bold else "DejaVuSans.ttf")), size)


def _burn_in(
    rgb: np.ndarray, top_left: Sequence[str], segments: Sequence[tuple[str, tuple[int, int, int]]]
) -> np.ndarray:
    """Text onto the image: ``top_left`` lines (the first bold), the segments present at the top right in their
    colours, the disclaimer at the bottom; white (or the colour) with a black outline, readable on any pixel."""
    image = Image.fromarray(rgb)
    draw = ImageDraw.Draw(image)
    size = max(9, round(image.height / 40))
    margin, step = max(3, size // 2), round(size * 1.3)
    outline = {"stroke_width": max(1, size // 10), "stroke_fill": (0, 0, 0)}
    for n, line in enumerate(top_left):
        draw.text((margin, margin + n * step), line, fill=(255, 255, 255), font=_font(size, n == 0), **outline)
    for n, (label, colour) in enumerate(segments, start=1):  # below the title's row, which may be long
        draw.text(
            (image.width - margin, margin + n * step),
            label,
            fill=colour,
            font=_font(size, True),
            anchor="ra",
            **outline,
        )
    draw.text(
        (margin, image.height - margin),
        NOT_FOR_DIAGNOSTIC_USE,
        fill=(255, 255, 255),
        font=_font(size),
        anchor="ld",
        **outline,
    )
    return np.asarray(image)


def build_sc_series(
    source_datasets: Sequence[Dataset],
    hu_kji: np.ndarray,
    label_kji: np.ndarray,
    segment_set: str | SegmentSet,
    *,
    app_name: str,
    algorithm: Algorithm | None = None,
    series_number: int | None = None,
    content_datetime: datetime.datetime | None = None,
) -> Iterator[hd.sc.SCImage]:
    """The SC images one after the other (see the module docstring and :func:`write_sc_series`), not written."""
    seg_set = get_segment_set(segment_set)
    frames = check_source_series(source_datasets)
    hu, labels = np.asarray(hu_kji), np.asarray(label_kji)
    source = source_datasets[0]
    expected = (len(frames), int(source.Rows), int(source.Columns))
    if hu.shape != expected or labels.shape != expected:
        raise ValueError(f"hu {hu.shape} and labels {labels.shape} must match the source series {expected} [k, j, i]")
    if labels.size and (labels.min() < 0 or labels.max() > len(seg_set.segments)):
        raise ValueError(f"label values outside the {seg_set.name} segment set's 0..{len(seg_set.segments)}")
    algorithm = algorithm or default_algorithm(seg_set)
    series_uid = sc_series_uid(source.SeriesInstanceUID, seg_set.name, algorithm)
    when = content_datetime or source_datetime(source)
    if series_number is None:
        series_number = int(source.get("SeriesNumber") or 0) + SC_SERIES_NUMBER_OFFSET
    colours = {s.number: s.rgb for s in seg_set.segments}
    level, width, _ = WINDOWS[seg_set.name]
    scored = scored_voxels(hu, labels)
    zoom = max(1, -(-MIN_SIZE_PX // max(hu.shape[1:])))
    for n, k in enumerate(sc_slices(scored), start=1):
        frame = frames[k]
        ref = source_datasets[frame.dataset_index]
        image_name = f"image {ref.get('InstanceNumber', k + 1)}"
        if frame.frame_index is not None:
            image_name += f" frame {frame.frame_index + 1}"
        present = [s for s in seg_set.segments if (scored[k] == s.number).any()]
        orientation = [orientation_label(frame.orientation[n : n + 3]) for n in (0, 3)]
        lines = [
            f"{app_name}: {SC_TITLES[seg_set.name]}",
            f"Series {source.get('SeriesNumber', '?')} {image_name}",
            f"W {width:g} / L {level:g}",
        ]
        if not scored.any():
            lines.append("No calcium detected")
        rgb = overlay_rgb(hu[k], scored[k], colours, seg_set.name).repeat(zoom, axis=0).repeat(zoom, axis=1)
        rgb = _burn_in(rgb, lines, [(s.label, s.rgb) for s in present])
        image = hd.sc.SCImage.from_ref_dataset(
            ref_dataset=ref,
            pixel_array=rgb,
            photometric_interpretation=hd.PhotometricInterpretationValues.RGB,
            bits_allocated=8,
            coordinate_system=hd.CoordinateSystemNames.PATIENT,
            series_instance_uid=series_uid,
            series_number=series_number,
            sop_instance_uid=derive_uid(series_uid, "instance", str(k)),
            instance_number=n,
            manufacturer=MANUFACTURER,
            pixel_spacing=tuple(float(v) / zoom for v in frame.pixel_spacing),
            patient_orientation=tuple(label[0] for label in orientation),  # highdicom takes one letter a value
            transfer_syntax_uid=ExplicitVRLittleEndian,
        )
        image.PatientOrientation = orientation  # with refinements, e.g. "PH" for a tilted head's columns
        image.ImageType = ["DERIVED", "SECONDARY"]
        image.BurnedInAnnotation = "YES"
        for keyword in _STUDY_ATTRIBUTES_COPIED:  # from_ref_dataset copies the patient and the study's UID and IDs
            if keyword in ref:
                setattr(image, keyword, ref[keyword].value)
        # lets a reader (and dciodvfy) see that no series Laterality is due; a multi-frame source may name its
        # anatomy only as a code in its functional groups (Frame Anatomy)
        image.BodyPartExamined = ref.get("BodyPartExamined") or seg_set.body_part
        image.SeriesDescription = f"CalciMap {seg_set.name} calcium overlay (not for diagnostic use)"[:64]
        image.SeriesDate = image.ContentDate = when.strftime("%Y%m%d")
        image.SeriesTime = image.ContentTime = when.strftime("%H%M%S")
        image.ManufacturerModelName = algorithm.name
        image.SoftwareVersions = algorithm.version
        image.DerivationDescription = (
            f"{seg_set.name} calcium by {algorithm.name} {algorithm.version} over the source slice"
        )[:1024]
        source_item = Dataset()
        source_item.ReferencedSOPClassUID = ref.SOPClassUID
        source_item.ReferencedSOPInstanceUID = ref.SOPInstanceUID
        if frame.frame_index is not None:
            source_item.ReferencedFrameNumber = frame.frame_index + 1
        source_item.PurposeOfReferenceCodeSequence = [
            hd.sr.CodedConcept.from_code(codes.DCM.SourceImageForImageProcessingOperation)
        ]
        image.SourceImageSequence = [source_item]
        for keyword in ("DateOfSecondaryCapture", "TimeOfSecondaryCapture"):  # Type 3, the wall clock's
            delattr(image, keyword)
        make_deterministic(image, when)
        yield image


def write_sc_series(
    source_datasets: Sequence[Dataset],
    hu_kji: np.ndarray,
    label_kji: np.ndarray,
    segment_set: str | SegmentSet,
    out_dir: str | os.PathLike,
    *,
    app_name: str,
    algorithm: Algorithm | None = None,
    series_number: int | None = None,
    content_datetime: datetime.datetime | None = None,
) -> tuple[str, list[Path]]:
    """Write the SC series of ``label_kji`` over ``hu_kji`` as ``<set>_sc_0001.dcm``... into ``out_dir``.

    Args:
        source_datasets: the source CT series, single-frame slices in slice order or one multi-frame CT object;
            the images join its study.
        hu_kji: the source series in HU [k, j, i]; label_kji: segment numbers on the same grid (0 = none).
        segment_set: "coronary" or "ica" (as for ``write_seg``); it names the files and picks window and colours.
        app_name: the application and version burned into each image.
        algorithm, series_number (default source SeriesNumber + 3000), content_datetime: as for ``write_seg``.

    Returns the series UID and the written files, in instance order. Raises ValueError for input that does not
    fit (shape, label values, unordered or mixed series).
    """
    seg_set = get_segment_set(segment_set)
    series_uid, paths = "", []
    for n, image in enumerate(
        build_sc_series(
            source_datasets,
            hu_kji,
            label_kji,
            seg_set,
            app_name=app_name,
            algorithm=algorithm,
            series_number=series_number,
            content_datetime=content_datetime,
        ),
        start=1,
    ):
        series_uid = image.SeriesInstanceUID
        paths.append(write_atomic(image, Path(out_dir) / sc_file_name(seg_set.name, n)))
    logger.info("wrote %d Secondary Capture images of %s calcium to %s", len(paths), seg_set.name, out_dir)
    return series_uid, paths
