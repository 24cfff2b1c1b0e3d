"""Models behind small interfaces, one per task: face detectors now; attribute classifiers
and LLMs join them. Real weights come from the model cache (`facecaption models pull`) or an
explicit path; nothing is downloaded at import or in tests."""
