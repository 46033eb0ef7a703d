"""Inputs by URL: a pinned model that is not found locally is downloaded, verified, stored.

`sources` checks `urls:` / `hf:` strings (no imports beyond the standard library: the recipe
schema uses it); `store` is the content-addressed model store under the cache dir;
`transport` opens a byte stream at an offset (http(s) with urllib, anything else with fsspec,
`hf:` through huggingface_hub's URL and headers); `download` streams, resumes, hashes and
publishes; `missing` decides what a build (or `-n`, or `mergebuild fetch`) has to download.
"""
