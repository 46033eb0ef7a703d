"""Output options that change which tensors an output file holds: prune, components, key
regexes, and baking in a VAE from a separate file.

The options are kept in one canonical JSON form (`canonical`), hashed into the output's cache
key, so changing any of them rebuilds just that output and nothing upstream.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

from mergebuild.sd.arch import (
    TEXT_ENCODERS,
    VAE_PREFIX,
    VAE_ROOTS,
    component_of,
    text_encoder_of,
)

OUTPUT_COMPONENTS = ("unet", "text_encoder", "vae", "other")


def canonical(
    prune: bool, components: list[str] | None, include: list[str] | None, exclude: list[str] | None
) -> dict[str, Any]:
    """Only non-default options, lists sorted and deduplicated (their order has no meaning)."""
    out: dict[str, Any] = {}
    if prune:
        out["prune"] = True
    if components is not None:
        # `diffuser` is the transformer's name for `unet`; naming every encoder is naming
        # text_encoder (one spelling each, so equal choices share a cache key)
        comps = {"unet" if c == "diffuser" else c for c in components}
        if set(TEXT_ENCODERS) <= comps:
            comps = (comps - set(TEXT_ENCODERS)) | {"text_encoder"}
        if "text_encoder" in comps:
            comps -= set(TEXT_ENCODERS)
        if comps != set(OUTPUT_COMPONENTS):
            out["components"] = sorted(comps)
    if include:
        out["include"] = sorted(set(include))
    if exclude:
        out["exclude"] = sorted(set(exclude))
    return out


def selector(options: Mapping[str, Any], root: str | None) -> Callable[[str], bool]:
    """key → whether the output keeps it (after a VAE is baked in)."""
    prune = bool(options.get("prune"))
    comps = set(options.get("components") or OUTPUT_COMPONENTS)
    inc = [re.compile(p) for p in options.get("include") or []]
    exc = [re.compile(p) for p in options.get("exclude") or []]

    def keep(key: str) -> bool:
        if prune and key.startswith("model_ema."):
            return False
        comp = component_of(key, root)
        if comp not in comps and not (comp == "text_encoder" and text_encoder_of(key) in comps):
            return False
        if inc and not any(p.search(key) for p in inc):
            return False
        return not any(p.search(key) for p in exc)

    return keep


def vae_keys(vae_layout: Mapping[str, Any]) -> dict[str, str]:
    """Output key → key in a VAE file. VAE files usually lack the `first_stage_model.` prefix
    (either spelling is accepted); training-only `loss.*` entries are skipped, as the web UI
    does."""
    prefixed = any(k.startswith(VAE_PREFIX) for k in vae_layout)
    out = {}
    for k in vae_layout:
        # a full checkpoint given as `vae:` contributes its first_stage_model.* only; a bare
        # VAE file contributes its encoder/decoder/quant_conv keys; nothing else ever lands
        # under first_stage_model.
        if prefixed and not k.startswith(VAE_PREFIX):
            continue
        bare = k.removeprefix(VAE_PREFIX)
        if not bare.startswith(VAE_ROOTS):
            continue
        out[VAE_PREFIX + bare] = k
    return out
