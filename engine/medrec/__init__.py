"""Medication reconciliation: one list of what a patient takes, from requests, dispenses,
administrations and statements, with a reason for every resource left off (issue 14).

Plain dicts in, plain records out: `sources` reads resources, `rules` decides inclusion,
`reconcile` groups into records, `fhir_list` writes the FHIR List. No store, no runtime.
"""
