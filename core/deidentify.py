"""De-identification by DICOM PS3.15 Annex E, Basic Application Level Confidentiality Profile.

Everything the app exports goes through this module unless the user turns
de-identification off for that one export:

* DICOM datasets: the Table E.1-1 actions (D, Z, X, K, C, U), applied
  recursively into sequences; private tags removed; UIDs remapped with an HMAC
  of a per-export secret to ``2.25.<int>`` UIDs, so one export is internally
  consistent (series, study, frame of reference and references between files
  stay linked) and two exports cannot be linked to each other or back to the
  original; preamble zeroed; file meta rewritten; Patient Identity Removed,
  De-identification Method and its code sequence (113100) set.
* Optional date shift by N days ("Retain Longitudinal Temporal Information
  with Modified Dates Option"): dates move by the same number of days, so
  intervals survive; times of day are kept.
* Free text of other formats (NIfTI ``descrip``/``aux_file``, NRRD/MHA
  headers, PNG metadata, file names): :func:`safe_description` keeps only
  words from a technical vocabulary and short numbers.
* The header view: :func:`is_identifying_element` and :func:`masked`.

Burned-in annotation cannot be removed from pixels here; :func:`burned_in_annotation_reason`
says when the pixels may show text, and callers block DICOM and PNG export
unless the user confirms.

References
----------
DICOM PS3.15 2024b, Annex E, Table E.1-1 "Application Level Confidentiality
Profile Attributes"; PS3.16 CID 7050 "De-identification Method" (113100,
113107); PS3.3 C.7.6.1.1.4 Burned In Annotation.
"""

from __future__ import annotations

import copy
import datetime as dt
import hashlib
import hmac
import io
import re
import secrets
import uuid
import zipfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import pydicom
from pydicom.datadict import dictionary_has_tag, keyword_for_tag, private_dictionaries, repeater_has_tag
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence as DicomSequence
from pydicom.tag import BaseTag, Tag
from pydicom.uid import UID, ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from core.dicom_headers import read_dataset_bytes
from core.errors import CoreError, UnsupportedFileError
from core.series import Problem
from core.sources import Source, SourceData

