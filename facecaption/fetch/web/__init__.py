"""The web side of fetching: addresses we may connect to, robots.txt, opt-out headers,
per-host politeness, and the HTTP downloader that puts them together."""
