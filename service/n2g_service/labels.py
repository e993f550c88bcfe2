"""Token labels: the reference's normalisation (n2g-method.md section 5), in one place.

A graph's nodes are labels, not token ids; a label stands for every vocabulary id that normalises
to it. Kept free of torch so that a server without a model (and search) can use it.
"""

from __future__ import annotations


def normalise_token(token: str) -> str:
    """The reference's label normalisation (n2g-method.md section 5).

    A title-case token longer than one character is lower-cased (" The" -> " the"), then a token
    longer than one character that contains a letter loses its surrounding whitespace
    (" the" -> "the"). Punctuation and whitespace-only tokens are left as they are, so " ." and
    "." stay different labels, as in the reference. Normalising a label again changes nothing.
    """
    out = token.lower() if len(token) > 1 and token.istitle() else token
    if len(out) > 1 and any(c.isalpha() for c in out):
        out = out.strip()
    return out