# ---------------------------------------------------------------------------
# Table E.1-1, Basic Profile column (PS3.15 2024b). One attribute per line:
# tag, action code as the standard writes it, attribute name. "xx" in a tag is
# a repeating-group wildcard (curves 50xx, overlays 60xx).
#   D  replace with a non-zero length dummy value consistent with the VR
#   Z  replace with a zero length value (or a dummy)
#   X  remove
#   K  keep (non-sequence) or keep and clean recursively (sequence)
#   C  clean: replace with values of similar meaning that identify nobody
#   U  replace the UID with a non-identifying one, consistently within the export
# Combined codes (X/Z, Z/D, X/D, X/Z/D, X/Z/U*) are resolved by resolve_action.
# ---------------------------------------------------------------------------
_TABLE_E_1_1 = """
0018,11BB  D       Acquisition Field Of View Label
006A,0005  D       Annotation Group Label
006A,0003  D       Annotation Group UID
0044,0104  D       Assertion DateTime
0400,0562  D       Attribute Modification DateTime
300C,0127  D       Beam Hold Transition DateTime
0400,0115  D       Certificate of Signer
0012,0081  D       Clinical Trial Protocol Ethics Committee Name
0012,0020  D       Clinical Trial Protocol ID
0012,0010  D       Clinical Trial Sponsor Name
0012,0040  D       Clinical Trial Subject ID
0012,0042  D       Clinical Trial Subject Reading ID
0040,0512  D       Container Identifier
0040,A730  D       Content Sequence
0008,0107  D       Context Group Local Version
0008,0106  D       Context Group Version
0040,A121  D       Date
0040,A120  D       DateTime
0018,9701  D       Decay Correction DateTime
2100,0140  D       Destination AE
3010,002D  D       Device Label
0400,0105  D       Digital Signature DateTime
0068,6226  D       Effective DateTime
0042,0011  D       Encapsulated Document
3010,0035  D       Entity Label
3010,0038  D       Entity Long Label
0018,9804  D       Exclusion Start DateTime
0034,0002  D       Flow Identifier
0034,0001  D       Flow Identifier Sequence
0018,9074  D       Frame Acquisition DateTime
0034,0007  D       Frame Origin Timestamp
0018,9151  D       Frame Reference DateTime
0018,9623  D       Functional Sync Pulse
0070,0001  D       Graphic Annotation Sequence
0072,000A  D       Hanging Protocol Creation DateTime
003A,0314  D       Impedance Measurement DateTime
0068,6270  D       Information Issue DateTime
300A,0741  D       Interlock DateTime
300A,0742  D       Interlock Description
300A,0783  D       Interlock Origin Description
0400,0563  D       Modifying System
300A,0760  D       Override DateTime
0040,1101  D       Person Identification Code Sequence
0040,A123  D       Person Name
300A,0002  D       RT Plan Label
3010,0054  D       RT Prescription Label
300A,062A  D       RT Tolerance Set Label
300A,0619  D       Radiation Dose Identification Label
300A,0623  D       Radiation Dose In-Vivo Measurement Label
300A,067C  D       Radiation Generation Mode Label
0400,0565  D       Reason for the Attribute Modification
300A,073A  D       Recorded RT Control Point DateTime
0040,A13A  D       Referenced DateTime
3008,0162  D       Safe Position Exit Date
3008,0164  D       Safe Position Exit Time
3008,0166  D       Safe Position Return Date
3008,0168  D       Safe Position Return Time
0072,005E  D       Selector AE Value
0072,005F  D       Selector AS Value
0072,0061  D       Selector DA Value
0072,0063  D       Selector DT Value
0072,0066  D       Selector LO Value
0072,0068  D       Selector LT Value
0072,0065  D       Selector OB Value
0072,006A  D       Selector PN Value
0072,006C  D       Selector SH Value
0072,006E  D       Selector ST Value
0072,006B  D       Selector TM Value
0072,006D  D       Selector UN Value
0072,0071  D       Selector UR Value
0072,0070  D       Selector UT Value
0018,936A  D       Source End DateTime
0034,0005  D       Source Identifier
0018,9369  D       Source Start DateTime
300A,022C  D       Source Strength Reference Date
300A,022E  D       Source Strength Reference Time
0040,0551  D       Specimen Identifier
3006,0002  D       Structure Set Label
0040,A122  D       Time
3008,0024  D       Treatment Control Point Date
3008,0025  D       Treatment Control Point Time
300A,0608  D       Treatment Position Group Label
300A,0736  D       Treatment Tolerance Violation DateTime
300A,0734  D       Treatment Tolerance Violation Description
3010,0033  D       User Content Label
3010,0034  D       User Content Long Label
0040,A030  D       Verification DateTime
0040,A075  D       Verifying Observer Name
0040,A073  D       Verifying Observer Sequence
0040,A027  D       Verifying Organization
0018,9371  D       X-Ray Detector ID
0018,9367  D       X-Ray Source ID
0008,0050  Z       Accession Number
0018,1203  Z       Calibration DateTime
0012,0060  Z       Clinical Trial Coordinating Center Name
0012,0021  Z       Clinical Trial Protocol Name
0012,0030  Z       Clinical Trial Site ID
0012,0031  Z       Clinical Trial Site Name
0012,0050  Z       Clinical Trial Time Point ID
3010,000F  Z       Conceptual Volume Combination Description
3010,0017  Z       Conceptual Volume Description
0008,009C  Z       Consulting Physician's Name
3010,001B  Z       Device Alternate Identifier
0040,2017  Z       Filler Order Number / Imaging Service Request
3010,007F  Z       Fractionation Notes
0040,0513  Z       Issuer of the Container Identifier Sequence
0040,0562  Z       Issuer of the Specimen Identifier Sequence
3010,0043  Z       Manufacturer's Device Identifier
0040,A082  Z       Participation DateTime
0010,0030  Z       Patient's Birth Date
0010,0010  Z       Patient's Name
0010,0040  Z       Patient's Sex
0010,0020  Z       Patient ID
0040,2016  Z       Placer Order Number / Imaging Service Request
3010,007B  Z       Prescription Notes
3010,0081  Z       Prescription Notes Sequence
3006,00A6  Z       ROI Interpreter
3006,0026  Z       ROI Name
300A,0615  Z       RT Accessory Device Slot ID
300A,0611  Z       RT Accessory Holder Slot ID
3010,005A  Z       RT Physician Intent Narrative
300A,067D  Z       Radiation Generation Mode Description
3010,005C  Z       Reason for Superseding
0008,0090  Z       Referring Physician's Name
300E,0004  Z       Review Date
300E,0005  Z       Review Time
0400,0564  Z       Source of Previous Values
0040,0610  Z       Specimen Preparation Sequence
3006,0008  Z       Structure Set Date
3006,0009  Z       Structure Set Time
0008,0020  Z       Study Date
0020,0010  Z       Study ID
0008,0030  Z       Study Time
3010,007A  Z       Treatment Technique Notes
0040,A088  Z       Verifying Observer Identification Code Sequence
0018,4000  X       Acquisition Comments
0018,9424  X       Acquisition Protocol Description
0040,4035  X       Actual Human Performers Sequence
0010,21B0  X       Additional Patient History
0040,A353  X       Address (Trial)
0038,0010  X       Admission ID
0038,0020  X       Admitting Date
0008,1084  X       Admitting Diagnoses Code Sequence
0008,1080  X       Admitting Diagnoses Description
0038,0021  X       Admitting Time
0000,1000  X       Affected SOP Instance UID
0010,2110  X       Allergies
006A,0006  X       Annotation Group Description
0044,0004  X       Approval Status DateTime
4000,0010  X       Arbitrary
0044,0105  X       Assertion Expiration DateTime
0040,A078  X       Author Observer Sequence
300A,00C3  X       Beam Description
300A,00DD  X       Bolus Description
0010,1081  X       Branch of Service
0014,407E  X       Calibration Date
0014,407C  X       Calibration Time
0016,004D  X       Camera Owner Name
0018,1007  X       Cassette ID
0400,0310  X       Certified Timestamp
0012,0082  X       Clinical Trial Protocol Ethics Committee Approval Number
0012,0072  X       Clinical Trial Series Description
0012,0071  X       Clinical Trial Series ID
0012,0051  X       Clinical Trial Time Point Description
0040,0310  X       Comments on Radiation Dose
0040,0280  X       Comments on the Performed Procedure Step
300A,02EB  X       Compensator Description
0040,3001  X       Confidentiality Constraint on Patient Data Description
0008,009D  X       Consulting Physician Identification Sequence
0050,001B  X       Container Component ID
0040,051A  X       Container Description
0070,0086  X       Content Creator's Identification Code Sequence
0018,1042  X       Contrast/Bolus Start Time
0018,1043  X       Contrast/Bolus Stop Time
0018,A002  X       Contribution DateTime
0018,A003  X       Contribution Description
0010,2150  X       Country of Residence
2100,0040  X       Creation Date
2100,0050  X       Creation Time
0040,A307  X       Current Observer (Trial)
0038,0300  X       Current Patient Location
50xx,xxxx  X       Curve Data
0008,0025  X       Curve Date
0008,0035  X       Curve Time
0040,A07C  X       Custodial Organization Sequence
FFFC,FFFC  X       Data Set Trailing Padding
0040,A110  X       Date of Document or Verbal Transaction (Trial)
0018,1205  X       Date of Installation
0018,1200  X       Date of Last Calibration
0018,1204  X       Date of Manufacture
0018,1012  X       Date of Secondary Capture
0018,1202  X       DateTime of Last Calibration
0018,937F  X       Decomposition Description
0008,2111  X       Derivation Description
0050,0020  X       Device Description
0016,004B  X       Device Setting Description
FFFA,FFFA  X       Digital Signatures Sequence
0038,0030  X       Discharge Date
0038,0040  X       Discharge Diagnosis Description
0038,0032  X       Discharge Time
300A,079A  X       Displacement Reference Label
4008,011A  X       Distribution Address
4008,0119  X       Distribution Name
300A,0016  X       Dose Reference Description
3010,0037  X       Entity Description
3010,0036  X       Entity Name
300A,0676  X       Equipment Frame of Reference Description
0012,0087  X       Ethics Committee Approval Effectiveness End Date
0012,0086  X       Ethics Committee Approval Effectiveness Start Date
0010,2160  X       Ethnic Group
0040,4011  X       Expected Completion DateTime
003A,032B  X       Filter Lookup Table Description
0040,A023  X       Findings Group Recording Date (Trial)
0040,A024  X       Findings Group Recording Time (Trial)
300A,0196  X       Fixation Device Description
300A,0072  X       Fraction Group Description
0020,9158  X       Frame Comments
0016,0076  X       GPS Altitude
0016,0075  X       GPS Altitude Ref
0016,008C  X       GPS Area Information
0016,007B  X       GPS DOP
0016,008D  X       GPS Date Stamp
0016,0088  X       GPS Dest Bearing
0016,008A  X       GPS Dest Distance
0016,0089  X       GPS Dest Distance Ref
0016,0086  X       GPS Dest Longitude
0016,0085  X       GPS Dest Longitude Ref
0016,0087  X       GPS Dest Bearing Ref
0016,0084  X       GPS Dest Latitude
0016,0083  X       GPS Dest Latitude Ref
0016,008E  X       GPS Differential
0016,0081  X       GPS Img Direction
0016,0080  X       GPS Img Direction Ref
0016,0072  X       GPS Latitude
0016,0071  X       GPS Latitude Ref
0016,0074  X       GPS Longitude
0016,0073  X       GPS Longitude Ref
0016,0082  X       GPS Map Datum
0016,007A  X       GPS Measure Mode
0016,008B  X       GPS Processing Method
0016,0078  X       GPS Satellites
0016,007D  X       GPS Speed
0016,007C  X       GPS Speed Ref
0016,0079  X       GPS Status
0016,0077  X       GPS Time Stamp
0016,007F  X       GPS Track
0016,007E  X       GPS Track Ref
0016,0070  X       GPS Version ID
0018,1008  X       Gantry ID
0018,1005  X       Generator ID
0040,E004  X       HL7 Document Effective Time
0040,4037  X       Human Performer's Name
0040,4036  X       Human Performer's Organization
0088,0200  X       Icon Image Sequence
0008,4000  X       Identifying Comments
0020,4000  X       Image Comments
0028,4000  X       Image Presentation Comments
0040,2400  X       Imaging Service Request Comments
4008,0300  X       Impressions
0008,0015  X       Instance Coercion DateTime
0400,0600  X       Instance Origin Status
0008,0081  X       Institution Address
0008,1040  X       Institutional Department Name
0008,1041  X       Institutional Department Type Code Sequence
0010,1050  X       Insurance Plan Identification
3010,0085  X       Intended Fraction Start Time
0040,1011  X       Intended Recipients of Results Identification Sequence
4008,0112  X       Interpretation Approval Date
4008,0113  X       Interpretation Approval Time
4008,0111  X       Interpretation Approver Sequence
4008,010C  X       Interpretation Author
4008,0115  X       Interpretation Diagnosis Description
4008,0200  X       Interpretation ID
4008,0202  X       Interpretation ID Issuer
4008,0100  X       Interpretation Recorded Date
4008,0101  X       Interpretation Recorded Time
4008,0102  X       Interpretation Recorder
4008,010B  X       Interpretation Text
4008,010A  X       Interpretation Transcriber
4008,0108  X       Interpretation Transcription Date
4008,0109  X       Interpretation Transcription Time
0018,0035  X       Intervention Drug Start Time
0018,0027  X       Intervention Drug Stop Time
0040,2004  X       Issue Date of Imaging Service Request
0040,2005  X       Issue Time of Imaging Service Request
0038,0011  X       Issuer of Admission ID
0038,0014  X       Issuer of Admission ID Sequence
0012,0022  X       Issuer of Clinical Trial Protocol ID
0012,0073  X       Issuer of Clinical Trial Series ID
0012,0032  X       Issuer of Clinical Trial Site ID
0012,0041  X       Issuer of Clinical Trial Subject ID
0012,0043  X       Issuer of Clinical Trial Subject Reading ID
0012,0055  X       Issuer of Clinical Trial Time Point ID
0010,0021  X       Issuer of Patient ID
0038,0061  X       Issuer of Service Episode ID
0038,0064  X       Issuer of Service Episode ID Sequence
0010,21D0  X       Last Menstrual Date
0016,004F  X       Lens Make
0016,0050  X       Lens Model
0016,0051  X       Lens Serial Number
0016,004E  X       Lens Specification
0050,0021  X       Long Device Description
0400,0404  X       MAC
0016,002B  X       Maker Note
0010,2000  X       Medical Alerts
0010,1090  X       Medical Record Locator
0010,1080  X       Military Rank
0400,0550  X       Modified Attributes Sequence
0020,3403  X       Modified Image Date
0020,3406  X       Modified Image Description
0020,3405  X       Modified Image Time
0020,3401  X       Modifying Device ID
0018,937B  X       Multi-energy Acquisition Description
0008,1060  X       Name of Physician(s) Reading Study
0040,1010  X       Names of Intended Recipients of Results
0008,1000  X       Network ID
0400,0552  X       Nonconforming Data Element Value
0400,0551  X       Nonconforming Modified Attributes Sequence
0040,A192  X       Observation Date (Trial)
0040,A033  X       Observation Start DateTime
0040,A193  X       Observation Time (Trial)
0010,2180  X       Occupation
0040,2010  X       Order Callback Phone Number
0040,2011  X       Order Callback Telecom Information
0040,2008  X       Order Entered By
0040,2009  X       Order Enterer's Location
0400,0561  X       Original Attributes Sequence
2100,0070  X       Originator
0012,0023  X       Other Clinical Trial Protocol IDs Sequence
0010,1000  X       Other Patient IDs
0010,1002  X       Other Patient IDs Sequence
0010,1001  X       Other Patient Names
60xx,4000  X       Overlay Comments
60xx,3000  X       Overlay Data
0008,0024  X       Overlay Date
0008,0034  X       Overlay Time
0040,A07A  X       Participant Sequence
0010,4000  X       Patient Comments
300A,0794  X       Patient Setup Photo Description
0038,0500  X       Patient State
0040,1004  X       Patient Transport Arrangements
300A,0792  X       Patient Treatment Preparation Method Description
300A,078E  X       Patient Treatment Preparation Procedure Parameter Description
0010,1040  X       Patient's Address
0010,1010  X       Patient's Age
0010,1005  X       Patient's Birth Name
0010,0032  X       Patient's Birth Time
0038,0400  X       Patient's Institution Residence
0010,0050  X       Patient's Insurance Plan Code Sequence
0010,1060  X       Patient's Mother's Birth Name
0010,0101  X       Patient's Primary Language Code Sequence
0010,0102  X       Patient's Primary Language Modifier Code Sequence
0010,21F0  X       Patient's Religious Preference
0010,1020  X       Patient's Size
0010,2155  X       Patient's Telecom Information
0010,2154  X       Patient's Telephone Numbers
0010,1030  X       Patient's Weight
0040,0243  X       Performed Location
0040,0254  X       Performed Procedure Step Description
0040,0250  X       Performed Procedure Step End Date
0040,4051  X       Performed Procedure Step End DateTime
0040,0251  X       Performed Procedure Step End Time
0040,0253  X       Performed Procedure Step ID
0040,0244  X       Performed Procedure Step Start Date
0040,4050  X       Performed Procedure Step Start DateTime
0040,0245  X       Performed Procedure Step Start Time
0040,0241  X       Performed Station AE Title
0040,4030  X       Performed Station Geographic Location Code Sequence
0040,0242  X       Performed Station Name
0040,4028  X       Performed Station Name Code Sequence
0008,1052  X       Performing Physician Identification Sequence
0008,1050  X       Performing Physician's Name
0040,1102  X       Person's Address
0040,1104  X       Person's Telecom Information
0040,1103  X       Person's Telephone Numbers
4008,0114  X       Physician Approving Interpretation
0008,1062  X       Physician(s) Reading Study Identification Sequence
0008,1048  X       Physician(s) of Record
0008,1049  X       Physician(s) of Record Identification Sequence
0018,1004  X       Plate ID
3002,0123  X       Position Acquisition Template Description
3002,0121  X       Position Acquisition Template Name
0040,0012  X       Pre-Medication
0010,21C0  X       Pregnancy Status
300A,000E  X       Prescription Description
0070,0082  X       Presentation Creation Date
0070,0083  X       Presentation Creation Time
3010,0061  X       Prior Treatment Dose Description
0040,4052  X       Procedure Step Cancellation DateTime
0044,000B  X       Product Expiration DateTime
0008,1088  X       Pyramid Description
0020,0027  X       Pyramid Label
3006,004D  X       ROI Creator Sequence
3006,002D  X       ROI DateTime
3006,0028  X       ROI Description
3006,0038  X       ROI Generation Description
3006,004E  X       ROI Interpreter Sequence
3006,002E  X       ROI Observation DateTime
3006,0088  X       ROI Observation Description
3006,0085  X       ROI Observation Label
300A,0004  X       RT Plan Description
300A,0003  X       RT Plan Name
0018,1078  X       Radiopharmaceutical Start DateTime
0018,1072  X       Radiopharmaceutical Start Time
0018,1079  X       Radiopharmaceutical Stop DateTime
0018,1073  X       Radiopharmaceutical Stop Time
300C,0113  X       Reason for Omission Description
0040,100A  X       Reason for Requested Procedure Code Sequence
0032,1030  X       Reason for Study
0032,1066  X       Reason for Visit
0032,1067  X       Reason for Visit Code Sequence
0040,2001  X       Reason for the Imaging Service Request
0040,1002  X       Reason for the Requested Procedure
0074,1234  X       Receiving AE
0400,0402  X       Referenced Digital Signature Sequence
0038,0004  X       Referenced Patient Alias Sequence
0010,1100  X       Referenced Patient Photo Sequence
0008,1120  X       Referenced Patient Sequence
0400,0403  X       Referenced SOP Instance MAC Sequence
0008,0096  X       Referring Physician Identification Sequence
0008,0092  X       Referring Physician's Address
0008,0094  X       Referring Physician's Telephone Numbers
0010,2152  X       Region of Residence
0040,0275  X       Request Attributes Sequence
0032,1070  X       Requested Contrast Agent
0040,1400  X       Requested Procedure Comments
0040,1001  X       Requested Procedure ID
0040,1005  X       Requested Procedure Location
0018,9937  X       Requested Series Description
0074,1236  X       Requesting AE
0032,1032  X       Requesting Physician
0032,1033  X       Requesting Service
0018,9185  X       Respiratory Motion Compensation Technique Description
0010,2299  X       Responsible Organization
0010,2297  X       Responsible Person
4008,4000  X       Results Comments
4008,0118  X       Results Distribution List Sequence
4008,0040  X       Results ID
4008,0042  X       Results ID Issuer
0008,0054  X       Retrieve AE Title
0100,0420  X       SOP Authorization DateTime
0038,001A  X       Scheduled Admission Date
0038,001B  X       Scheduled Admission Time
0038,001C  X       Scheduled Discharge Date
0038,001D  X       Scheduled Discharge Time
0040,4034  X       Scheduled Human Performers Sequence
0038,001E  X       Scheduled Patient Institution Residence
0040,000B  X       Scheduled Performing Physician Identification Sequence
0040,0006  X       Scheduled Performing Physician's Name
0040,0007  X       Scheduled Procedure Step Description
0040,0004  X       Scheduled Procedure Step End Date
0040,0005  X       Scheduled Procedure Step End Time
0040,4008  X       Scheduled Procedure Step Expiration DateTime
0040,0009  X       Scheduled Procedure Step ID
0040,0011  X       Scheduled Procedure Step Location
0040,4010  X       Scheduled Procedure Step Modification DateTime
0040,0002  X       Scheduled Procedure Step Start Date
0040,4005  X       Scheduled Procedure Step Start DateTime
0040,0003  X       Scheduled Procedure Step Start Time
0040,0001  X       Scheduled Station AE Title
0040,4027  X       Scheduled Station Geographic Location Code Sequence
0040,0010  X       Scheduled Station Name
0040,4025  X       Scheduled Station Name Code Sequence
0032,1020  X       Scheduled Study Location
0032,1021  X       Scheduled Study Location AE Title
0032,1000  X       Scheduled Study Start Date
0032,1001  X       Scheduled Study Start Time
0032,1010  X       Scheduled Study Stop Date
0032,1011  X       Scheduled Study Stop Time
0008,103E  X       Series Description
0038,0062  X       Service Episode Description
0038,0060  X       Service Episode ID
300A,01B2  X       Setup Technique Description
300A,01A6  X       Shielding Device Description
0040,06FA  X       Slide Identifier
0010,21A0  X       Smoking Status
300A,0216  X       Source Manufacturer
0038,0050  X       Special Needs
0040,050A  X       Specimen Accession Number
0040,0602  X       Specimen Detailed Description
0040,0600  X       Specimen Short Description
0008,0055  X       Station AE Title
3006,0006  X       Structure Set Description
3006,0004  X       Structure Set Name
0032,1040  X       Study Arrival Date
0032,1041  X       Study Arrival Time
0032,4000  X       Study Comments
0032,1050  X       Study Completion Date
0032,1051  X       Study Completion Time
0008,1030  X       Study Description
0032,0012  X       Study ID Issuer
0032,0034  X       Study Read Date
0032,0035  X       Study Read Time
0032,0032  X       Study Verified Date
0032,0033  X       Study Verified Time
0044,0010  X       Substance Administration DateTime
0040,A354  X       Telephone Number (Trial)
0040,DB07  X       Template Local Version
0040,DB06  X       Template Version
4000,4000  X       Text Comments
2030,0020  X       Text String
0040,A112  X       Time of Document Creation or Verbal Transaction (Trial)
0018,1201  X       Time of Last Calibration
0018,1014  X       Time of Secondary Capture
0008,0201  X       Timezone Offset From UTC
0088,0910  X       Topic Author
0088,0912  X       Topic Keywords
0088,0906  X       Topic Subject
0088,0904  X       Topic Title
0018,5011  X       Transducer Identification Sequence
300A,000B  X       Treatment Sites
0018,100A  X       UDI Sequence
0018,1009  X       Unique Device Identifier
0040,A352  X       Verbal Source (Trial)
0040,A358  X       Verbal Source Identifier Code Sequence (Trial)
0038,4000  X       Visit Comments
0018,9373  X       X-Ray Detector Label
003A,0329  X       Waveform Filter Description
0008,0017  U       Acquisition UID
0020,9161  U       Concatenation UID
3010,0006  U       Conceptual Volume UID
3010,0013  U       Constituent Conceptual Volume UID
0018,1002  U       Device UID
0400,0100  U       Digital Signature UID
0020,9164  U       Dimension Organization UID
300A,0013  U       Dose Reference UID
3010,006E  U       Dosimetric Objective UID
0008,0058  U       Failed SOP Instance UID List
0070,031A  U       Fiducial UID
0020,0052  U       Frame of Reference UID
0008,0014  U       Instance Creator UID
0008,3010  U       Irradiation Event UID
0028,1214  U       Large Palette Color Lookup Table UID
0018,100B  U       Manufacturer's Device Class UID
0002,0003  U       Media Storage SOP Instance UID
003A,0310  U       Multiplex Group UID
0040,A402  U       Observation Subject UID (Trial)
0040,A171  U       Observation UID
0028,1199  U       Palette Color Lookup Table UID
300A,0650  U       Patient Setup UID
0070,1101  U       Presentation Display Collection UID
0070,1102  U       Presentation Sequence Collection UID
0008,0019  U       Pyramid UID
3010,003B  U       RT Treatment Phase UID
3010,000B  U       Referenced Conceptual Volume UID
300A,0083  U       Referenced Dose Reference UID
3010,006F  U       Referenced Dosimetric Objective UID
3010,0031  U       Referenced Fiducials UID
3006,0024  U       Referenced Frame of Reference UID
0040,4023  U       Referenced General Purpose Scheduled Procedure Step Transaction UID
0040,A172  U       Referenced Observation UID (Trial)
0008,1155  U       Referenced SOP Instance UID
0004,1511  U       Referenced SOP Instance UID in File
300A,0785  U       Referenced Treatment Position Group UID
3006,00C2  U       Related Frame of Reference UID
0000,1001  U       Requested SOP Instance UID
0008,0018  U       SOP Instance UID
0020,000E  U       Series Instance UID
3010,0015  U       Source Conceptual Volume UID
0064,0003  U       Source Frame of Reference UID
0040,0554  U       Specimen UID
0088,0140  U       Storage Media File-set UID
0020,000D  U       Study Instance UID
0020,0200  U       Synchronization Frame of Reference UID
0018,2042  U       Target UID
0040,DB0D  U       Template Extension Creator UID
0040,DB0C  U       Template Extension Organization UID
0062,0021  U       Tracking UID
0008,1195  U       Transaction UID
300A,0609  U       Treatment Position Group UID
300A,0700  U       Treatment Session UID
0040,A124  U       UID
0070,0084  Z/D     Content Creator's Name
0008,0023  Z/D     Content Date
0008,0033  Z/D     Content Time
0018,0010  Z/D     Contrast/Bolus Agent
0018,9919  Z/D     Instruction Performed DateTime
0040,0555  X/Z     Acquisition Context Sequence
0008,0022  X/Z     Acquisition Date
0008,0032  X/Z     Acquisition Time
2200,0005  X/Z     Barcode Value
2200,0002  X/Z     Label Text
0010,2203  X/Z     Patient's Sex Neutered
0008,1110  X/Z     Referenced Study Sequence
0032,1060  X/Z     Requested Procedure Description
300E,0008  X/Z     Reviewer Name
3008,0105  X/Z     Source Serial Number
300A,00B2  X/Z     Treatment Machine Name
0018,1400  X/D     Acquisition Device Processing Description
0018,700C  X/D     Date of Last Detector Calibration
0018,700A  X/D     Detector ID
0018,9517  X/D     End Acquisition DateTime
3008,0054  X/D     First Treatment Date
0008,0012  X/D     Instance Creation Date
3010,004D  X/D     Intended Phase End Date
3010,004C  X/D     Intended Phase Start Date
3008,0056  X/D     Most Recent Treatment Date
0040,A032  X/D     Observation DateTime
0008,1072  X/D     Operator Identification Sequence
0018,1030  X/D     Protocol Name
300A,0006  X/D     RT Plan Date
300A,0007  X/D     RT Plan Time
3010,0056  X/D     RT Treatment Approach Label
0008,0021  X/D     Series Date
0008,0031  X/D     Series Time
0018,9516  X/D     Start Acquisition DateTime
0018,700E  X/D     Time of Last Detector Calibration
3008,0250  X/D     Treatment Date
3010,0077  X/D     Treatment Site
3008,0251  X/D     Treatment Time
0008,002A  X/Z/D   Acquisition DateTime
0018,1000  X/Z/D   Device Serial Number
0008,0013  X/Z/D   Instance Creation Time
0008,0082  X/Z/D   Institution Code Sequence
0008,0080  X/Z/D   Institution Name
0008,1070  X/Z/D   Operators' Name
0008,1111  X/Z/D   Referenced Performed Procedure Step Sequence
0008,1010  X/Z/D   Station Name
0008,1140  X/Z/U*  Referenced Image Sequence
0008,2112  X/Z/U*  Source Image Sequence
"""

