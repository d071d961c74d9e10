"""Reading back the tidy CSV tables stored in the cache: one reader, so every module parses them alike."""
from __future__ import annotations

import io

import pandas as pd


def read_tidy_csv(text: str) -> pd.DataFrame:
    """A tidy table from its CSV text, exactly as it was written.

    ``uid`` is read as text (a uid such as ``"007"`` keeps its zeros) and is ``""`` on model-level rows
    (utility, perplexity), which have no example; other empty cells are NaN. Only the empty string counts as
    missing, so a value like ``"NA"`` or ``"null"`` in a text column stays a string.
    """
    table = pd.read_csv(io.StringIO(text), keep_default_na=False, na_values=[""], dtype={"uid": str})
    return table.fillna({"uid": ""}) if "uid" in table.columns else table
