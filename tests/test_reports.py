from prior_dist.preparation.reports import clean_whitespace, extract_sections, split_sentences

MIMIC = """                                 FINAL REPORT
 EXAMINATION:  CHEST (PA AND LAT)

 INDICATION:  ___F with cough. Dr. ___ requested a film.

 COMPARISON:  ___

 findings :
 PA and lateral views of the chest were obtained.  There is a 1.5 cm nodule in the
 right upper lobe. Dr. ___ was notified at 3:45 p.m. The heart size is normal.
 No pleural effusion or pneumothorax.

 IMPRESSION:
 1. Right upper lobe nodule, e.g. granuloma.  2. No acute process.
 3. XXXX. Follow-up CT in 3 months is recommended.
"""


def test_mimic_layout_sections_and_sentences():
    report = extract_sections(MIMIC)
    assert report.findings.startswith("PA and lateral views")
    assert "INDICATION" not in report.findings and "___F" not in report.findings
    assert report.impression.startswith("1. Right upper lobe")
    assert report.sentences == [
        "PA and lateral views of the chest were obtained.",
        "There is a 1.5 cm nodule in the right upper lobe.",
        "Dr. ___ was notified at 3:45 p.m.",
        "The heart size is normal.",
        "No pleural effusion or pneumothorax.",
        "Right upper lobe nodule, e.g. granuloma.",
        "No acute process.",
        "Follow-up CT in 3 months is recommended.",
    ]


def test_header_variants():
    for header in ("FINDINGS:", "Findings:", "FINDINGS :", "  findings:", "F I N D I N G S:"):
        report = extract_sections(
            f"{header} Lungs are clear. Heart is normal.\nIMPRESSION: Normal."
        )
        assert report.findings == "Lungs are clear. Heart is normal.", header
        assert report.impression == "Normal."


def test_combined_header_and_missing_sections():
    report = extract_sections("FINDINGS AND IMPRESSION: Lungs clear. No effusion.")
    assert report.combined_header and report.sentences == ["Lungs clear.", "No effusion."]
    report = extract_sections("IMPRESSION: No acute process.")
    assert report.findings == "" and report.sentences == ["No acute process."]
    report = extract_sections("INDICATION: cough.\nCOMPARISON: none.\nTECHNIQUE: PA.")
    assert not report.has_sections and report.sentences == []


def test_lowercase_prose_with_colon_is_not_a_header():
    report = extract_sections("FINDINGS: The heart: normal size. Lungs clear.\nIMPRESSION: Normal.")
    assert report.sentences[:2] == ["The heart: normal size.", "Lungs clear."]


def test_unknown_capital_header_ends_a_section():
    report = extract_sections(
        "FINDINGS: Lungs clear.\nNOTIFICATION: Called Dr. Smith.\nIMPRESSION: OK now."
    )
    assert report.findings == "Lungs clear." and report.impression == "OK now."


def test_sentence_rules_nasty_cases():
    assert split_sentences("Tip is 2.5 cm above the carina. Stable.") == [
        "Tip is 2.5 cm above the carina.",
        "Stable.",
    ]
    assert split_sentences("Discussed with Dr. Jones at 10 a.m. on ___.") == [
        "Discussed with Dr. Jones at 10 a.m. on ___."
    ]
    assert split_sentences("1. Small effusion. 2. No pneumothorax.\n3) Cardiomegaly.") == [
        "Small effusion.",
        "No pneumothorax.",
        "Cardiomegaly.",
    ]
    assert split_sentences("The lungs are\nclear bilaterally.\n\nNo effusion") == [
        "The lungs are clear bilaterally.",
        "No effusion",
    ]
    assert split_sentences("XXXX. ___. The XXXX is normal.") == ["The XXXX is normal."]
    assert split_sentences("Lines vs. tubes are seen. Heart ok!") == [
        "Lines vs. tubes are seen.",
        "Heart ok!",
    ]
    assert split_sentences("   \n  ") == []


def test_clean_whitespace():
    assert clean_whitespace("  a \t b\r\n\r\n\r\n\r\nc  ") == "a b\n\nc"