ACTIONS = ("D", "Z", "X", "K", "C", "U")

# How each combined code of the table is resolved, and why. Each choice leaves
# no identifying data; they differ only in how the resulting file conforms.
COMBINED_ACTIONS: dict[str, str] = {
    # Z keeps a Type 2 attribute present (empty) so the IOD stays valid; X would
    # remove it, which is only valid where it is Type 3.
    "X/Z": "Z",
    # An empty value is valid wherever the attribute is Type 2 (Patient ID,
    # Content Date); a dummy would invent data that looks real.
    "Z/D": "Z",
    # X/D attributes (Series Date, Protocol Name, Instance Creation Date, ...)
    # are Type 3 in the image IODs we export (CT, MR, PET, SC, ...), so removal
    # is valid and invents nothing.
    "X/D": "X",
    # As X/Z: an empty value keeps Type 2 attributes present.
    "X/Z/D": "Z",
    # Referenced/Source Image Sequence: keep the sequence, clean its items
    # recursively and remap every UID inside with the export's mapping, so a
    # reference to another exported instance still resolves, and one to an
    # instance not exported points at a UID that identifies nothing.
    "X/Z/U*": "U",
}


def _parse_table(text: str) -> tuple[dict[int, str], tuple[tuple[int, int, str], ...]]:
    exact: dict[int, str] = {}
    repeating: list[tuple[int, int, str]] = []
    for line in text.strip().splitlines():
        tag_text, code, _name = line.split(None, 2)
        digits = tag_text.replace(",", "")
        if "x" in digits.lower():
            mask = int("".join("0" if c in "xX" else "F" for c in digits), 16)
            repeating.append((mask, int(re.sub("[xX]", "0", digits), 16), code))
        else:
            exact[int(digits, 16)] = code
    return exact, tuple(repeating)


