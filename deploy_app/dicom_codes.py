"""Coded concepts of the SEG and SR (DESIGN.md, "Codes") and the project's one private coding scheme.

Standard codes are taken from pydicom's concept tables (their meanings as listed there). What no standard
code fits (the four ICA segments, the risk categories, the Agatston-equivalent flag) uses the private scheme
``99CALCIMAP``, declared in each object's CodingSchemeIdentificationSequence; never a wrong standard code.
"""

from __future__ import annotations

from highdicom.coding_schemes import CodingSchemeIdentificationItem
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

PRIVATE_SCHEME = "99CALCIMAP"
PRIVATE_SCHEME_ITEM = CodingSchemeIdentificationItem(
    designator=PRIVATE_SCHEME,
    name="CalciMap private codes",
    version="1",
    responsible_organization="CalciMap project",
)


def private(value: str, meaning: str) -> Code:
    return Code(value, PRIVATE_SCHEME, meaning)


# Segments (SEG) and findings (SR)
CALCIFIED_PLAQUE = codes.SCT.CalcifiedAtheromatousPlaque  # SCT 29483008, segment type / finding type
ABNORMAL_STRUCTURE = codes.SCT.MorphologicallyAbnormalStructure  # SCT 49755003, segment category
LEFT_MAIN = Code("3227004", "SCT", "Left Main Coronary Artery")
LAD = Code("59438005", "SCT", "Left Anterior Descending Coronary Artery")
LCX = Code("57396003", "SCT", "Circumflex Coronary Artery")
RCA = Code("13647002", "SCT", "Right Coronary Artery")
CORONARY_ARTERY = codes.SCT.CoronaryArtery  # SCT 41801008: finding site of the coronary total
ICA = codes.SCT.InternalCarotidArtery  # SCT 86117002
RIGHT = codes.SCT.Right  # SCT 24028007
LEFT = codes.SCT.Left  # SCT 7771000
ICA_SEGMENTS = {
    "cervical": private("ICA-CERVICAL", "Cervical segment of internal carotid artery"),
    "petrous": private("ICA-PETROUS", "Petrous segment of internal carotid artery"),
    "cavernous": private("ICA-CAVERNOUS", "Cavernous segment of internal carotid artery"),
    "supraclinoid": private("ICA-SUPRACLINOID", "Supraclinoid segment of internal carotid artery"),
}

# Measurements (SR)
CORONARY_CALCIUM_SCORE = codes.SCT.CoronaryArteryCalciumScore  # SCT 450360000, coronary only
CALCIUM_SCORE = codes.DCM.CalciumScore  # DCM 112058, ICA and any non-coronary site
AGATSTON_METHOD = codes.DCM.AgatstonScoringMethod  # DCM 112055
VOLUME_METHOD = codes.DCM.VolumeScoringMethod  # DCM 112056
MASS_METHOD = codes.DCM.MassScoringMethod  # DCM 112057
CALCIUM_VOLUME = codes.DCM.CalciumVolume  # DCM 122660
CALCIUM_MASS = codes.DCM.CalciumMass  # DCM 122661
# UCUM units. The Agatston score is a dimensionless number: UCUM "1" (the concept name says what it counts).
UNIT_NONE = Code("1", "UCUM", "no units")
UNIT_MM3 = Code("mm3", "UCUM", "cubic millimeter")
UNIT_MG = Code("mg", "UCUM", "milligram")

# Procedure reported (SR)
# TID 1500 "Procedure reported" is DCID 100; pixelmed rejects codes outside it (SCT 426005005 "Cardiac CT for
# calcium scoring" included), so both sets report the CID 100 concept below.
CT_UNSPECIFIED = Code("25045-6", "LN", "CT unspecified body region")

# Qualitative evaluations (SR): coded only, so the private scheme
RISK_CATEGORY = private("CAC-RISK", "Coronary artery calcium risk category")
RISK_CATEGORY_VALUES = {
    "0": private("CAC-RISK-0", "Risk category 0: Agatston score 0"),
    "I": private("CAC-RISK-I", "Risk category I: Agatston score above 0 up to 10"),
    "II": private("CAC-RISK-II", "Risk category II: Agatston score above 10 up to 100"),
    "III": private("CAC-RISK-III", "Risk category III: Agatston score above 100 up to 400"),
    "IV": private("CAC-RISK-IV", "Risk category IV: Agatston score above 400"),
}
AGATSTON_EQUIVALENT = private("AGATSTON-EQUIV", "Agatston-equivalent score (non-standard acquisition)")
YES = codes.SCT.Yes  # SCT 373066001
NO = codes.SCT.No  # SCT 373067005

# Quality checks before scoring (deploy_app/quality.py): each finding is a coded evaluation in the SR's total group,
# the check's code as concept and QUALITY_PASSED / QUALITY_FAILED as value (sr_writer._quality_evaluations). An SR
# is written for a scored path only; an unscored one's reasons are in the PDF and results.json.
QUALITY_FINDINGS = {
    "acquisition": private("QC-ACQUISITION", "Acquisition within calcium score definition"),
    "tilt": private("QC-TILT", "Gantry tilt within limit"),
    "geometry": private("QC-GEOMETRY", "Complete and regular image volume"),
    "contrast": private("QC-CONTRAST", "Non-contrast series"),
    "coverage": private("QC-COVERAGE", "Anatomic coverage complete"),
}
QUALITY_PASSED = private("QC-PASSED", "Quality check passed")
QUALITY_FAILED = private("QC-FAILED", "Quality check failed")
