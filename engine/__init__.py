"""Imaging integration engine: HL7 v2, FHIR and DICOM between RIS, HIS/EMR and PACS."""

__version__ = "0.1.0"