BASIC_PROFILE, _BASIC_PROFILE_REPEATING = _parse_table(_TABLE_E_1_1)

# Patient-level dates are not moved by the date-shift option: the option covers
# the dates of the study, and a shifted birth date still narrows identity.
_NEVER_SHIFTED = frozenset({0x00100030, 0x00100032})  # Patient's Birth Date, Patient's Birth Time

DEIDENTIFICATION_METHOD = "Basic Application Confidentiality Profile"
_BASIC_PROFILE_CODE = ("113100", "DCM", "Basic Application Confidentiality Profile")
_MODIFIED_DATES_CODE = ("113107", "DCM", "Retain Longitudinal Temporal Information Modified Dates Option")

# Our implementation class UID: a fixed 2.25 UID derived from the project name,
# so it is the same in every export and says nothing about the source files.
IMPLEMENTATION_CLASS_UID = "2.25." + str(
    uuid.uuid5(uuid.NAMESPACE_URL, "https://tomoforge.invalid/implementation/1").int
)
IMPLEMENTATION_VERSION_NAME = "TOMOFORGE_1"

SECONDARY_CAPTURE_SOP_CLASSES = frozenset(
    {
        "1.2.840.10008.5.1.4.1.1.7",  # Secondary Capture Image Storage
        "1.2.840.10008.5.1.4.1.1.7.1",  # Multi-frame Single Bit SC
        "1.2.840.10008.5.1.4.1.1.7.2",  # Multi-frame Grayscale Byte SC
        "1.2.840.10008.5.1.4.1.1.7.3",  # Multi-frame Grayscale Word SC
        "1.2.840.10008.5.1.4.1.1.7.4",  # Multi-frame True Color SC
    }
)
_DICOMDIR_SOP_CLASS = "1.2.840.10008.1.3.10"

