"""The models behind the stages: the model cache and its pulls (insightface packs, ONNX
attribute models, Hugging Face Hub repos), which files the settings name (`locate`), the
pre-run check and `facecaption doctor` (`preflight`), and model identities (`identity`).
Real weights come from the cache, the packaged RetinaFace or an explicit path; nothing is
downloaded at import or in tests (the tests' Hub is a loopback server)."""
