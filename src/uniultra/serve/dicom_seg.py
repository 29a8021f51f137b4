"""Label map + names -> a DICOM Segmentation (SEG) object that references its source DICOM instance.

Written with highdicom (the `serve` extra). One segment per label value 1..N, binary, algorithm type
SEMIAUTOMATIC (a person prompted the model). The source dataset is completed on a copy where it
lacks attributes a SEG must carry over (patient and study type-2 elements are set empty; a
missing study or series UID is generated), so exported test or anonymised files still work.

highdicom writes a multi-frame SEG only when the source has a coordinate system (plane positions):
a typical ultrasound cine loop has none, so for those the SEG cannot be written (`SegError`) and
the page offers PNG label maps instead.
"""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np

from uniultra import __version__

# Type-2 attributes of the patient and study modules that the SEG copies from its source.
_TYPE2 = ("PatientID", "PatientName", "PatientBirthDate", "PatientSex", "StudyID", "StudyDate", "StudyTime",
          "ReferringPhysicianName", "AccessionNumber")


class SegError(ValueError):
    """The SEG cannot be written for this source or label map (the message says why)."""


def write_seg(source_dicom: bytes, labelmap: np.ndarray, names: Sequence[str]) -> bytes:
    """DICOM SEG bytes for an HxW label map (0 = background, k = segment `names[k-1]`)."""
    import highdicom as hd
    import pydicom

    source = _complete(pydicom.dcmread(io.BytesIO(source_dicom)))
    _check(source, labelmap, names)
    try:
        seg = hd.seg.Segmentation(
            source_images=[source], pixel_array=labelmap.astype(np.uint8),
            segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
            segment_descriptions=_descriptions(names), series_instance_uid=hd.UID(), series_number=1,
            sop_instance_uid=hd.UID(), instance_number=1, manufacturer="UniUltra",
            manufacturer_model_name="uniultra serve", software_versions=__version__, device_serial_number="none",
            series_description="UniUltra segmentation", omit_empty_frames=False)
    except (ValueError, TypeError, AttributeError) as exc:  # highdicom's checks of the source
        raise SegError(f"cannot write a DICOM SEG for this image: {exc}") from exc
    buffer = io.BytesIO()
    seg.save_as(buffer)
    return buffer.getvalue()


def _complete(ds):
    """The source with what a SEG copies from it present (on the parsed copy, never the upload)."""
    import pydicom

    for keyword in _TYPE2:
        if keyword not in ds:
            setattr(ds, keyword, "")
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID"):
        if keyword not in ds:
            setattr(ds, keyword, pydicom.uid.generate_uid())
    if "Modality" not in ds:
        ds.Modality = "US"
    if "PixelSpacing" in ds and "SliceThickness" not in ds:
        # highdicom copies PixelSpacing into a Pixel Measures item, which readers (highdicom's own)
        # refuse without a slice thickness, which a 2-D ultrasound image has not: the SEG is
        # pixel-aligned with its source, whose spacing stays the reference.
        del ds.PixelSpacing
    return ds


def _check(source, labelmap: np.ndarray, names: Sequence[str]) -> None:
    if int(getattr(source, "NumberOfFrames", 1) or 1) > 1:
        raise SegError("DICOM SEG export is for single-frame DICOM images: this one is a multi-frame (cine) "
                       "loop without plane positions; download the PNG label maps instead")
    if labelmap.shape != (int(source.Rows), int(source.Columns)):
        raise SegError(f"label map of shape {labelmap.shape} does not match the image "
                       f"({int(source.Rows)} x {int(source.Columns)} rows x columns)")
    if not names:
        raise SegError("no labels: name at least one object")
    if int(labelmap.max(initial=0)) > len(names):
        raise SegError(f"label map has value {int(labelmap.max())} but only {len(names)} label names")


def _descriptions(names: Sequence[str]):
    import highdicom as hd
    from pydicom.sr.codedict import codes

    algorithm = hd.AlgorithmIdentificationSequence(name="UniUltra", version=__version__,
                                                   family=codes.DCM.ArtificialIntelligence)
    return [hd.seg.SegmentDescription(
        segment_number=number, segment_label=(name or f"object {number}")[:64],
        segmented_property_category=codes.SCT.Tissue, segmented_property_type=codes.SCT.Tissue,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.SEMIAUTOMATIC, algorithm_identification=algorithm)
        for number, name in enumerate(names, start=1)]