_MAX_DEPTH = 32  # sequence nesting we clean; deeper content is dropped, never kept unjudged


def action_code(tag: int | BaseTag) -> str | None:
    """The Basic Profile code of Table E.1-1 for a tag ("X/Z", "U", ...), or None if not listed.

    Private tags are not in the table; the profile removes them all.
    """
    value = int(tag)
    code = BASIC_PROFILE.get(value)
    if code is not None:
        return code
    for mask, match, repeating_code in _BASIC_PROFILE_REPEATING:
        if value & mask == match:
            return repeating_code
    return None


def resolve_action(code: str) -> str:
    """One of D, Z, X, K, C, U for a table code; combined codes per :data:`COMBINED_ACTIONS`.

    Raises
    ------
    ValueError
        The code is neither a single action nor a known combination.
    """
    if code in ACTIONS:
        return code
    try:
        return COMBINED_ACTIONS[code]
    except KeyError as err:
        raise ValueError(
            f"unknown Table E.1-1 action code {code!r}; expected one of {ACTIONS} or {sorted(COMBINED_ACTIONS)}"
        ) from err


def new_secret() -> bytes:
    """A fresh 32-byte secret for one export (never stored, never written out)."""
    return secrets.token_bytes(32)


class UIDMap:
    """Deterministic, non-reversible UID replacement for one export.

    ``new = "2.25." + int(UUID(HMAC-SHA256(secret, old)[:16]))``: the same old UID
    always gives the same new UID within an export (so the files of a series
    share one SeriesInstanceUID and references stay linked), while without the
    secret nobody can go back or link two exports.

    Parameters
    ----------
    secret : bytes, optional
        Per-export key; a new random one when omitted.
    """

    def __init__(self, secret: bytes | None = None) -> None:
        self._secret = secret if secret is not None else new_secret()
        if len(self._secret) < 16:
            raise ValueError("the UID mapping secret must have at least 16 bytes")
        self._seen: dict[str, str] = {}

    def __call__(self, uid: str) -> str:
        old = str(uid).strip().rstrip("\x00")
        if not old:
            return ""
        new = self._seen.get(old)
        if new is None:
            digest = hmac.new(self._secret, old.encode("ascii", "replace"), hashlib.sha256).digest()
            # version=4 sets the UUID version/variant bits, as PS3.5 B.2 expects of a 2.25 UID.
            new = "2.25." + str(uuid.UUID(bytes=digest[:16], version=4).int)
            self._seen[old] = new
        return new

    def __len__(self) -> int:
        return len(self._seen)


# --- dates ---------------------------------------------------------------------------------------

_DA = re.compile(r"(\d{4})\.?(\d{2})\.?(\d{2})")  # also the old ACR-NEMA YYYY.MM.DD


def shift_date(value: str, days: int) -> str:
    """Move a DA value (YYYYMMDD) by ``days``; "" when it is not a full date (cannot be shifted safely)."""
    match = _DA.fullmatch(str(value).strip())
    if match is None:
        return ""
    try:
        moved = dt.date(int(match[1]), int(match[2]), int(match[3])) + dt.timedelta(days=days)
    except (ValueError, OverflowError):
        return ""
    return f"{moved.year:04d}{moved.month:02d}{moved.day:02d}"


def shift_datetime(value: str, days: int) -> str:
    """Move the date part of a DT value by ``days``, keeping time and UTC offset; "" when it has no full date."""
    text = str(value).strip()
    if len(text) < 8 or not text[:8].isdigit():
        return ""
    date = shift_date(text[:8], days)
    return date + text[8:] if date else ""


# --- free text -----------------------------------------------------------------------------------

# Words that describe an image and identify nobody; anything else is dropped
# from free text that leaves the app (a whitelist: PHI has no vocabulary).
_SAFE_WORDS = frozenset(
    """
    tomoforge export exported converted conversion volume image images series scan slice slices frame frames
    mask label labels labelmap segmentation segment mesh surface threshold resampled cropped reoriented
    ct mr mri pt pet spect us xa cr dx mg nm ot rtstruct seg sr sc
    t1 t2 t1w t2w t2star pd pdw flair dwi adc swi bold epi gre se tse fse ir mprage spgr fiesta stir dti fmri
    asl perfusion diffusion angio tof mra cta fdg localizer scout survey fieldmap phase magnitude
    axial sagittal coronal oblique ax sag cor tra transverse 2d 3d 4d
    head brain neck chest thorax lung lungs abdomen pelvis spine cervical thoracic lumbar knee hip shoulder
    ankle wrist hand foot cardiac heart liver kidney body whole extremity bone bones soft tissue
    contrast native pre post arterial venous portal delayed standard sharp smooth kernel recon
    hu mm cm ms sec kv mas bit int8 uint8 int16 uint16 int32 uint32 float32 float64
    field mapping map maps asc desc ascending descending rest resting state task multi single echo spin
    gradient inversion recovery fat water sat saturation suppression mip minip mpr reformat reformatted
    reconstruction mediastinum window dose bolus tracking calcium score iterative filtered
    sample synthetic phantom test calibration
    with without and of in on at to from by
    """.split()
)
_SAFE_NUMBER = re.compile(r"[+-]?\d{1,4}(\.\d{1,4})?(mm|cm|ms|s|kv|mas|hu|t|x|d|bit)?", re.IGNORECASE)
_SAFE_DIMENSIONS = re.compile(r"\d{1,5}(x\d{1,5}){1,3}", re.IGNORECASE)
_TOKEN_SPLIT = re.compile(r"[\s_,;:/|()\[\]{}<>\"'`^=*&%$#@!?\\~-]+")


