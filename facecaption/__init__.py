"""facecaption: build FaceCaption-style face image-text datasets from web image URL lists."""

__version__ = "0.1.0"
