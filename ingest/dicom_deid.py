"""DICOM PS3.15 Annex E Basic Application Level Confidentiality Profile, with the
Retain Longitudinal Temporal Information with Modified Dates option.

Rules, applied recursively through every sequence:
- private tags are removed (unless the spec keeps them);
- the profile's attributes are removed (X) or emptied (Z/D where a dummy would carry no
  information); every PN (person name) anywhere is emptied, whatever its tag;
- every UI except class and transfer-syntax UIDs becomes a keyed 2.25 pseudonym (U);
- every DA/DT value is shifted by the patient's keyed offset; PatientID becomes the pseudonym.
Afterwards PatientIdentityRemoved = YES and DeidentificationMethod(CodeSequence) say so.
Only a whitelist of technical attributes of the cleaned dataset is ever stored (`SAFE_META`).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from .privacy import Keyring

METHOD = "medfm PS3.15 Annex E basic profile; retain longitudinal modified dates; keyed HMAC"
# DCM codes (CID 7050): basic profile; retain longitudinal temporal info, modified dates.
METHOD_CODES = [
    ("113100", "Basic Application Confidentiality Profile"),
    ("113107", "Retain Longitudinal Temporal Information Modified Dates Option"),
]

REMOVE = frozenset(
    """AccessionNumber AcquisitionComments AcquisitionDeviceProcessingDescription
    AcquisitionProtocolDescription ActualHumanPerformersSequence AdditionalPatientHistory
    AddressTrial AdmissionID AdmittingDiagnosesCodeSequence AdmittingDiagnosesDescription
    Allergies Arbitrary AuthorObserverSequence BranchOfService CassetteID
    CommentsOnThePerformedProcedureStep ConfidentialityConstraintOnPatientDataDescription
    ContentCreatorIdentificationCodeSequence ContributionDescription CountryOfResidence
    CurrentPatientLocation CurveData CustodialOrganizationSequence DataSetTrailingPadding
    DerivationDescription DetectorID DeviceSerialNumber DeviceUID DigitalSignaturesSequence
    DischargeDiagnosisDescription DistributionAddress DistributionName
    FrameComments GantryID GeneratorID HumanPerformerName HumanPerformerOrganization
    IconImageSequence IdentifyingComments ImageComments ImagePresentationComments
    ImagingServiceRequestComments Impressions InstitutionAddress InstitutionName
    InstitutionalDepartmentName InsurancePlanIdentification
    IntendedRecipientsOfResultsIdentificationSequence
    InterpretationApproverSequence InterpretationAuthor InterpretationDiagnosisDescription
    InterpretationIDIssuer InterpretationRecorder InterpretationText InterpretationTranscriber
    IssuerOfAdmissionID IssuerOfPatientID MedicalAlerts MedicalRecordLocator MilitaryRank
    ModifiedAttributesSequence ModifiedImageDescription ModifyingDeviceID
    NameOfPhysiciansReadingStudy
    NamesOfIntendedRecipientsOfResults Occupation OperatorIdentificationSequence OperatorsName
    OriginalAttributesSequence OrderCallbackPhoneNumber OrderEnteredBy OrderEntererLocation
    OtherPatientIDs OtherPatientIDsSequence OtherPatientNames OverlayComments OverlayData
    ParticipantSequence PatientAddress PatientAge PatientBirthName PatientBirthTime
    PatientComments PatientInstitutionResidence PatientInsurancePlanCodeSequence
    PatientMotherBirthName PatientPrimaryLanguageCodeSequence PatientReligiousPreference
    PatientSexNeutered PatientSize PatientState PatientTelecomInformation PatientTelephoneNumbers
    PatientTransportArrangements PatientWeight PerformedLocation PerformedProcedureStepDescription
    PerformedProcedureStepID PerformingPhysicianIdentificationSequence PerformingPhysicianName
    PersonAddress PersonIdentificationCodeSequence PersonName PersonTelephoneNumbers
    PhysicianApprovingInterpretation PhysiciansOfRecord PhysiciansOfRecordIdentificationSequence
    PhysiciansReadingStudyIdentificationSequence PlateID PreMedication PregnancyStatus
    ProtocolName ReasonForImagingServiceRequest ReasonForStudy ReferencedDigitalSignatureSequence
    ReferencedPatientAliasSequence ReferencedPatientSequence ReferencedStudySequence
    ReferringPhysicianAddress ReferringPhysicianIdentificationSequence ReferringPhysicianName
    ReferringPhysicianTelephoneNumbers RegionOfResidence RequestAttributesSequence
    RequestedContrastAgent RequestedProcedureComments RequestedProcedureDescription
    RequestedProcedureID RequestedProcedureLocation RequestingPhysician RequestingService
    ResponsibleOrganization ResponsiblePerson ResultsComments ResultsDistributionListSequence
    ResultsIDIssuer ScheduledHumanPerformersSequence ScheduledPatientInstitutionResidence
    ScheduledPerformingPhysicianIdentificationSequence ScheduledPerformingPhysicianName
    ScheduledProcedureStepDescription ScheduledProcedureStepLocation SeriesDescription
    ServiceEpisodeDescription ServiceEpisodeID SmokingStatus SourceImageSequence
    SpecialNeeds StationName StudyComments StudyDescription StudyIDIssuer TextComments
    TextString TopicAuthor TopicKeywords TopicSubject TopicTitle
    VerifyingObserverIdentificationCodeSequence
    VerifyingObserverName VerifyingObserverSequence VerifyingOrganization VisitComments
    EthnicGroup PatientBirthDate PatientSex StudyID RequestedProcedureCodeSequence
    ProcedureCodeSequence PerformedProtocolCodeSequence AcquisitionDeviceProcessingCode""".split()
)
# Class and syntax UIDs identify kinds of objects, not patients: they stay.
KEEP_UIDS = frozenset(
    """SOPClassUID MediaStorageSOPClassUID TransferSyntaxUID ReferencedSOPClassUID
    ImplementationClassUID CodingSchemeUID ContextGroupExtensionCreatorUID
    RelatedGeneralSOPClassUID OriginalSpecializedSOPClassUID""".split()
)
# The only attributes copied into sample metadata, after the profile ran.
SAFE_META = (
    "Modality", "BodyPartExamined", "Manufacturer", "ManufacturerModelName",
    "MagneticFieldStrength", "KVP", "SliceThickness", "PhotometricInterpretation",
    "BitsStored", "ViewPosition", "ImageType", "ConvolutionKernel", "RepetitionTime",
    "EchoTime", "FlipAngle", "ContrastBolusAgent", "StudyDate", "SeriesDate",
    "RescaleSlope", "RescaleIntercept", "RescaleType", "WindowCenter", "WindowWidth",
    "VOILUTFunction",
)  # fmt: skip


def deidentify(ds: Dataset, keyring: Keyring, raw_patient_id: str, keep_private: bool) -> None:
    """Apply the profile in place (recursively) and record that it was applied."""
    if not keep_private:
        ds.remove_private_tags()
    _clean(ds, keyring, raw_patient_id)
    ds.PatientID = keyring.patient(raw_patient_id)
    ds.PatientName = ""
    ds.PatientIdentityRemoved = "YES"
    ds.DeidentificationMethod = METHOD
    codes = []
    for value, meaning in METHOD_CODES:
        item = Dataset()
        item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, "DCM", meaning
        codes.append(item)
    ds.DeidentificationMethodCodeSequence = Sequence(codes)


def _clean(ds: Dataset, keyring: Keyring, pid: str) -> None:
    for elem in list(ds):
        kw = elem.keyword
        if kw in REMOVE:
            del ds[elem.tag]
        elif elem.VR == "SQ":
            for item in elem.value or []:
                _clean(item, keyring, pid)
        elif elem.VR == "PN":
            elem.value = ""
        elif elem.VR == "UI" and kw not in KEEP_UIDS and elem.value:
            values = elem.value if elem.VM > 1 else [elem.value]
            new = [keyring.dicom_uid(str(v)) for v in values]
            elem.value = new if elem.VM > 1 else new[0]
        elif elem.VR in ("DA", "DT") and elem.value:
            values = elem.value if elem.VM > 1 else [elem.value]
            new = [keyring.shift_date(pid, str(v)) for v in values]
            elem.value = new if elem.VM > 1 else new[0]


def _lut_items(seq: Sequence) -> list[dict[str, list[int]]]:
    """A VOI LUT Sequence's tables (descriptor + data, no free-text explanation)."""
    items = []
    for item in seq:
        desc = [int(v) for v in item.get("LUTDescriptor") or []]
        data = item.get("LUTData")
        if len(desc) != 3 or data is None:
            continue
        if isinstance(data, bytes):  # OW: 16-bit words unless the table is one byte per entry
            n = desc[0] or 65536
            data = np.frombuffer(data, "<u2" if len(data) >= 2 * n else "u1")[:n]
        items.append({"LUTDescriptor": desc, "LUTData": [int(v) for v in data]})
    return items


def safe_meta(ds: Dataset) -> dict[str, Any]:
    """Whitelisted technical attributes of a de-identified dataset, as plain JSON values,
    and the VOI LUT tables a viewer would apply (kept so the VOI transform can be redone)."""
    out: dict[str, Any] = {}
    if ds.get("VOILUTSequence"):
        out["VOILUTSequence"] = _lut_items(ds.VOILUTSequence)
    for kw in SAFE_META:
        value = ds.get(kw)
        if value is None or value == "":
            continue
        if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
            out[kw] = [str(v) for v in value]
        elif isinstance(value, (int, float)):
            out[kw] = value
        else:
            out[kw] = str(value)
    return out