def _tokens(text: str) -> list[str]:
    return [t for t in _TOKEN_SPLIT.split(str(text)) if t]


def _is_safe_token(token: str) -> bool:
    lower = token.lower().strip(".")
    if not lower:
        return True
    return lower in _SAFE_WORDS or bool(_SAFE_NUMBER.fullmatch(lower)) or bool(_SAFE_DIMENSIONS.fullmatch(lower))


def safe_description(text: str, *, max_chars: int = 80) -> str:
    """Free text reduced to words that cannot identify anyone, for metadata of exported files.

    Keeps words of a technical vocabulary (modalities, sequences, planes, body
    parts, units) and short numbers ("3.0", "512x512x20"); drops everything
    else, including names, IDs, dates and long numbers.

    Parameters
    ----------
    text : str
        E.g. a series description, a NIfTI ``descrip``.
    max_chars : int
        Upper bound of the result's length.

    Returns
    -------
    str
        The kept words joined by single spaces ("" when nothing is safe).
    """
    kept = [t.strip(".") for t in _tokens(text) if _is_safe_token(t)]
    return " ".join(t for t in kept if t)[:max_chars].strip()


def is_identifying_text(text: str) -> bool:
    """Whether a string could identify a person: any word outside the safe vocabulary, or a long number.

    Conservative by design: "CT Body 3.0" is safe, "Smith" and "19010203" are not.
    """
    return any(not _is_safe_token(t) for t in _tokens(text))


MASK = "•••••"


def masked(value: Any) -> str:
    """What the header view shows instead of a hidden value: a fixed mask ("" stays "").

    The mask has a fixed length so it does not reveal the length of the value.
    """
    return "" if value is None or str(value) == "" else MASK


# Text attributes that describe the device or the image, never the patient.
SAFE_TEXT_KEYWORDS = frozenset(
    {
        "Manufacturer",
        "ManufacturerModelName",
        "SoftwareVersions",
        "ConvolutionKernel",
        "SequenceName",
        "ReceiveCoilName",
        "TransmitCoilName",
        "RescaleType",
        "WindowCenterWidthExplanation",
        "ImplementationVersionName",
        "CodeValue",
        "CodingSchemeDesignator",
        "CodingSchemeVersion",
        "CodeMeaning",
        "ContextIdentifier",
        "FilterType",
        "PatientIdentityRemoved",
        "DeidentificationMethod",
    }
)
_FREE_TEXT_VRS = frozenset({"LO", "SH", "ST", "LT", "UT", "UC", "AE", "UR", "UN", "OB", "OW"})
_NON_INSTANCE_UID_KEYWORD = re.compile(
    r".*(ClassUID|SyntaxUID|CodingSchemeUID|ContextGroupExtensionCreatorUID|MappingResourceUID|ContextUID)$"
)


def is_registered_uid(uid: str) -> bool:
    """A UID defined by the DICOM standard (SOP classes, transfer syntaxes, ...): not identifying."""
    text = str(uid).strip().rstrip("\x00")
    return UID(text).name != text or text.startswith("1.2.840.10008.")


def _is_instance_uid(keyword: str, value: str) -> bool:
    """A UI value that names an instance, series, study, ... (identifying by linkage) rather than a class."""
    return not _NON_INSTANCE_UID_KEYWORD.fullmatch(keyword or "") and not is_registered_uid(value)


def is_identifying_element(tag: int | BaseTag, vr: str, keyword: str = "", value: Any = None) -> bool:
    """Whether the header view hides this element's value when "hide identifying data" is on.

    True for private tags, every Table E.1-1 attribute, names and dates (PN,
    DA, DT), instance UIDs, and free text (LO, SH, ST, LT, UT, UC, AE, UR,
    UN, OB, OW) except a few device descriptions (:data:`SAFE_TEXT_KEYWORDS`).
    Items of a sequence inherit the flag of the sequence (the caller's job).
    """
    tag = Tag(tag)
    if tag.is_private:
        return True
    if action_code(tag) is not None:
        return True
    if vr in ("PN", "DA", "DT"):
        return True
    if vr == "UI":
        values = value if isinstance(value, (list, tuple, MultiValue)) else [value]
        return any(v not in (None, "") and _is_instance_uid(keyword, str(v)) for v in values) or value is None
    if vr in _FREE_TEXT_VRS:
        return (keyword or keyword_for_tag(tag)) not in SAFE_TEXT_KEYWORDS
    return False


# --- burned-in annotation ------------------------------------------------------------------------


def burned_in_annotation_reason(ds: Dataset) -> str:
    """Why the pixels of this instance may show identifying text, or "" when nothing says so.

    (0028,0301) Burned In Annotation = YES, or the attribute is absent and the
    modality is US or SC, or the SOP class is a Secondary Capture (screenshots
    and ultrasound often carry the patient's name in the pixels).
    """
    value = str(ds.get("BurnedInAnnotation", "") or "").strip().upper()
    if value == "YES":
        return "(0028,0301) Burned In Annotation is YES: the pixels show text that may name the patient"
    if value:
        return ""
    modality = str(ds.get("Modality", "") or "").strip().upper()
    if modality in ("US", "SC"):
        return (
            f"(0028,0301) Burned In Annotation is missing and the modality is {modality}, "
            "whose images often show the patient's name in the pixels"
        )
    if str(ds.get("SOPClassUID", "")) in SECONDARY_CAPTURE_SOP_CLASSES:
        return (
            "(0028,0301) Burned In Annotation is missing in a Secondary Capture image, "
            "which often shows the patient's name in the pixels"
        )
    return ""


def has_burned_in_annotation(ds: Dataset) -> bool:
    """True when :func:`burned_in_annotation_reason` gives a reason: warn and ask before exporting pixels."""
    return bool(burned_in_annotation_reason(ds))


# --- the profile ---------------------------------------------------------------------------------


@dataclass
class _Context:
    uid_map: UIDMap
    date_shift_days: int | None
    overrides: Mapping[int, str]


def _dummy_value(vr: str) -> Any:
    """A non-zero length value consistent with the VR (action D); None where Z is the only safe choice."""
    if vr == "DA":
        return "19000101"
    if vr == "DT":
        return "19000101000000"
    if vr == "TM":
        return "000000"
    if vr in ("AE", "CS", "LO", "SH", "ST", "LT", "UT", "UC", "PN"):
        return "ANONYMIZED"
    if vr == "AS":
        return "000Y"
    if vr in ("DS", "IS"):
        return "0"
    if vr in ("US", "SS", "UL", "SL", "UV", "SV", "FL", "FD"):
        return 0
    if vr in ("OB", "OW", "OD", "OF", "OL", "OV", "UN"):
        return b"\x00" * 8
    # SQ: an item that stays valid for every IOD cannot be made up generically,
    # so D on a sequence empties it (Z), which carries nothing. UR, AT: idem.
    return None


def _empty(elem: DataElement) -> None:
    elem.value = DicomSequence([]) if elem.VR == "SQ" else None


def _map_uids(elem: DataElement, uid_map: UIDMap) -> None:
    value = elem.value
    if value is None or value == "":
        return
    if isinstance(value, (list, tuple, MultiValue)):
        elem.value = [uid_map(v) for v in value if str(v).strip()]
    else:
        elem.value = uid_map(str(value))


