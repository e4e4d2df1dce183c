"""Text examples of a feature for the feature page: token contexts shaded by activation, next to the image
examples, and the feature's split between the modalities.

A text example is one cached sample's text tokens (prompt, template, answer) with the feature's activation
on each, re-encoded like the image examples (`FeatureSources.token_activations(..., modality="text")`);
each token is a span whose background is the activation over the feature's max on text rows, with the
value in its tooltip.
"""

from __future__ import annotations

import html
import math

import numpy as np
import streamlit as st

from app.ui import image_row


def shaded_html(tokens: list[str], acts: np.ndarray, vmax: float) -> str:
    """The tokens as HTML spans shaded by activation / vmax (orange, alpha up to 0.9), spacing kept."""
    out = []
    for tok, a in zip(tokens, acts):
        lead = tok[: len(tok) - len(tok.lstrip())]
        alpha = 0.0 if vmax <= 0 else min(max(float(a) / vmax, 0.0), 1.0) * 0.9
        style = f"background: rgba(255, 140, 0, {alpha:.2f}); border-radius: 3px; padding: 0 1px"
        out.append(f'{html.escape(lead)}<span style="{style}" title="{float(a):.3g}">{html.escape(tok.strip())}</span>')
    return "".join(out).strip()


def modality_caption(summary) -> str:
    """One line: the feature's modality, and its density and max on image rows and on text rows."""
    share = summary.image_share
    split = "" if not math.isfinite(share) else f" · {share:.0%} of its activation on image tokens"
    return (f"Modality **{summary.modality}**{split} · image rows: density {summary.density_image:.3g}, max "
            f"{summary.max_image:.3g} · text rows: density {summary.density_text:.3g}, max {summary.max_text:.3g}")


@st.cache_resource(show_spinner=False, max_entries=4)
def _tokenizer(model: str, revision: str):
    from transformers import AutoTokenizer

    from interp.model.models import resolve_path

    return AutoTokenizer.from_pretrained(resolve_path(model, revision or None)[0])


def text_examples(srcs, feature: int, examples, vmax: float) -> None:
    """Each example's text context with its tokens shaded, captioned with the sample and its text max."""
    from explain.text import token_strings

    meta = srcs.reader.meta
    tok = _tokenizer(meta["model"], meta.get("revision") or "")
    for ex in examples:
        tokens, acts = srcs.token_activations(feature, ex.sample, modality="text")
        if not len(tokens):
            continue
        pieces = token_strings(tok, tokens["token_id"].tolist())
        st.markdown(f"<div style='line-height: 1.9'>{shaded_html(pieces, acts, vmax)}</div>", unsafe_allow_html=True)
        st.caption(f"#{ex.sample} · max {ex.max:.3g}")


def examples_by_modality(run, srcs, stats, feature: int, view: str, by: str) -> None:
    """Top image examples (by their patches) beside top text examples (by their text tokens), then quantile
    samples of each modality, with the feature's modality split on top."""
    summary = stats.stats(feature)
    st.markdown(modality_caption(summary))
    left, right = st.columns([3, 2])
    with left:
        st.header("Top samples: image")
        top = stats.top(feature, by)[:6]
        if top:
            image_row(run, srcs, feature, top, view, per_row=3)
        else:
            st.caption("It never fires on an image patch.")
    with right:
        st.header("Top samples: text")
        top_text = stats.top(feature, modality="text")[:8]
        if top_text:
            text_examples(srcs, feature, top_text, summary.max_text)
        else:
            st.caption("It never fires on a text token.")
    st.header("Quantile samples")
    st.caption("Activating samples from the bands of the per-sample value, lowest band first")
    left, right = st.columns([3, 2])
    for band, text_band in zip(stats.quantile_samples(feature, n_bands=4, per_band=3, by=by),
                               stats.quantile_samples(feature, n_bands=4, per_band=3, modality="text")):
        with left:
            st.markdown(f"**{band.q_lo:.0%} – {band.q_hi:.0%}** (image)")
            image_row(run, srcs, feature, band.examples, view, per_row=3)
        with right:
            st.markdown(f"**{text_band.q_lo:.0%} – {text_band.q_hi:.0%}** (text)")
            text_examples(srcs, feature, text_band.examples, summary.max_text)