def _shift(elem: DataElement, days: int) -> None:
    shifter = shift_date if elem.VR == "DA" else shift_datetime
    value = elem.value
    if value is None or value == "":
        return
    if isinstance(value, (list, tuple, MultiValue)):
        shifted = [shifter(str(v), days) for v in value]
        elem.value = [s for s in shifted if s] or None
    else:
        elem.value = shifter(str(value), days) or None


def _clean_text(elem: DataElement) -> None:
    value = elem.value
    if isinstance(value, (list, tuple, MultiValue)):
        elem.value = [safe_description(str(v)) for v in value]
    else:
        elem.value = safe_description(str(value)) if value not in (None, "") else value


def _clean_dataset(ds: Dataset, ctx: _Context, depth: int) -> None:
    for tag in list(ds.keys()):
        elem = ds[tag]
        if tag.is_private or tag.element == 0x0000 or tag.group == 0x0002:
            # Private data can hold anything (the profile removes it all); group
            # lengths are recomputed on write; file meta is rewritten separately.
            del ds[tag]
            continue
        if (tag.group & 0xFF00) == 0x6000:
            # Overlays: the table removes Overlay Data and Comments; the rest of
            # the group is then dangling, and Overlay Label/Description are free text.
            del ds[tag]
            continue
        code = ctx.overrides.get(int(tag)) or action_code(tag)
        vr = elem.VR
        if code is None:
            if not (dictionary_has_tag(tag) or repeater_has_tag(tag)):
                del ds[tag]  # an unknown public attribute cannot be judged, so it does not leave
            elif vr == "SQ":
                _clean_items(ds, tag, ctx, depth)
            elif (
                vr == "UI"
                and elem.value not in (None, "")
                and any(_is_instance_uid(elem.keyword, str(v)) for v in (elem.value if elem.VM > 1 else [elem.value]))
            ):
                # Not in the table but still an instance UID (e.g. a newer attribute):
                # remap it too, so no original UID survives.
                _map_uids(elem, ctx.uid_map)
            continue
        action = resolve_action(code)
        if (
            ctx.date_shift_days is not None
            and vr in ("DA", "DT", "TM")
            and int(tag) not in _NEVER_SHIFTED
            and action != "K"
        ):
            # Modified Dates option: dates move by the export's offset, times of day stay.
            if vr != "TM":
                _shift(elem, ctx.date_shift_days)
            continue
        if action == "X":
            del ds[tag]
        elif action == "Z":
            _empty(elem)
        elif action == "D":
            if vr == "UI":
                _map_uids(elem, ctx.uid_map)
            else:
                dummy = _dummy_value(vr)
                if dummy is None:
                    _empty(elem)
                else:
                    elem.value = dummy
        elif action == "U":
            if vr == "SQ":
                _clean_items(ds, tag, ctx, depth)
            elif vr == "UI":
                _map_uids(elem, ctx.uid_map)
            else:
                _empty(elem)  # a U code on a non-UID value: nothing to remap, keep nothing
        elif action == "K":
            if vr == "SQ":
                _clean_items(ds, tag, ctx, depth)
        elif action == "C":
            if vr == "SQ":
                _clean_items(ds, tag, ctx, depth)
            elif vr in ("DA", "DT"):
                if ctx.date_shift_days is None:
                    _empty(elem)
                else:
                    _shift(elem, ctx.date_shift_days)
            elif vr == "UI":
                _map_uids(elem, ctx.uid_map)
            elif vr in ("LO", "SH", "ST", "LT", "UT", "UC", "CS", "PN", "AE"):
                _clean_text(elem)
            elif vr in ("OB", "OW", "UN", "UR"):
                _empty(elem)


def _clean_items(ds: Dataset, tag: BaseTag, ctx: _Context, depth: int) -> None:
    elem = ds[tag]
    if depth + 1 > _MAX_DEPTH:
        elem.value = DicomSequence([])  # too deep to judge: drop the content
        return
    for item in elem.value or []:
        _clean_dataset(item, ctx, depth + 1)


def _code_item(code: tuple[str, str, str]) -> Dataset:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = code
    return item


def deidentify_dataset(
    ds: Dataset,
    *,
    uid_map: UIDMap,
    date_shift_days: int | None = None,
    overrides: Mapping[int, str] | None = None,
) -> Dataset:
    """A de-identified copy of one DICOM dataset (the input is not changed).

    Parameters
    ----------
    ds : Dataset
        A dataset as read by pydicom, with or without pixel data and file meta.
    uid_map : UIDMap
        The export's UID mapping; share one across all files of an export.
    date_shift_days : int, optional
        Move every date of the study by this many days (intervals kept, times
        of day kept); None removes or empties dates as the profile says.
    overrides : mapping of int to str, optional
        Actions that replace the table's for given tags (e.g. ``"K"`` to keep
        an attribute under a profile option); keys are tag integers.

    Returns
    -------
    Dataset
        With Table E.1-1 applied recursively, private tags removed,
        PatientIdentityRemoved=YES, DeidentificationMethod(CodeSequence), a
        rewritten file meta (MediaStorageSOPInstanceUID = the new
        SOPInstanceUID, our ImplementationClassUID) and a zeroed preamble.
    """
    # A plain Dataset copy: a FileDataset would carry the original file name and
    # the in-memory buffer of the original bytes along with it.
    out = Dataset()
    for elem in ds:
        out.add(copy.deepcopy(elem))
    original_meta = getattr(ds, "file_meta", None)
    ctx = _Context(uid_map=uid_map, date_shift_days=date_shift_days, overrides=dict(overrides or {}))
    _clean_dataset(out, ctx, 0)

    out.PatientIdentityRemoved = "YES"
    codes = [_BASIC_PROFILE_CODE]
    method = DEIDENTIFICATION_METHOD
    if date_shift_days is not None:
        codes.append(_MODIFIED_DATES_CODE)
        method += "; Modified Dates Option"
    out.DeidentificationMethod = method
    out.DeidentificationMethodCodeSequence = DicomSequence([_code_item(c) for c in codes])
    out.LongitudinalTemporalInformationModified = "MODIFIED" if date_shift_days is not None else "REMOVED"

    out.file_meta = _file_meta(ds, out, original_meta)
    out.preamble = b"\x00" * 128
    return out


def _file_meta(source: Dataset, ds: Dataset, original: FileMetaDataset | None) -> FileMetaDataset:
    meta = FileMetaDataset()
    meta.FileMetaInformationVersion = b"\x00\x01"
    if "SOPClassUID" in ds:
        meta.MediaStorageSOPClassUID = ds.SOPClassUID
    if "SOPInstanceUID" in ds:
        meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    syntax = original.get("TransferSyntaxUID") if original is not None else None
    if not syntax:
        # A file without meta (old ACR-NEMA style): keep the encoding it was read with.
        implicit, little = getattr(source, "original_encoding", (False, True))
        if little is False:
            syntax = ExplicitVRBigEndian
        else:
            syntax = ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian
    meta.TransferSyntaxUID = UID(str(syntax))
    meta.ImplementationClassUID = UID(IMPLEMENTATION_CLASS_UID)
    meta.ImplementationVersionName = IMPLEMENTATION_VERSION_NAME
    return meta


def deidentify_datasets(
    datasets: Sequence[Dataset],
    *,
    secret: bytes | None = None,
    date_shift_days: int | None = None,
) -> list[Dataset]:
    """De-identified copies of the datasets of one export (one UID mapping shared by all)."""
    uid_map = UIDMap(secret)
    return [deidentify_dataset(ds, uid_map=uid_map, date_shift_days=date_shift_days) for ds in datasets]


def dataset_to_bytes(ds: Dataset) -> bytes:
    """A DICOM Part 10 file (preamble, DICM, file meta) of a de-identified dataset.

    Raises
    ------
    UnsupportedFileError
        pydicom cannot encode the dataset (e.g. a value that does not fit its VR).
    """
    buffer = io.BytesIO()
    try:
        pydicom.dcmwrite(buffer, ds, enforce_file_format=True)
    except (ValueError, TypeError, AttributeError, OverflowError, KeyError) as err:
        raise UnsupportedFileError(
            f"the de-identified dataset cannot be written as DICOM ({err}). The source file may be damaged."
        ) from err
    return buffer.getvalue()


# --- files and exports ---------------------------------------------------------------------------


def looks_like_dicom(data: SourceData) -> bool:
    """A Part 10 file ("DICM" at byte 128) or a bare dataset whose first tag is in group 0002 or 0008."""
    if data[128:132] == b"DICM":
        return True
    return len(data) >= 8 and data[:2] in (b"\x02\x00", b"\x08\x00", b"\x00\x08")


def read_dicom(source: Source) -> Dataset:
    """Parse a whole DICOM file (pixel data included) from a Source.

    Raises
    ------
    UnsupportedFileError
        Not DICOM, damaged, or without SOP Class / SOP Instance UID.
    """
    if not looks_like_dicom(source.data):
        raise UnsupportedFileError(f"{source.name}: not a DICOM file", source=source.name)
    try:
        # The series reader's parser: it also reads bare datasets in implicit VR big endian.
        ds = read_dataset_bytes(source.data, stop_before_pixels=False)
        meta = getattr(ds, "file_meta", None) or Dataset()
        # Some anonymised files keep the SOP UIDs only in the file meta: take them from there.
        sop_class = str(ds.get("SOPClassUID", "") or meta.get("MediaStorageSOPClassUID", "") or "").strip()
        sop_instance = str(ds.get("SOPInstanceUID", "") or meta.get("MediaStorageSOPInstanceUID", "") or "").strip()
        if sop_class and not str(ds.get("SOPClassUID", "") or ""):
            ds.SOPClassUID = sop_class
        if sop_instance and not str(ds.get("SOPInstanceUID", "") or ""):
            ds.SOPInstanceUID = sop_instance
    except (InvalidDicomError, ValueError, KeyError, TypeError, EOFError, OSError, OverflowError) as err:
        raise UnsupportedFileError(
            f"{source.name}: damaged DICOM file ({err}). Export it again from the scanner or PACS.",
            source=source.name,
        ) from err
    if not sop_class or not sop_instance:
        raise UnsupportedFileError(
            f"{source.name}: DICOM data set without (0008,0016) SOP Class UID or (0008,0018) SOP Instance UID; "
            "it is not a storable image, so it is left out.",
            source=source.name,
        )
    if sop_class == _DICOMDIR_SOP_CLASS:
        raise UnsupportedFileError(
            f"{source.name}: a DICOMDIR (an index of a CD, full of patient names) is not exported; "
            "the images it lists are.",
            source=source.name,
        )
    return ds


@dataclass(frozen=True)
class DeidentifiedFile:
    """One exported file; ``name`` is a relative path made of our own words and numbers only."""

    name: str
    data: bytes
    series_uid: str
    burned_in_reason: str = ""


@dataclass
class DeidentifiedExport:
    files: list[DeidentifiedFile] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)

    @property
    def series_folders(self) -> list[str]:
        return sorted({f.name.split("/")[0] for f in self.files})


def _sort_key(ds: Dataset) -> tuple[int, str]:
    try:
        number = int(str(ds.get("InstanceNumber", "") or "").strip())
    except ValueError:
        number = 2**31
    return number, str(ds.get("SOPInstanceUID", ""))


def _safe_modality(ds: Dataset) -> str:
    return re.sub(r"[^A-Z0-9]", "", str(ds.get("Modality", "") or "").upper())[:8] or "OT"


def _series_key(ds: Dataset) -> str:
    uid = str(ds.get("SeriesInstanceUID", "") or "").strip()
    if uid:
        return uid
    # Files whose series UID was blanked (some anonymisers do that): group them like
    # a reader would, by what a series shares.
    parts = (
        ds.get(k, "")
        for k in ("StudyInstanceUID", "FrameOfReferenceUID", "SeriesNumber", "Modality", "Rows", "Columns")
    )
    return "(no series UID) " + "|".join(str(p) for p in parts)


def _fill_missing_uids(out: Dataset, uid_map: UIDMap, series_key: str) -> None:
    """Give a de-identified instance the Type 1 study and series UIDs its source lacked (consistent per export)."""
    if not str(out.get("SeriesInstanceUID", "") or "").strip():
        out.SeriesInstanceUID = uid_map(f"tomoforge-missing-series-uid:{series_key}")
    if not str(out.get("StudyInstanceUID", "") or "").strip():
        out.StudyInstanceUID = uid_map("tomoforge-missing-study-uid")


def deidentify_sources(
    sources: Iterable[Source],
    *,
    secret: bytes | None = None,
    date_shift_days: int | None = None,
    allow_burned_in: bool = False,
) -> DeidentifiedExport:
    """De-identify every DICOM file of an upload, one folder per series.

    Parameters
    ----------
    sources : iterable of Source
        Files (zips already expanded); non-DICOM files become problems.
    secret : bytes, optional
        The export's UID secret (random when omitted, which is what callers want).
    date_shift_days : int, optional
        See :func:`deidentify_dataset`.
    allow_burned_in : bool
        Export series whose pixels may show identifying text
        (:func:`burned_in_annotation_reason`); when False they are left out
        with a problem saying why.

    Returns
    -------
    DeidentifiedExport
        Files named ``series_001_CT/IM00001.dcm`` (numbered in upload order and
        instance number; no original name, UID or text is used) and problems.
    """
    uid_map = UIDMap(secret)
    export = DeidentifiedExport()
    by_series: dict[str, list[tuple[Source, Dataset]]] = {}
    for source in sources:
        try:
            ds = read_dicom(source)
        except CoreError as err:
            export.problems.append(Problem(source=source.name, message=err.message))
            continue
        by_series.setdefault(_series_key(ds), []).append((source, ds))

    index = 0
    for members in by_series.values():
        reasons = {burned_in_annotation_reason(ds) for _source, ds in members} - {""}
        if reasons and not allow_burned_in:
            export.problems.append(
                Problem(
                    source=members[0][0].name,
                    message=(
                        f"series of {len(members)} file(s) not exported: {sorted(reasons)[0]}. "
                        "De-identification cannot clean pixels; confirm the export of burned-in text explicitly "
                        "(--allow-burned-in) if you have checked the images."
                    ),
                )
            )
            continue
        cleaned: list[tuple[Source, Dataset, bytes]] = []
        for source, ds in members:
            try:
                out = deidentify_dataset(ds, uid_map=uid_map, date_shift_days=date_shift_days)
                _fill_missing_uids(out, uid_map, _series_key(ds))
                cleaned.append((source, out, dataset_to_bytes(out)))
            except CoreError as err:
                export.problems.append(Problem(source=source.name, message=f"{source.name}: {err.message}"))
        if not cleaned:
            continue
        index += 1
        cleaned.sort(key=lambda item: _sort_key(item[1]))
        folder = f"series_{index:03d}_{_safe_modality(cleaned[0][1])}"
        for number, (_source, out, data) in enumerate(cleaned, start=1):
            export.files.append(
                DeidentifiedFile(
                    name=f"{folder}/IM{number:05d}.dcm",
                    data=data,
                    series_uid=str(out.get("SeriesInstanceUID", "")),
                    burned_in_reason=burned_in_annotation_reason(out),
                )
            )
    return export


def is_known_private_creator(creator: str) -> bool:
    """A private creator that pydicom's private dictionaries know (a vendor module name, not patient data).

    The header view shows these even when identifying data is hidden; any
    other creator string is masked, since a private block can be named anything.
    """
    return str(creator).strip() in private_dictionaries


def deidentified_zip(
    sources: Iterable[Source], *, date_shift_days: int | None = None, allow_burned_in: bool = False
) -> bytes:
    """:func:`deidentify_sources` and :func:`zip_export` in one call: the job the Headers page runs in a worker.

    In the server, seconds of pure-Python work for a large series would hold the
    interpreter lock every session shares.
    """
    return zip_export(deidentify_sources(sources, date_shift_days=date_shift_days, allow_burned_in=allow_burned_in))


def zip_export(export: DeidentifiedExport) -> bytes:
    """The files of an export in one zip (deflate level 1: DICOM pixels compress little, speed matters)."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=1) as archive:
        for item in export.files:
            archive.writestr(item.name, item.data)
    return buffer.getvalue()
